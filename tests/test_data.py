"""Corpus cleaning, the deterministic split, and the token windows."""

import pytest
import torch

from sppx.data import (
    PARTS,
    TextFiles,
    TokenizedCorpus,
    c4_documents,
    calibration_windows,
    consecutive_windows,
    encode_documents,
    split_documents,
)
from sppx.errors import ConfigError
from sppx.models import byte_tokenizer
from sppx.wikitext import clean_wikitext

MARKUP = """{{Infobox river|name=Test|length={{convert|12|km}}}}
'''The Test''' is a [[river]] in [[England|southern England]].<ref>{{cite web|url=x}}</ref> It flows
through [[Kent]] and is {{lang|fr|une rivière}} known for its [http://example.org mills] and trout.
[[File:Test river.jpg|thumb|The [[Test]] at [[Romsey]]]]
{| class="wikitable"
! a !! b
|-
| 1 || 2
|}
== History ==
The river was used for milling since the [[Middle Ages]] and for water meadows later on.
<!-- hidden comment -->
== References ==
* Some book, 1990, about rivers and more rivers.
[[Category:Rivers of Hampshire]]
"""


def test_clean_wikitext_keeps_prose_and_drops_markup():
    text = clean_wikitext(MARKUP)
    assert text.startswith(
        "The Test is a river in southern England. It flows through Kent and is known for its mills"
    )
    assert "The river was used for milling since the Middle Ages" in text
    for junk in (
        "[[",
        "]]",
        "{{",
        "}}",
        "<ref",
        "wikitable",
        "Category",
        "Some book",
        "hidden",
        "'''",
        "thumb",
        "==",
    ):
        assert junk not in text


def test_split_is_disjoint_deterministic_and_complete():
    docs = [(f"doc{i}", f"text of document {i} " * (5 + i % 7)) for i in range(60)]
    fractions = {"calibration": 0.1, "validation": 0.05, "evaluation": 0.15}
    parts = split_documents(docs, fractions)
    assert parts == split_documents(list(reversed(docs)), fractions)  # order of input does not matter
    flat = [d for p in PARTS for d in parts[p]]
    assert sorted(flat) == sorted(t for _, t in docs) and len(set(flat)) == len(flat)
    total = sum(len(t) for _, t in docs)
    for part, frac in fractions.items():
        assert parts[part] and abs(sum(map(len, parts[part])) / total - frac) < 0.03


def test_text_files_split_is_cached(tmp_path, text_file):
    corpus = TextFiles(paths=[str(text_file)])
    parts = corpus.parts(tmp_path / "cache")
    cached = list((tmp_path / "cache" / "data").glob("text-*.json"))
    assert len(cached) == 1
    assert corpus.parts(tmp_path / "cache") == parts
    assert all(parts[p] for p in PARTS)


def test_windows_and_calibration_sampler():
    stream = torch.arange(103)
    windows = consecutive_windows(stream, 10)
    assert windows.shape == (10, 10) and torch.equal(windows.flatten(), torch.arange(100))
    assert consecutive_windows(stream, 10, limit=3).shape == (3, 10)
    a = calibration_windows(stream, 5, 20, seed=3)
    assert torch.equal(a, calibration_windows(stream, 5, 20, seed=3))
    assert not torch.equal(a, calibration_windows(stream, 5, 20, seed=4))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 20)) for w in a)


def test_documents_are_joined_by_end_of_text():
    tok = byte_tokenizer()
    ids = encode_documents(tok, ["ab", "c"])
    assert ids.tolist() == tok("ab")["input_ids"] + [tok.eos_token_id] + tok("c")["input_ids"] + [
        tok.eos_token_id
    ]
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"


@pytest.mark.slow
def test_hub_dataset_source_reads_a_local_json_builder(tmp_path):
    from sppx.data import HubDataset

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(f'{{"text": "document number {i} talks about rivers", "id": {i}}}\n' for i in range(40))
    )
    corpus = HubDataset(path="json", data_files=str(rows), max_documents=30)
    docs = corpus.documents()
    assert len(docs) == 30 and docs[3][1] == "document number 3 talks about rivers"
    parts = corpus.parts(tmp_path / "cache")
    assert sum(len(v) for v in parts.values()) == 30


def test_calibration_sources_draw_from_the_part_or_file_asked_for(tmp_path, text_file, monkeypatch):
    tokenizer = byte_tokenizer()
    own = tmp_path / "own.txt"
    own.write_text("zebra quartz " * 200)
    cache = tmp_path / "cache"
    for source in ("calibration", "tuning", str(own)):
        corpus = TextFiles(paths=[str(text_file)], calibration=source)
        corpus.check_calibration(cache)
        tokens = TokenizedCorpus.build(corpus, tokenizer, cache)
        stream = corpus.calibration_stream(tokens, tokenizer, cache)
        if source in ("calibration", "tuning"):
            assert torch.equal(stream, tokens.streams[source])
        else:
            assert torch.equal(stream, encode_documents(tokenizer, [own.read_text().strip()]))
        windows = calibration_windows(stream, 4, 16, seed=0)
        assert torch.equal(windows, calibration_windows(stream, 4, 16, seed=0))  # seeded

    # C4 is read once through datasets and cached; a failure names the key and says what to do instead.
    calls = []

    def fake_load_dataset(path, data_files=None, split=None, streaming=False):
        calls.append((path, data_files, split, streaming))
        return iter([{"text": f"document {i}"} for i in range(10)])

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert c4_documents(cache, count=3) == ["document 0", "document 1", "document 2"]
    assert c4_documents(cache, count=3) == ["document 0", "document 1", "document 2"]
    assert calls == [("allenai/c4", {"train": "en/c4-train.00000-of-01024.json.gz"}, "train", True)]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ConfigError, match=r"^data\.calibration='c4': could not be loaded \(Couldn't reach"
    ) as info:
        TextFiles(paths=[str(text_file)], calibration="c4").check_calibration(tmp_path / "other-cache")
    assert "\n" not in str(info.value) and "offline, use calibration, tuning or a text file" in str(
        info.value
    )
