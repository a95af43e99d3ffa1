"""What a one-shot pruner is: which Linears it prunes, what it measures on calibration data, and how
it turns weights (and those statistics) into a mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sppx.errors import require, require_positive_int
from sppx.pruning.masks import SparsityPattern

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Pruner:
    """Base class. ``targets`` are the Linear names pruned in every decoder block; ``batch_size`` is the
    number of calibration windows per forward pass."""

    targets: list = field(default_factory=lambda: list(PROJECTIONS))
    batch_size: int = 8
    true_sequential: bool = False  # prune [q,k,v] -> [o] -> [gate,up] -> [down], re-measuring in between

    name = "base"
    needs_calibration = False  # True: statistics are collected block by block (sequential engine)

    def __post_init__(self):
        require(
            isinstance(self.targets, list)
            and len(self.targets) > 0
            and all(isinstance(t, str) for t in self.targets),
            "pruner.targets",
            self.targets,
            f"must list Linear names such as {', '.join(PROJECTIONS)}",
        )
        require_positive_int("pruner.batch_size", self.batch_size)
        require(
            isinstance(self.true_sequential, bool),
            "pruner.true_sequential",
            self.true_sequential,
            "must be true or false",
        )

    def check_pattern(self, pattern: SparsityPattern) -> None:
        """Raise ConfigError when this pruner cannot produce ``pattern`` (checked before any work)."""

    def new_stats(self, linear: nn.Linear):
        """A fresh statistics accumulator for ``linear``, fed every calibration input (or None)."""
        return None

    @torch.no_grad()
    def prune(self, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
        """Return the keep-mask of ``linear`` and zero its pruned weights in place."""
        raise NotImplementedError


@torch.no_grad()
def apply_mask(linear: nn.Linear, keep: torch.Tensor) -> torch.Tensor:
    """Set pruned weights to exactly 0.0 and return the mask (on the CPU, where masks are kept)."""
    linear.weight.masked_fill_(~keep.to(linear.weight.device), 0.0)
    return keep.cpu()


@dataclass
class NoPruner(Pruner):
    """Keeps the model dense (``pruner=none``): tuning and evaluation still run."""

    name = "none"
