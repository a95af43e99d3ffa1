"""Text corpora, their deterministic split, and the token windows every stage consumes.

A corpus (the ``data`` config group) yields documents. They are split *by document*, deterministically,
into disjoint parts: ``calibration`` (pruning statistics), ``validation`` (``val/ppl`` while tuning),
``evaluation`` (the reported perplexities) and ``tuning`` (the rest). The split is cached as JSON.

Calibration windows come from the ``calibration`` part by default; ``data.calibration`` can instead
name the tuning part, C4 (the reference setup of Wanda and SparseGPT; needs internet once, then it is
cached) or a text file of the user's.

Tuning uses the ``tuning`` part as language-modelling windows by default; ``data.tuning`` can instead name
an Alpaca ``.json`` / ``.jsonl`` file of instructions (see ``sppx.instructions``).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sppx.errors import ConfigError, require, require_positive_int
from sppx.files import file_digest, read_json_cache, write_cache
from sppx.instructions import LOSS_ON, SUFFIXES, TEMPLATES, Examples, load_alpaca, tokenize_examples
from sppx.loaders import tuning_loader
from sppx.wikitext import clean_wikitext, iter_articles

log = logging.getLogger(__name__)

PARTS = ("calibration", "validation", "evaluation", "tuning")
CALIBRATION_SOURCES = ("calibration", "tuning", "c4")  # or a path to a text file
TUNING_SOURCES = ("text",)  # or a path to an Alpaca .json / .jsonl file
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"  # the shard Wanda and SparseGPT calibrate on
C4_DOCUMENTS = 5000  # documents read (streamed) from its start
_SPLIT_VERSION = 1  # bump when cleaning or splitting changes, so caches are rebuilt


@dataclass
class Corpus:
    """Window and split settings shared by every corpus; subclasses say where documents come from."""

    name: str = "corpus"
    seqlen: int = 256  # tokens per calibration / tuning window
    nsamples: int = 32  # calibration windows
    calibration: str = "calibration"  # calibration | tuning | c4 | a path to a text file
    batch_size: int = 4  # tuning batch
    val_windows: int = 8  # validation windows used for val/ppl (null: all)
    split: dict = field(default_factory=lambda: {"calibration": 0.1, "validation": 0.05, "evaluation": 0.15})
    tuning: str = "text"  # text (the tuning part, as windows) | a path to an Alpaca .json / .jsonl file
    instruction_loss: str = "response"  # instruction examples learn: response (the output) | all tokens
    template: str = "alpaca"  # the prompt instruction examples are written in

    def __post_init__(self):
        require_positive_int("data.seqlen", self.seqlen, minimum=2)
        require_positive_int("data.nsamples", self.nsamples)
        require(
            isinstance(self.calibration, str) and self.calibration.strip() != "",
            "data.calibration",
            self.calibration,
            f"allowed: {', '.join(CALIBRATION_SOURCES)}, or a path to a text file",
        )
        require_positive_int("data.batch_size", self.batch_size)
        if self.val_windows is not None:
            require_positive_int("data.val_windows", self.val_windows)
        require(
            isinstance(self.split, dict) and set(self.split) <= set(PARTS) - {"tuning"},
            "data.split",
            self.split,
            "must map calibration/validation/evaluation to fractions",
        )
        for part, frac in self.split.items():
            require(isinstance(frac, float) and 0 < frac < 1, f"data.split.{part}", frac, "must be in (0, 1)")
        require(sum(self.split.values()) < 1, "data.split", self.split, "fractions must sum to less than 1")
        require(
            isinstance(self.tuning, str)
            and (self.tuning in TUNING_SOURCES or self.tuning.lower().endswith(SUFFIXES)),
            "data.tuning",
            self.tuning,
            f"allowed: {', '.join(TUNING_SOURCES)}, or a path to an Alpaca .json or .jsonl file",
        )
        require(
            isinstance(self.instruction_loss, str) and self.instruction_loss in LOSS_ON,
            "data.instruction_loss",
            self.instruction_loss,
            f"allowed: {', '.join(LOSS_ON)}",
        )
        require(
            isinstance(self.template, str) and self.template in TEMPLATES,
            "data.template",
            self.template,
            f"allowed: {', '.join(TEMPLATES)}",
        )

    @property
    def instruction_tuning(self) -> bool:
        """Whether tuning reads an instruction file (``data.tuning`` is a path) rather than the text."""
        return self.tuning not in TUNING_SOURCES

    # --- what subclasses provide
    def check(self) -> None:
        """Cheap checks that the source can be read (paths exist); raises ConfigError."""

    def check_calibration(self, cache_dir: Path | None) -> None:
        """Check (and for C4, fetch) the calibration source before any weights are read."""
        if self.calibration == "c4":
            c4_documents(cache_dir)
        elif self.calibration not in CALIBRATION_SOURCES:
            path = Path(os.path.expanduser(self.calibration))
            require(
                path.is_file() and os.access(path, os.R_OK),
                "data.calibration",
                self.calibration,
                f"allowed: {', '.join(CALIBRATION_SOURCES)}, or a path to a readable text file",
            )

    def check_tuning(self) -> None:
        """When ``data.tuning`` is a path: check that it is a readable, well-formed Alpaca file (before any
        weights are read); raises ConfigError naming ``data.tuning``."""
        if not self.instruction_tuning:
            return
        path = Path(os.path.expanduser(self.tuning))
        require(
            path.is_file() and os.access(path, os.R_OK),
            "data.tuning",
            self.tuning,
            "must be a readable Alpaca .json or .jsonl file (or text: the corpus's tuning part)",
        )
        load_alpaca(self.tuning)

    def tuning_examples(self, tokenizer) -> Examples:
        """The instruction examples of ``data.tuning`` as ``(input_ids, labels)`` pairs of at most
        ``data.seqlen`` tokens (see ``sppx.instructions.tokenize_examples``)."""
        require(self.instruction_tuning, "data.tuning", self.tuning, "names no instruction file")
        return tokenize_examples(
            load_alpaca(self.tuning), tokenizer, self.seqlen, self.instruction_loss, self.template
        )

    def calibration_stream(self, tokens: TokenizedCorpus, tokenizer, cache_dir: Path | None) -> torch.Tensor:
        """The token stream calibration windows are drawn from (see ``data.calibration``)."""
        if self.calibration in ("calibration", "tuning"):
            return tokens.streams[self.calibration]
        if self.calibration == "c4":
            return encode_documents(tokenizer, c4_documents(cache_dir))
        blocks = text_blocks(Path(os.path.expanduser(self.calibration)))
        return encode_documents(tokenizer, [b for b in blocks if b])

    def fingerprint(self) -> str:
        """Identifies the source's content, for the split cache."""
        raise NotImplementedError

    def documents(self) -> list[tuple[str, str]]:
        """(key, text) pairs; the key decides the document's part."""
        raise NotImplementedError

    # --- shared
    def parts(self, cache_dir: Path | None = None) -> dict[str, list[str]]:
        """The documents of each part, from the cache when it matches."""
        key = hashlib.sha256(
            json.dumps([_SPLIT_VERSION, self.fingerprint(), self.split], sort_keys=True).encode()
        ).hexdigest()[:16]
        path = Path(cache_dir) / "data" / f"{self.name}-{key}.json" if cache_dir else None
        cached = read_json_cache(path, valid_parts) if path is not None else None
        if cached is not None:
            return cached
        docs = self.documents()
        parts = split_documents(docs, self.split)
        empty = [part for part in PARTS if not parts[part]]
        if empty:
            raise ConfigError(
                "data",
                self.name,
                f"has {len(docs)} documents: too few to give every part one "
                f"(empty: {', '.join(empty)}); give more text (documents are blank-line-separated blocks)",
            )
        if path is not None:
            write_cache(path, json.dumps(parts, indent=1))
        return parts


def valid_documents(content) -> bool:
    return isinstance(content, list) and all(isinstance(d, str) for d in content)


def valid_parts(content) -> bool:
    """What ``parts`` caches: every part, each a list of document texts."""
    return (
        isinstance(content, dict)
        and sorted(content) == sorted(PARTS)
        and all(valid_documents(docs) for docs in content.values())
    )


def split_documents(docs: list[tuple[str, str]], fractions: dict[str, float]) -> dict[str, list[str]]:
    """Deterministic split by document: documents are ordered by a hash of their key, then dealt out
    in that order so each part gets its fraction of the characters (``tuning`` takes the rest).
    Every part gets at least one document when there are enough of them."""
    docs = [(k, t) for k, t in docs if t.strip()]
    order = sorted(docs, key=lambda kt: hashlib.sha256(kt[0].encode()).hexdigest())
    total = sum(len(t) for _, t in order)
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    i = 0
    for part in PARTS[:-1]:
        budget, got = fractions.get(part, 0.0) * total, 0
        while i < len(order) - 1 and (not out[part] or got + len(order[i][1]) / 2 <= budget) and budget > 0:
            out[part].append(order[i][1])
            got += len(order[i][1])
            i += 1
    out["tuning"] = [t for _, t in order[i:]]
    return out


def text_blocks(path: Path) -> list[str]:
    """A UTF-8 text file's blank-line-separated blocks, stripped (empty ones kept, so indices are stable)."""
    return [b.strip() for b in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]


# --------------------------------------------------------------------------- sources
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def embedded_wiki_dump() -> Path:
    """The Wikipedia extract shipped in the gensim wheel (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data", "wiki", "needs the package gensim (it ships the text): pip install --no-deps gensim"
        )
    path = Path(spec.submodule_search_locations[0]) / WIKI_DUMP
    if not path.is_file():
        raise ConfigError("data", "wiki", f"{path} is missing; reinstall gensim")
    return path


@dataclass
class WikiText(Corpus):
    """The default: ~100 English Wikipedia articles (CC BY-SA) from the gensim wheel, markup stripped."""

    name: str = "wiki"

    def check(self) -> None:
        embedded_wiki_dump()

    def fingerprint(self) -> str:
        return file_digest(embedded_wiki_dump())

    def documents(self) -> list[tuple[str, str]]:
        return [(title, clean_wikitext(markup)) for title, markup in iter_articles(embedded_wiki_dump())]


@dataclass
class TextFiles(Corpus):
    """The user's own UTF-8 text files (paths or globs). Each blank-line-separated block is a document."""

    name: str = "text"
    paths: list = field(default_factory=list)

    def _files(self) -> list[Path]:
        require(
            isinstance(self.paths, list) and len(self.paths) > 0,
            "data.paths",
            self.paths,
            "must list one or more readable text files or globs",
        )
        files = []
        for pattern in self.paths:
            require(
                isinstance(pattern, str) and pattern != "",
                "data.paths",
                pattern,
                "must be a file path or glob",
            )
            matches = sorted(glob.glob(os.path.expanduser(pattern))) or [os.path.expanduser(pattern)]
            for match in matches:
                path = Path(match)
                require(
                    path.is_file() and os.access(path, os.R_OK),
                    "data.paths",
                    pattern,
                    "must be a readable text file (or a glob matching some)",
                )
                files.append(path)
        return files

    def check(self) -> None:
        self._files()

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(f"{p}:{file_digest(p)}" for p in self._files()).encode()).hexdigest()

    def documents(self) -> list[tuple[str, str]]:
        docs = []
        for path in self._files():
            docs += [(f"{path}#{i}", b) for i, b in enumerate(text_blocks(path)) if b]
        return docs


@dataclass
class HubDataset(Corpus):
    """A ``datasets`` dataset (hub name such as ``allenai/c4``, or a local builder like ``json``)."""

    name: str = "hf"
    path: str = ""
    config_name: str | None = None
    data_files: str | list | None = None
    hf_split: str = "train"
    text_field: str = "text"
    max_documents: int | None = 20000

    def check(self) -> None:
        require(
            isinstance(self.path, str) and self.path != "",
            "data.path",
            self.path,
            "must name a datasets hub dataset (e.g. allenai/c4) or a builder (json, text)",
        )
        if self.max_documents is not None:
            require_positive_int("data.max_documents", self.max_documents)

    def fingerprint(self) -> str:
        return json.dumps(
            [self.path, self.config_name, self.data_files, self.hf_split, self.text_field, self.max_documents]
        )

    def documents(self) -> list[tuple[str, str]]:
        import datasets

        split = self.hf_split if self.max_documents is None else f"{self.hf_split}[:{self.max_documents}]"
        try:
            ds = datasets.load_dataset(self.path, self.config_name, data_files=self.data_files, split=split)
        except Exception as err:  # the datasets library raises many types; one line is what users need
            raise ConfigError(
                "data.path",
                self.path,
                f"could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            ) from None
        require(
            self.text_field in ds.column_names,
            "data.text_field",
            self.text_field,
            f"allowed: {', '.join(ds.column_names)}",
        )
        return [(f"{i}", row) for i, row in enumerate(ds[self.text_field]) if isinstance(row, str)]


def c4_documents(cache_dir: Path | None, count: int = C4_DOCUMENTS) -> list[str]:
    """The first ``count`` documents of C4's first English training shard, streamed once and cached."""
    path = Path(cache_dir) / "data" / f"c4-{C4_SHARD.replace('/', '_')}-{count}.json" if cache_dir else None
    cached = read_json_cache(path, valid_documents) if path is not None else None
    if cached is not None:
        return cached
    try:
        import datasets

        stream = datasets.load_dataset(
            "allenai/c4", data_files={"train": C4_SHARD}, split="train", streaming=True
        )
        docs = [row["text"] for _, row in zip(range(count), stream, strict=False)]
    except Exception as err:  # the hub client raises many types; one line is what users need
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            "data.calibration",
            "c4",
            f"could not be loaded ({first}): it needs internet access to huggingface.co once "
            "(then it is cached); offline, use calibration, tuning or a text file",
        ) from None
    if path is not None:
        write_cache(path, json.dumps(docs, indent=1))
    return docs


# --------------------------------------------------------------------------- tokens and windows
def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long 1-D token stream: documents joined by the end-of-text token (no other specials)."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
    for chunk in encoded:
        ids += chunk + sep
    return torch.tensor(ids, dtype=torch.long)


def consecutive_windows(stream: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of the stream (the remainder is dropped)."""
    count = stream.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    return stream[: count * seqlen].view(count, seqlen)


def calibration_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (as in the Wanda/SparseGPT samplers)."""
    if stream.numel() <= seqlen:
        raise ConfigError(
            "data.seqlen", seqlen, f"must be shorter than the calibration text ({stream.numel()} tokens)"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def windows_digest(windows: torch.Tensor) -> str:
    """A short fingerprint of token windows: equal digests mean identical calibration data."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass
class TokenizedCorpus:
    """Token streams of every part of a corpus."""

    streams: dict[str, torch.Tensor]

    @classmethod
    def build(cls, corpus: Corpus, tokenizer, cache_dir: Path | None) -> TokenizedCorpus:
        parts = corpus.parts(cache_dir)
        return cls({part: encode_documents(tokenizer, docs) for part, docs in parts.items()})

    def sizes(self) -> dict[str, int]:
        return {part: int(s.numel()) for part, s in self.streams.items()}


class TuneDataModule(pl.LightningDataModule):
    """Tuning windows (shuffled with a seed; resumable, split across processes: ``sppx.loaders``) and
    validation windows for ``val/ppl``."""

    def __init__(self, train_windows: torch.Tensor, val_windows: torch.Tensor, batch_size: int, seed: int):
        super().__init__()
        self.train_windows, self.val_windows = train_windows, val_windows
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return tuning_loader(TensorDataset(self.train_windows), self.batch_size, self.seed, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val_windows), batch_size=self.batch_size)
