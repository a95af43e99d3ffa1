"""One-shot pruning: mask selection (masks), the calibration engine (sequential), and the pruners."""

from sppx.anatomy import PROJECTIONS, prunable_linears
from sppx.pruning.base import NoPruner, Pruner
from sppx.pruning.magnitude import MagnitudePruner
from sppx.pruning.masks import SparsityPattern
from sppx.pruning.sequential import prune_model
from sppx.pruning.sparsegpt import SparseGPTPruner
from sppx.pruning.wanda import WandaPruner

__all__ = [
    "PROJECTIONS",
    "MagnitudePruner",
    "NoPruner",
    "Pruner",
    "SparseGPTPruner",
    "SparsityPattern",
    "WandaPruner",
    "prunable_linears",
    "prune_model",
]
