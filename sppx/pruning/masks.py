"""Mask selection as pure functions. A mask is a bool tensor shaped like the weight: True = kept.

Ties are broken deterministically: a stable sort keeps the earlier (lower index) entry of equal
scores and prunes it first. This matters for quantized checkpoints, whose weights repeat values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sppx.errors import ConfigError, is_int, require


@dataclass(frozen=True)
class SparsityPattern:
    """``unstructured`` (the top-level ``sparsity`` is the fraction pruned) or ``nm`` (N of every M
    consecutive input weights pruned, in each row; sparsity is N/M)."""

    kind: str = "unstructured"
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        require(self.kind in ("unstructured", "nm"), "pattern.kind", self.kind, "allowed: unstructured, nm")
        if self.kind == "nm":
            require(is_int(self.m) and self.m >= 2, "pattern.m", self.m, "must be an integer >= 2")
            require(
                is_int(self.n) and 1 <= self.n < self.m,
                "pattern.n",
                self.n,
                f"must be an integer with 1 <= N < M (M={self.m})",
            )

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def target(self, sparsity: float) -> float:
        """The fraction of weights this pattern prunes at the requested ``sparsity``."""
        return self.n / self.m if self.is_nm else float(sparsity)

    def check_width(self, in_features: int, where: str) -> None:
        if self.is_nm and in_features % self.m:
            raise ConfigError(
                "pattern", self.label, f"M={self.m} must divide the input width {in_features} of {where}"
            )


def _prune_first(sorted_idx: torch.Tensor, k: int, shape, dim: int) -> torch.Tensor:
    keep = torch.ones(shape, dtype=torch.bool, device=sorted_idx.device)
    if k > 0:
        keep.scatter_(dim, sorted_idx.narrow(dim, 0, k), False)
    return keep


def per_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix (one threshold)."""
    k = math.floor(scores.numel() * sparsity)
    order = torch.sort(scores.flatten(), stable=True).indices
    return _prune_first(order, k, (scores.numel(),), 0).view_as(scores)


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(cols * sparsity)`` lowest scores of every row (each output row alike)."""
    k = math.floor(scores.shape[1] * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices
    return _prune_first(order, k, scores.shape, 1)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row and every group of ``m`` consecutive columns, prune the ``n`` lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the column count {cols} to be a multiple of M")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    return _prune_first(order, n, groups.shape, 2).view(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, *, per_row: bool
) -> torch.Tensor:
    """The keep-mask for ``scores`` under ``pattern``; unstructured masks compare per row or per matrix."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return per_row_mask(scores, sparsity) if per_row else per_matrix_mask(scores, sparsity)
