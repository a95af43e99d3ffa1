"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row; no weight update.

The variant (``use_variant``) gives rows different sparsities: in each row, the lowest scores are
pruned while their running sum stays <= alpha x the row's total score, with one alpha per matrix found
by bisection so the matrix sparsity is within ``variant_tolerance`` of the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from sppx.errors import require
from sppx.pruning.base import Pruner, apply_mask
from sppx.pruning.masks import SparsityPattern, select_mask

log = logging.getLogger(__name__)


class InputNorms:
    """Accumulates the squared L2 norm of every input feature over all calibration tokens (fp32)."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq_sum += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.to(weight.device)[None, :]


def cumulative_mask(
    scores: torch.Tensor, sparsity: float, tolerance: float = 0.001, max_steps: int = 60
) -> tuple[torch.Tensor, float]:
    """Wanda's variant: per row, prune the lowest scores whose cumulative sum is <= alpha x the row sum.
    alpha is bisected in [0, 0.8] from 0.4 (widened to 1.0 if 0.8 prunes too little) until the matrix
    sparsity is within ``tolerance`` of ``sparsity``. Returns (keep-mask, alpha)."""
    sorted_scores, order = torch.sort(scores.float(), dim=1, stable=True)
    cumsum = sorted_scores.cumsum(dim=1)
    row_sum = cumsum[:, -1:]

    def pruned_fraction(alpha: float) -> tuple[torch.Tensor, float]:
        pruned_sorted = cumsum <= alpha * row_sum
        return pruned_sorted, float(pruned_sorted.float().mean())

    low, high = 0.0, 0.8
    if pruned_fraction(high)[1] < sparsity - tolerance:
        low, high = 0.8, 1.0
    alpha = (low + high) / 2  # 0.4 first, as in the reference
    for _ in range(max_steps):
        pruned_sorted, frac = pruned_fraction(alpha)
        if abs(frac - sparsity) <= tolerance:
            break
        low, high = (low, alpha) if frac > sparsity else (alpha, high)
        alpha = (low + high) / 2
    else:
        log.warning(
            "Wanda variant: sparsity %.4f after %d bisection steps (target %.4f)", frac, max_steps, sparsity
        )
    keep = torch.ones_like(pruned_sorted)
    keep.scatter_(1, order, ~pruned_sorted)
    return keep, alpha


@dataclass
class WandaPruner(Pruner):
    """``pruner=wanda``; ``use_variant`` switches to the per-row cumulative-score rule (unstructured)."""

    use_variant: bool = False
    variant_tolerance: float = 0.001

    name = "wanda"
    collects_stats = True

    def __post_init__(self):
        super().__post_init__()
        require(
            isinstance(self.use_variant, bool),
            "pruner.use_variant",
            self.use_variant,
            "must be true or false",
        )
        require(
            isinstance(self.variant_tolerance, float) and 0 < self.variant_tolerance < 1,
            "pruner.variant_tolerance",
            self.variant_tolerance,
            "must be a number in (0, 1)",
        )

    def check_pattern(self, pattern: SparsityPattern, sparsity: float | None = None) -> None:
        super().check_pattern(pattern, sparsity)
        require(
            not (self.use_variant and pattern.is_nm),
            "pruner.use_variant",
            self.use_variant,
            f"allowed with pattern=unstructured only (pattern {pattern.label} fixes every group's zeros)",
        )

    def new_stats(self, linear: nn.Linear) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)

    def score(self, linear: nn.Linear, stats: InputNorms) -> torch.Tensor:
        return wanda_scores(linear.weight, stats.norms)

    @torch.no_grad()
    def prune(
        self, linear: nn.Linear, stats: InputNorms, sparsity: float, pattern: SparsityPattern
    ) -> torch.Tensor:
        scores = self.score(linear, stats)
        if self.use_variant and not pattern.is_nm:
            keep, _alpha = cumulative_mask(scores, sparsity, self.variant_tolerance)
            return apply_mask(linear, keep)
        return apply_mask(linear, select_mask(scores, sparsity, pattern, per_row=True))
