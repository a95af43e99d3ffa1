"""Instruction-tuning data: Alpaca files, prompts, label masking, truncation, padding, the DataModule."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from sppx.data import TextFiles, TuneDataModule
from sppx.errors import ConfigError
from sppx.instructions import (
    IGNORE_INDEX,
    TEMPLATES,
    InstructionDataModule,
    collate_examples,
    load_alpaca,
    pad_token_id,
    tokenize_examples,
)
from sppx.models import byte_tokenizer
from tests.conftest import compose_config

SAMPLE = Path(__file__).resolve().parent / "data" / "alpaca_sample.json"

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nRewrite the sentence in the past tense.\n\n"
    "### Input:\nThe ferry leaves the harbour at noon.\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nList the days of the weekend.\n\n### Response:\n"
)
RECORDS = [
    {
        "instruction": "Rewrite the sentence in the past tense.",
        "input": "The ferry leaves the harbour at noon.",
        "output": "The ferry left the harbour at noon.",
    },
    {"instruction": "List the days of the weekend.", "input": "", "output": "Saturday and Sunday."},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_prompts_have_the_standard_wording():
    alpaca = TEMPLATES["alpaca"]
    assert alpaca.prompt(RECORDS[0]["instruction"], RECORDS[0]["input"]) == WITH_INPUT
    assert alpaca.prompt(RECORDS[1]["instruction"], "") == NO_INPUT


def test_labels_mask_exactly_the_prompt_for_response_and_nothing_for_all(tok):
    response = tokenize_examples(RECORDS, tok, seqlen=1024, loss_on="response")
    everything = tokenize_examples(RECORDS, tok, seqlen=1024, loss_on="all")
    assert len(response) == len(everything) == 2 and response.dropped == everything.dropped == 0
    for record, prompt, (ids, labels), (ids_all, labels_all) in zip(
        RECORDS, (WITH_INPUT, NO_INPUT), response, everything, strict=True
    ):
        n = len(_ids(tok, prompt))
        target = [*_ids(tok, record["output"]), tok.eos_token_id]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        assert ids.tolist() == _ids(tok, prompt) + target
        assert tok.decode(ids[:n]) == prompt  # the boundary is where the prompt text ends
        assert (labels[:n] == IGNORE_INDEX).all() and (labels[n:] != IGNORE_INDEX).all()
        assert labels[n:].tolist() == target == ids[n:].tolist()
        assert torch.equal(ids_all, ids) and torch.equal(labels_all, ids_all)


def test_truncation_to_seqlen_and_dropping_examples_left_without_a_response(tok):
    prompt_len = len(_ids(tok, NO_INPUT))
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "short"}
    records = [RECORDS[1], long_prompt]
    seqlen = prompt_len + 5  # keeps 5 response tokens of the first record, none of the second's
    examples = tokenize_examples(records, tok, seqlen=seqlen, loss_on="response")
    assert len(examples) == 1 and examples.dropped == 1
    ids, labels = examples[0]
    assert ids.numel() == labels.numel() == seqlen
    assert ids.tolist() == (_ids(tok, NO_INPUT) + _ids(tok, "Saturday and Sunday."))[:seqlen]
    assert (labels != IGNORE_INDEX).sum() == 5 and tok.eos_token_id not in ids.tolist()

    # A single surviving response token at the very end still counts; none at all drops the example.
    assert tokenize_examples([RECORDS[1]], tok, seqlen=prompt_len + 1).dropped == 0
    # Learning every token keeps the long-prompt example (cut to seqlen).
    kept = tokenize_examples(records, tok, seqlen=seqlen, loss_on="all")
    assert len(kept) == 2 and kept.dropped == 0 and all(ids.numel() == seqlen for ids, _ in kept)

    with pytest.raises(ConfigError, match=r"^data\.seqlen=\d+: leaves no response token in any of the 2 "):
        tokenize_examples(records, tok, seqlen=prompt_len, loss_on="response")


def test_collate_right_pads_with_masked_labels_and_zero_attention(tok):
    examples = tokenize_examples(RECORDS, tok, seqlen=1024)
    lengths = [ids.numel() for ids, _ in examples]
    assert lengths[0] != lengths[1]
    for pad_id in (pad_token_id(tok), 7):
        input_ids, attention_mask, labels = collate_examples(list(examples), pad_id)
        assert input_ids.shape == attention_mask.shape == labels.shape == (2, max(lengths))
        assert input_ids.dtype == attention_mask.dtype == labels.dtype == torch.long
        for row, ((ids, lab), n) in enumerate(zip(examples, lengths, strict=True)):
            assert torch.equal(input_ids[row, :n], ids) and torch.equal(labels[row, :n], lab)
            assert attention_mask[row, :n].eq(1).all() and attention_mask[row, n:].eq(0).all()
            assert input_ids[row, n:].eq(pad_id).all() and labels[row, n:].eq(IGNORE_INDEX).all()
    assert pad_token_id(tok) == tok.pad_token_id
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_padded_batches_give_the_masked_next_token_loss(tiny):
    """Labels follow the Hugging Face convention: the model's loss is the mean over supervised next tokens,
    and right padding leaves the logits of real tokens unchanged."""
    model, tok = tiny
    examples = tokenize_examples(RECORDS, tok, seqlen=1024)
    input_ids, attention_mask, labels = collate_examples(list(examples), pad_token_id(tok))
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        for row, (ids, _) in enumerate(examples):
            alone = model(input_ids=ids[None], use_cache=False).logits[0]
            assert torch.allclose(out.logits[row, : ids.numel()], alone, atol=1e-5)
    target = labels[:, 1:]
    manual = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, manual, atol=1e-5)


def test_json_and_jsonl_files_load_the_same_records(tmp_path):
    records = load_alpaca(SAMPLE)
    assert 6 <= len(records) <= 10
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    assert all(isinstance(v, str) for r in records for v in r.values())
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    raw = json.loads(SAMPLE.read_text())
    assert records[3]["input"] == "" and "input" not in raw[3]  # a missing input reads as ""

    lines = tmp_path / "sample.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in raw[:4]) + "\n\n" + json.dumps(raw[4]) + "\n")
    assert load_alpaca(lines) == records[:5]
    assert load_alpaca(str(lines)) == records[:5]


GOOD = '{"instruction": "a", "output": "b"}'  # one well-formed record


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.json", f'[{GOOD}, {{"instruction": "c"}}]', "record 2 has no 'output' string"),
        ("a.json", '[{"instruction": 3, "output": "b"}]', "record 1 has no 'instruction' string"),
        (
            "a.json",
            '[{"instruction": "a", "input": 4, "output": "b"}]',
            "record 1 has an 'input' that is int",
        ),
        ("a.json", f'[{GOOD}, "text"]', "record 2 is str, not an object"),
        ("a.json", GOOD, "must hold a JSON list of records, not a dict"),
        ("a.json", '[{"instruction": "a",\n "output": }]', r"is not valid JSON \(Expecting value: line 2"),
        ("a.json", "[]", "holds no records"),
        ("a.jsonl", f"{GOOD}\n\n{GOOD[:-1]}", "line 3 is not valid JSON"),
        ("a.jsonl", f'{GOOD}\n{{"output": "b"}}\n', "line 2 has no 'instruction' string"),
        ("a.jsonl", "\n\n", "holds no records"),
        ("a.txt", f"[{GOOD}]", r"must be an Alpaca \.json or \.jsonl file"),
    ],
)
def test_malformed_files_give_one_line_errors_naming_data_tuning(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"^data\.tuning='{re.escape(str(path))}': {message}") as info:
        load_alpaca(path)
    assert "\n" not in str(info.value) and info.value.key == "data.tuning"


def test_check_tuning_fails_before_any_weights_for_missing_or_bad_files(tmp_path, text_file):
    TextFiles(paths=[str(text_file)]).check_tuning()  # text: nothing to check
    TextFiles(paths=[str(text_file)], tuning=str(SAMPLE)).check_tuning()
    missing = tmp_path / "none.json"
    with pytest.raises(
        ConfigError, match=rf"^data\.tuning='{re.escape(str(missing))}': must be a readable Alpaca .json"
    ):
        TextFiles(paths=[str(text_file)], tuning=str(missing)).check_tuning()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(
        ConfigError, match=rf"^data\.tuning='{re.escape(str(bad))}': line 1 has no 'output' string$"
    ):
        TextFiles(paths=[str(text_file)], tuning=str(bad)).check_tuning()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("instruction_loss", "prompt", r"^data\.instruction_loss='prompt': allowed: response, all$"),
        ("instruction_loss", None, r"^data\.instruction_loss=None: allowed: response, all$"),
        ("template", "vicuna", r"^data\.template='vicuna': allowed: alpaca$"),
        ("template", ["alpaca"], r"^data\.template=\['alpaca'\]: allowed: alpaca$"),
        (
            "tuning",
            "notes.txt",
            r"^data\.tuning='notes\.txt': allowed: text, or a path to an Alpaca \.json or",
        ),
        ("tuning", "", r"^data\.tuning='': allowed: text, or a path"),
    ],
)
def test_bad_instruction_settings_are_config_errors(text_file, key, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        TextFiles(paths=[str(text_file)], **{key: value})
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_config_keys_reach_every_corpus(tmp_path, tok):
    for group in ("wiki", "text", "hf"):
        cfg = compose_config([f"data={group}"], tmp_path)
        assert (cfg.data.tuning, cfg.data.instruction_loss, cfg.data.template) == (
            "text",
            "response",
            "alpaca",
        )
    cfg = compose_config(
        ["data=text", f"data.paths=[{SAMPLE}]", f"data.tuning={SAMPLE}", "data.instruction_loss=all"],
        tmp_path,
    )
    corpus = instantiate(cfg.data, _convert_="all")  # as the pipeline builds it
    assert corpus.instruction_tuning and corpus.instruction_loss == "all"
    corpus.check_tuning()
    examples = corpus.tuning_examples(tok)
    assert len(examples) == len(load_alpaca(SAMPLE)) and all(
        ids.numel() <= corpus.seqlen for ids, _ in examples
    )
    assert all(torch.equal(ids, labels) for ids, labels in examples)  # loss on all tokens
    with pytest.raises(InstantiationException) as info:
        instantiate(compose_config(["data.instruction_loss=both"], tmp_path).data, _convert_="all")
    assert str(info.value.__cause__) == "data.instruction_loss='both': allowed: response, all"


def test_data_module_shuffles_deterministically_and_keeps_text_validation(tok):
    records = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
        for i in range(1, 10)
    ]
    examples = tokenize_examples(records, tok, seqlen=256)
    heads = {tuple(ids[-6:].tolist()): i for i, (ids, _) in enumerate(examples)}
    assert len(heads) == len(examples)
    val = torch.arange(40).view(5, 8)

    def order(seed):
        module = InstructionDataModule(examples, val, batch_size=2, seed=seed, pad_id=pad_token_id(tok))
        seen = []
        for input_ids, attention_mask, labels in module.train_dataloader():
            assert input_ids.shape == attention_mask.shape == labels.shape and input_ids.shape[0] == 2
            for row in range(2):
                n = int(attention_mask[row].sum())
                seen.append(heads[tuple(input_ids[row, n - 6 : n].tolist())])
        return seen

    first = order(0)
    assert first == order(0) and len(first) == 8 and len(set(first)) == 8  # drop_last, like text tuning
    assert first != order(1) and sorted(first) != first
    module = InstructionDataModule(examples, val, batch_size=2, seed=0)
    text = TuneDataModule(torch.zeros(4, 8, dtype=torch.long), val, batch_size=2, seed=0)
    got, want = list(module.val_dataloader()), list(text.val_dataloader())
    assert len(got) == len(want) == 3
    assert all(len(a) == 1 and torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True))
