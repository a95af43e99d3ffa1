"""A pruner of your own, outside sppx (docs/extending.md): it prunes the *largest* weights first, the
opposite of magnitude pruning. A poor pruner on purpose: its masks cannot be mistaken for sppx's own.

Select it with ``PYTHONPATH=tests/plugins python run.py --config-dir tests/plugins/my_plugin/conf
pruner=mine`` (or ``hydra.searchpath=[pkg://my_plugin.conf]`` in place of ``--config-dir``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.pruning.base import Pruner, apply_mask
from sppx.pruning.masks import SparsityPattern, select_mask


@dataclass
class LargestFirstPruner(Pruner):
    """Scores every weight by -|W|: the largest magnitudes are pruned first."""

    per_row: bool = False  # compare the scores within each output row (true) or over the whole matrix

    name = "largest_first"  # what results.json records as choices.pruner

    def score(self, linear: nn.Linear, stats) -> torch.Tensor:
        return -linear.weight.detach().abs().float()

    @torch.no_grad()
    def prune(self, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
        keep = select_mask(self.score(linear, stats), sparsity, pattern, per_row=self.per_row)
        return apply_mask(linear, keep)  # zeroes the pruned weights in place; returns the keep-mask
