"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.pruning.base import Pruner, apply_mask
from sppx.pruning.masks import SparsityPattern, select_mask


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


@dataclass
class WandaPruner(Pruner):
    name = "wanda"
    needs_calibration = True

    def new_stats(self, linear: nn.Linear) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)

    @torch.no_grad()
    def prune(
        self, linear: nn.Linear, stats: InputNorms, sparsity: float, pattern: SparsityPattern
    ) -> torch.Tensor:
        scores = wanda_scores(linear.weight, stats.norms)
        return apply_mask(linear, select_mask(scores, sparsity, pattern, per_row=True))
