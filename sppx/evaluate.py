"""Token perplexity under one pinned protocol.

The evaluation text is concatenated and cut into non-overlapping windows of ``seqlen`` tokens; each
window predicts its ``seqlen - 1`` next tokens, and ``ppl = exp(sum NLL / number of predicted tokens)``.
The seqlen and the window count are reported with every number: they are only comparable under the
same protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sppx.errors import require, require_positive_int


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
        for batch in tqdm(
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


@dataclass
class EvalConfig:
    """The ``eval`` group: which models to measure and how much of the evaluation text to use."""

    seqlen: int = 256
    max_windows: int | None = 32  # null: every window of the evaluation part
    batch_size: int = 4
    dense: bool = True  # also measure the model before pruning
    pruned: bool = True  # also measure the model right after pruning

    def __post_init__(self):
        require_positive_int("eval.seqlen", self.seqlen, minimum=2)
        if self.max_windows is not None:
            require_positive_int("eval.max_windows", self.max_windows)
        require_positive_int("eval.batch_size", self.batch_size)
        for key in ("dense", "pruned"):
            require(
                isinstance(getattr(self, key), bool),
                f"eval.{key}",
                getattr(self, key),
                "must be true or false",
            )
