"""What a one-shot pruner is: which Linears it prunes, what it measures on calibration data, and how
it turns weights (and those statistics) into a mask."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sppx.anatomy import PROJECTIONS
from sppx.checks import check_device
from sppx.errors import is_number, require, require_positive_int
from sppx.pruning.masks import SparsityPattern

ALLOCATIONS = ("uniform", "owl")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16}  # besides null: the weights' own dtype


@dataclass
class Pruner:
    """Base class. ``targets`` are the Linear names pruned in every decoder block; ``batch_size`` is the
    number of calibration windows per forward pass."""

    targets: list = field(default_factory=lambda: list(PROJECTIONS))
    batch_size: int = 8
    true_sequential: bool = False  # prune [q,k,v] -> [o] -> [gate,up] -> [down], re-measuring in between
    allocation: str = "uniform"  # uniform | owl: how the target sparsity is spread over decoder blocks
    owl_m: float = 5.0  # OWL: a weight is an outlier when its Wanda score exceeds M x the block's mean
    owl_lambda: float = 0.08  # OWL: block sparsities span target +- lambda
    device: str | None = None  # where each block is pruned (the model stays where it was loaded)
    allow_empty: bool = False  # a mask that prunes a whole matrix stops the run unless this is true
    compute_dtype: str | None = None  # bfloat16: calibration forwards' matrix products in bf16 (autocast)

    name = "base"
    collects_stats = False  # True: statistics of each Linear's inputs are collected block by block
    updates_weights = False  # True: the kept weights are rewritten too (the mask alone is not the model)

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
        check_device("pruner.device", self.device)
        require(
            isinstance(self.true_sequential, bool),
            "pruner.true_sequential",
            self.true_sequential,
            "must be true or false",
        )
        require(
            self.allocation in ALLOCATIONS,
            "pruner.allocation",
            self.allocation,
            f"allowed: {', '.join(ALLOCATIONS)}",
        )
        require(is_number(self.owl_m) and self.owl_m > 0, "pruner.owl_m", self.owl_m, "must be a number > 0")
        require(
            is_number(self.owl_lambda) and 0 <= self.owl_lambda < 0.5,
            "pruner.owl_lambda",
            self.owl_lambda,
            "must be a number in [0, 0.5)",
        )
        require(
            self.compute_dtype is None or self.compute_dtype in COMPUTE_DTYPES,
            "pruner.compute_dtype",
            self.compute_dtype,
            f"allowed: null (the weights' own dtype), {', '.join(COMPUTE_DTYPES)}",
        )

    @property
    def forward_dtype(self) -> torch.dtype | None:
        """The dtype the calibration forwards compute in under autocast (None: the weights' own)."""
        return None if self.compute_dtype is None else COMPUTE_DTYPES[self.compute_dtype]

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration windows are needed: for statistics, or to measure OWL's outliers."""
        return self.collects_stats or self.allocation == "owl"

    def check_pattern(self, pattern: SparsityPattern, sparsity: float | None = None) -> None:
        """Raise ConfigError when this pruner cannot produce ``pattern`` at ``sparsity`` (checked before
        any work)."""
        require(
            not pattern.is_structured,
            "pattern",
            pattern.label,
            f"pruner={self.name} prunes single weights; pattern=structured needs a structured pruner "
            "(comp, nuteprune, llm_pruner, flap, shortgpt, magnitude_structured)",
        )
        if self.allocation == "owl":
            require(
                not pattern.is_nm,
                "pruner.allocation",
                self.allocation,
                f"allowed with pattern=unstructured only (pattern {pattern.label} fixes every layer's sparsity)",
            )
            if sparsity is not None:
                # Block sparsities span at most target +- 2 lambda (before centring): keep them in [0, 1).
                require(
                    sparsity - 2 * self.owl_lambda >= 0 and sparsity + 2 * self.owl_lambda < 1,
                    "pruner.owl_lambda",
                    self.owl_lambda,
                    f"must keep sparsity +- 2*lambda in [0, 1) (sparsity={sparsity:g}); lower it",
                )

    def new_stats(self, linear: nn.Linear):
        """A fresh statistics accumulator for ``linear`` (``.add(x)`` is fed every calibration input).
        Statistics depend on the inputs only, so Linears fed the same tensor share one accumulator."""
        return None

    def score(self, linear: nn.Linear, stats) -> torch.Tensor | None:
        """The importance of every weight (low: pruned first), or None for a pruner without a fixed score.
        Nested masks (the numerous-teacher schedule) order each row's pruned weights by it."""
        return None

    @torch.no_grad()
    def prune(self, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
        """Return the keep-mask of ``linear`` and zero its pruned weights in place."""
        raise NotImplementedError

    def prune_shared(
        self, linears: dict[str, nn.Linear], stats, sparsity: float, pattern: SparsityPattern
    ) -> dict[str, torch.Tensor]:
        """:meth:`prune` every Linear of ``linears``, all fed the same inputs (one ``stats``); a pruner that
        does them faster together overrides this (the same masks)."""
        return {name: self.prune(linear, stats, sparsity, pattern) for name, linear in linears.items()}


@torch.no_grad()
def apply_mask(linear: nn.Linear, keep: torch.Tensor) -> torch.Tensor:
    """Set pruned weights to exactly 0.0 and return the mask (on the CPU, where masks are kept).
    (A multiply is several times faster than masked_fill_ on the CPU; adding 0.0 turns -0.0 into 0.0.)"""
    linear.weight.mul_(keep.to(linear.weight.device)).add_(0.0)
    return keep.cpu()


@dataclass
class NoPruner(Pruner):
    """Keeps the model dense (``pruner=none``): tuning and evaluation still run."""

    name = "none"
