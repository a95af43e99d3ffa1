"""Magnitude pruning: score |W|, one threshold per matrix (unstructured) or per group of M (N:M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.pruning.base import Pruner, apply_mask
from sppx.pruning.masks import SparsityPattern, select_mask


@dataclass
class MagnitudePruner(Pruner):
    name = "magnitude"

    def score(self, linear: nn.Linear, stats) -> torch.Tensor:
        return linear.weight.detach().abs().float()

    @torch.no_grad()
    def prune(self, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
        scores = self.score(linear, stats)
        return apply_mask(linear, select_mask(scores, sparsity, pattern, per_row=False))
