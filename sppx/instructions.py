"""Instruction-tuning data (Alpaca format) as an alternative to plain text for recovery tuning.

``data.tuning`` names an Alpaca file: a ``.json`` list of records or a ``.jsonl`` file with one record per
line, each with the strings ``instruction`` and ``output`` and optionally ``input``. Every record becomes
one example, ``prompt + output + end-of-text``, cut to ``data.seqlen`` tokens. Its labels are its token
ids (the Hugging Face convention: the loss shifts them by one), with the prompt's positions set to -100
when ``data.instruction_loss=response`` so only the response is learnt.

Batches are ``(input_ids, attention_mask, labels)``, right-padded to their longest example; validation
stays perplexity on the corpus's validation text, in ``(input_ids,)`` windows as for text tuning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sppx.errors import ConfigError
from sppx.loaders import tuning_loader

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (the default ignore_index of cross_entropy)
LOSS_ON = ("response", "all")  # data.instruction_loss: which tokens are learnt
SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class PromptTemplate:
    """How a record's instruction (and input, when it has one) is turned into the prompt."""

    with_input: str  # formatted with {instruction} and {input}
    no_input: str  # formatted with {instruction}

    def prompt(self, instruction: str, input: str = "") -> str:
        if input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


TEMPLATES: dict[str, PromptTemplate] = {
    # The prompt of Stanford Alpaca.
    "alpaca": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        no_input=(
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
}


# --------------------------------------------------------------------------- reading
def _bad(path, what: str) -> ConfigError:
    return ConfigError("data.tuning", str(path), what)


def _record(obj, where: str, path) -> dict[str, str]:
    """One record, checked and reduced to instruction / input / output (other fields are ignored)."""
    if not isinstance(obj, dict):
        raise _bad(path, f"{where} is {type(obj).__name__}, not an object with 'instruction' and 'output'")
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str):
            raise _bad(path, f"{where} has no '{key}' string")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _bad(path, f"{where} has an 'input' that is {type(extra).__name__}, not a string")
    return {"instruction": obj["instruction"], "input": extra or "", "output": obj["output"]}


def load_alpaca(path: str | os.PathLike) -> list[dict[str, str]]:
    """The records of an Alpaca ``.json`` (a list of objects) or ``.jsonl`` (an object per line) file, as
    ``{"instruction", "input", "output"}`` dicts (a missing or null ``input`` is ``""``).

    Raises a one-line ``ConfigError("data.tuning", path, ...)`` saying what is wrong with the file."""
    file = Path(os.path.expanduser(str(path)))
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise _bad(path, "must be an Alpaca .json or .jsonl file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _bad(path, "is not UTF-8 text") from None
    except OSError as err:
        raise _bad(path, f"cannot be read ({err.strerror or type(err).__name__})") from None

    records = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise _bad(path, f"is not valid JSON ({err})") from None
        except RecursionError:
            raise _bad(path, "is nested too deeply to be Alpaca records") from None
        if not isinstance(data, list):
            raise _bad(path, f"must hold a JSON list of records, not a {type(data).__name__}")
        records = [_record(obj, f"record {i}", path) for i, obj in enumerate(data, start=1)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad(path, f"line {number} is not valid JSON ({err})") from None
            except RecursionError:
                raise _bad(path, f"line {number} is nested too deeply to be an Alpaca record") from None
            records.append(_record(obj, f"line {number}", path))
    if not records:
        raise _bad(path, "holds no records")
    return records


# --------------------------------------------------------------------------- tokens
class Examples(list):
    """Tokenised examples, ``(input_ids, labels)`` pairs; ``dropped`` counts the records left out because
    truncation to ``seqlen`` removed every supervised token."""

    def __init__(self, items=(), dropped: int = 0):
        super().__init__(items)
        self.dropped = dropped


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else end-of-text, else 0 (pads are masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_examples(
    records: list[dict[str, str]], tokenizer, seqlen: int, loss_on: str = "response", template: str = "alpaca"
) -> Examples:
    """One ``(input_ids, labels)`` pair of 1-D long tensors per record: the prompt's tokens, the output's
    tokens and the end-of-text token (when the tokenizer has one), cut to ``seqlen`` tokens.

    Prompt and output are tokenised separately (no special tokens) and concatenated, so the prompt boundary
    is exact. ``labels`` equals ``input_ids`` except on the prompt, which is -100 for ``loss_on="response"``.
    A record whose truncated example has no supervised token that is predicted (position >= 1) is
    dropped and counted in the result's ``dropped``; when that leaves none, ``data.seqlen`` is too short."""
    if loss_on not in LOSS_ON:
        raise ConfigError("data.instruction_loss", loss_on, f"allowed: {', '.join(LOSS_ON)}")
    if template not in TEMPLATES:
        raise ConfigError("data.template", template, f"allowed: {', '.join(TEMPLATES)}")
    if not records:
        return Examples()
    form = TEMPLATES[template]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [form.prompt(r["instruction"], r.get("input") or "") for r in records]
    outputs = [r["output"] for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"]

    examples, dropped = [], 0
    for prompt, output in zip(prompt_ids, output_ids, strict=True):
        ids = (prompt + output + eos)[:seqlen]
        labels = list(ids)
        if loss_on == "response":
            masked = min(len(prompt), len(labels))
            labels[:masked] = [IGNORE_INDEX] * masked
        if all(label == IGNORE_INDEX for label in labels[1:]):  # the first token is never predicted
            dropped += 1
            continue
        examples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    if dropped:
        log.warning(
            "%d of %d instruction examples dropped: their prompt fills data.seqlen=%d tokens",
            dropped,
            len(records),
            seqlen,
        )
    if not examples:
        raise ConfigError(
            "data.seqlen",
            seqlen,
            f"leaves no response token in any of the {len(records)} instruction examples; raise it",
        )
    return Examples(examples, dropped)


def collate_examples(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)``, right-padded to the batch's longest example: padding has
    id ``pad_id``, attention 0 and label -100."""
    longest = max(ids.numel() for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        n = ids.numel()
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = lab
    return input_ids, attention_mask, labels


class PadCollate:
    """``collate_examples`` with a fixed pad id (a class rather than a closure, so loaders can pickle it)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate_examples(batch, self.pad_id)


class InstructionDataModule(pl.LightningDataModule):
    """Instruction examples (shuffled with a seed, padded per batch) and validation windows for ``val/ppl``.

    Train batches are ``(input_ids, attention_mask, labels)``; validation batches are ``(input_ids,)``
    windows, exactly as in ``TuneDataModule``."""

    def __init__(
        self,
        train_examples: list[tuple[torch.Tensor, torch.Tensor]],
        val_windows: torch.Tensor,
        batch_size: int,
        seed: int,
        pad_id: int = 0,
    ):
        super().__init__()
        self.train_examples, self.val_windows = list(train_examples), val_windows
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id

    def train_dataloader(self) -> DataLoader:
        return tuning_loader(
            self.train_examples, self.batch_size, self.seed, self.trainer, collate_fn=PadCollate(self.pad_id)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val_windows), batch_size=self.batch_size)
