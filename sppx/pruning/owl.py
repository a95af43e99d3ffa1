"""Layer-wise sparsity allocation: uniform, or OWL (Yin et al. 2024, outlier-weighted layer-wise sparsity).

OWL measures each decoder block's outlier ratio D_l on the dense model: the fraction of the block's
Wanda scores |W_ij| * ||X_j|| (all targeted Linears together) above M times their mean. The ratios are
scaled to [0, 2 lambda], and a block's sparsity is the target minus its scaled ratio's deviation from
the mean: blocks with more outliers keep more weights, and the mean sparsity equals the target exactly
(every block has the same number of prunable weights in a Llama decoder; otherwise the mean is
weighted by them).
"""

from __future__ import annotations

import torch
from torch import nn

from sppx.anatomy import block_linears, decoder_layers, resolve_targets
from sppx.progress import bar
from sppx.pruning.base import Pruner
from sppx.pruning.sequential import capture_block_inputs, collect_stats, warn_if_emulated
from sppx.pruning.wanda import InputNorms, wanda_scores


class _Norms(Pruner):
    collects_stats = True

    def new_stats(self, linear: nn.Linear) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)


def outlier_ratio(weights: list[torch.Tensor], norms: list[torch.Tensor], m: float) -> float:
    """Fraction of the Wanda scores of all ``weights`` (with their input norms) above ``m`` x their mean."""
    scores = torch.cat([wanda_scores(w, n).flatten() for w, n in zip(weights, norms, strict=True)])
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(
    ratios: list[float], target: float, lam: float, sizes: list[int] | None = None
) -> list[float]:
    """Block sparsities from outlier ratios: min-max scaled to [0, 2 lambda], centred on the target.
    With ``sizes`` (prunable weights per block) the size-weighted mean equals the target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes if sizes is not None else [1] * len(ratios), dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    keep = scaled - (scaled * w).sum() / w.sum() + (1.0 - target)
    return [float(1.0 - k) for k in keep]


@torch.no_grad()
def block_outlier_ratios(
    model: nn.Module,
    targets: list[str],
    calibration: torch.Tensor,
    m: float,
    batch_size: int,
    progress: bool,
    compute_dtype: torch.dtype | None = None,
) -> tuple[list[float], list[int]]:
    """OWL's outlier ratio of every decoder block of the dense model, and its prunable weight count.
    One pass: each block's input norms are collected while it computes the next block's inputs (in
    ``compute_dtype``, see :func:`~sppx.pruning.sequential.calibration_forward`)."""
    targets = resolve_targets(model, targets)
    counter = _Norms(targets=targets, batch_size=batch_size)
    ratios: list[float] = []
    sizes: list[int] = []
    inputs = capture_block_inputs(model, calibration, batch_size)
    for block in bar(decoder_layers(model), desc="OWL outliers", disable=not progress, unit="block"):
        linears = block_linears(block, targets)
        outputs: list = []
        stats = collect_stats(block, linears, counter, inputs, outputs, compute_dtype)
        inputs = outputs
        norms = [s.norms for s in stats.values()]
        ratios.append(outlier_ratio([lin.weight for lin in linears.values()], norms, m))
        sizes.append(sum(lin.weight.numel() for lin in linears.values()))
    return ratios, sizes


def layer_sparsities(
    model: nn.Module,
    pruner: Pruner,
    target: float,
    calibration: torch.Tensor | None,
    progress: bool = True,
) -> list[float]:
    """The sparsity of every decoder block under ``pruner.allocation`` (uniform: the target everywhere)."""
    blocks = len(decoder_layers(model))
    if pruner.allocation == "uniform" or target == 0:
        return [float(target)] * blocks
    if calibration is None:
        raise ValueError("allocation=owl needs calibration windows")
    # OWL's pass runs where the model is (pruner.device moves blocks only for the prune itself).
    warn_if_emulated(pruner.forward_dtype, next(model.parameters()).device)
    ratios, sizes = block_outlier_ratios(
        model, pruner.targets, calibration, pruner.owl_m, pruner.batch_size, progress, pruner.forward_dtype
    )
    return owl_sparsities(ratios, target, pruner.owl_lambda, sizes)
