"""Token perplexity under one pinned protocol.

The evaluation text is concatenated and cut into non-overlapping windows of ``seqlen`` tokens; each
window predicts its ``seqlen - 1`` next tokens, and ``ppl = exp(sum NLL / number of predicted tokens)``.
The seqlen and the window count are reported with every number: they are only comparable under the
same protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sppx.errors import require, require_positive_int
from sppx.progress import bar


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (fp32) and the number of predicted tokens. ``labels``
    are the input ids, or ids with -100 where no prediction is scored (prompts, padding)."""
    pred = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, reduction="sum", ignore_index=-100), int((target != -100).sum())


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, desc: str = "ppl", progress: bool = True
) -> dict:
    """Perplexity of ``model`` on ``windows`` (n x seqlen), with the protocol's bookkeeping."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows: the evaluation text is shorter than one window")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = torch.zeros((), dtype=torch.float64), 0
    try:
        for batch in bar(
            windows.split(batch_size), desc=desc, disable=not progress, leave=False, unit="batch"
        ):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            batch_nll, count = next_token_nll(logits, batch)
            nll += batch_nll.double().cpu()
            tokens += count
    finally:
        model.train(was_training)
    mean = nll.item() / tokens
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": tokens,
        "windows": windows.shape[0],
        "seqlen": windows.shape[1],
    }


STAGES = ("dense", "pruned", "final")


def _require_task_list(key: str, value) -> None:
    require(
        isinstance(value, list) and all(isinstance(t, str) and t.strip() for t in value),
        key,
        value,
        "must list task names (lm-eval tasks, sppx_wiki_cloze) or task YAML paths",
    )


@dataclass
class EvalConfig:
    """The ``eval`` group: which models to measure and how much of the evaluation text to use; zero-shot
    tasks (``sppx.zeroshot``) and inference speed (``sppx.speed``)."""

    seqlen: int = 256
    max_windows: int | None = 32  # null: every window of the evaluation part
    batch_size: int = 4
    dense: bool = True  # also measure the model before pruning
    pruned: bool = True  # also measure the model right after pruning
    tasks: list = field(default_factory=list)  # zero-shot tasks; a missing dataset fails the run
    tasks_optional: list = field(default_factory=list)  # zero-shot tasks skipped when their data is missing
    task_stages: list = field(default_factory=lambda: ["dense", "final"])  # which models run the tasks
    task_limit: int | None = None  # at most this many examples per task (null: all)
    task_batch_size: int = 8
    speed: bool = False  # prefill and decode tokens/s of the final model vs the dense one
    speed_repeats: int = 3
    speed_prefill_tokens: int = 256
    speed_decode_tokens: int = 64

    def __post_init__(self):
        require_positive_int("eval.seqlen", self.seqlen, minimum=2)
        if self.max_windows is not None:
            require_positive_int("eval.max_windows", self.max_windows)
        require_positive_int("eval.batch_size", self.batch_size)
        for key in ("dense", "pruned", "speed"):
            require(
                isinstance(getattr(self, key), bool),
                f"eval.{key}",
                getattr(self, key),
                "must be true or false",
            )
        _require_task_list("eval.tasks", self.tasks)
        _require_task_list("eval.tasks_optional", self.tasks_optional)
        require(
            isinstance(self.task_stages, list)
            and len(self.task_stages) > 0
            and set(self.task_stages) <= set(STAGES),
            "eval.task_stages",
            self.task_stages,
            f"must list some of: {', '.join(STAGES)}",
        )
        if self.task_limit is not None:
            require_positive_int("eval.task_limit", self.task_limit)
        for key in ("task_batch_size", "speed_repeats", "speed_prefill_tokens", "speed_decode_tokens"):
            require_positive_int(f"eval.{key}", getattr(self, key))

    @property
    def zero_shot(self) -> bool:
        return bool(self.tasks or self.tasks_optional)

    def tasks_at(self, stage: str) -> bool:
        """Whether the zero-shot tasks run on the model of ``stage`` (dense, pruned, final); ``eval.dense``
        and ``eval.pruned`` false switch those stages off for every measurement."""
        enabled = {"dense": self.dense, "pruned": self.pruned, "final": True}[stage]
        return self.zero_shot and enabled and stage in self.task_stages
