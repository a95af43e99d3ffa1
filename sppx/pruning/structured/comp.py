"""COMP: post-training structured pruning with forward passes only (no gradients, no fine-tuning).

1. Layers: the ``layer_share`` of the budget spent on whole layers removes those with the lowest Block
   Influence (1 - mean cos(h_in, h_out)), measured once on the calibration windows.
2. Neurons (and heads, with ``units`` containing ``heads``) of the kept layers, one layer at a time, each
   layer seeing the already pruned layers before it. For a Linear fed inputs X (tokens x columns) with
   G = X^T X + lambda I, the condition-based importance of column j is ||W[:, j]||^2 / [G^-1]_jj: the
   output error left after removing j when the other columns are re-fitted optimally (redundant,
   badly conditioned columns score low). A head is a block B of o_proj columns:
   tr(W_B ([G^-1]_BB)^-1 W_B^T). Neurons are scored on down_proj, heads on o_proj.
3. Mask tuning: one scale per kept unit, re-fitted by least squares so the pruned Linear's output
   matches the dense Linear's output on the same calibration inputs, then folded into the weights
   (``mask_tuning=columns`` re-fits the kept columns themselves instead).
   A solve is abandoned (scales 1) when it is ill-conditioned (any |m| > ``max_scale`` or not finite)
   or when it would not lower the error on the windows it is fitted on, so tuning never increases it
   there. The units are chosen on every calibration window; the scales are fitted on all but the last
   ``holdout`` of them, and each layer's output error before and after tuning is reported on both the
   fit windows' tokens and the held-out windows' tokens (``fit_error_*``, ``heldout_error_*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.anatomy import Dims, decoder_layers, family_of
from sppx.errors import is_number, require, require_fraction
from sppx.pruning.sequential import capture_block_inputs, collect_stats, run_blocks
from sppx.pruning.structured.base import (
    OneShotStructured,
    StatsFactory,
    StructuredContext,
    block_influence,
)
from sppx.pruning.structured.units import (
    Budget,
    Structure,
    heads_to_remove,
    keep_all_but,
    layers_to_remove,
    lowest_units,
)


def damped_inverse(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """(G + lambda I)^-1 with lambda = ``damp`` x mean(diag G), in float64."""
    g = gram.double()
    lam = damp * float(torch.diagonal(g).mean()) + 1e-12
    return torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=g.dtype))


def condition_scores(weight: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Per input column j: ||W[:, j]||^2 / [G^-1]_jj (on the Gram matrix's device: the CPU)."""
    inv = damped_inverse(gram, damp)
    return weight.detach().double().to(inv.device).pow(2).sum(dim=0) / torch.diagonal(inv)


def condition_block_scores(weight: torch.Tensor, gram: torch.Tensor, damp: float, block: int) -> torch.Tensor:
    """Per block of ``block`` consecutive input columns B: tr(W_B ([G^-1]_BB)^-1 W_B^T) (on the Gram
    matrix's device: the CPU)."""
    inv = damped_inverse(gram, damp)
    w = weight.detach().double().to(inv.device)
    scores = []
    for b in range(w.shape[1] // block):
        cols = slice(b * block, (b + 1) * block)
        sub = torch.linalg.inv(inv[cols, cols])
        scores.append(torch.trace(w[:, cols] @ sub @ w[:, cols].T))
    return torch.stack(scores)


@dataclass
class ScaleFit:
    scales: torch.Tensor  # one per kept unit
    error_before: float  # ||Y - Y_pruned||^2 on the calibration inputs with scales 1
    error_after: float  # with the fitted scales (== error_before when aborted)
    aborted: str | None  # why the fit was not used, or None


def fit_unit_scales(
    weight: torch.Tensor, gram: torch.Tensor, unit_of_column: torch.Tensor, kept: list[int], max_scale: float
) -> ScaleFit:
    """Least-squares scales m (one per kept unit) minimising ||X W^T - sum_u m_u X_u W_u^T||^2, where the
    first term is the dense Linear (every column) and X_u W_u^T is unit u's share of the output.

    With M = G o (W^T W) (G = X^T X) and B the column -> kept-unit indicator, the error is
    1^T M 1 - 2 m^T B^T M 1 + m^T B^T M B m; its minimiser solves (B^T M B) m = B^T M 1.
    """
    w = weight.detach().double().cpu()
    m_full = gram.double() * (w.T @ w)
    units = int(unit_of_column.max()) + 1
    # B^T M B and B^T M 1 over all units by summing rows and columns per unit, then the kept ones.
    per_unit = torch.zeros(units, m_full.shape[1], dtype=torch.float64).index_add_(0, unit_of_column, m_full)
    kept_t = torch.tensor(kept, dtype=torch.long)
    a = torch.zeros(units, units, dtype=torch.float64).index_add_(1, unit_of_column, per_unit)[kept_t][
        :, kept_t
    ]
    c = per_unit.sum(dim=1)[kept_t]
    total = float(m_full.sum())

    def error(m: torch.Tensor) -> float:
        return total - 2 * float(c @ m) + float(m @ a @ m)

    ones = torch.ones(len(kept), dtype=torch.float64)
    before = error(ones)
    ridge = 1e-10 * float(torch.diagonal(a).abs().mean()) + 1e-30
    try:
        m = torch.linalg.solve(a + ridge * torch.eye(len(kept), dtype=a.dtype), c)
    except RuntimeError:
        return ScaleFit(ones, before, before, "singular system")
    if not bool(torch.isfinite(m).all()) or float(m.abs().max()) > max_scale:
        return ScaleFit(ones, before, before, f"ill-conditioned (|m| > {max_scale:g})")
    after = error(m)
    if not after <= before:
        return ScaleFit(ones, before, before, "no improvement")
    return ScaleFit(m, before, after, None)


@dataclass
class ColumnFit:
    weight: torch.Tensor  # the kept columns' re-fitted weights (out x kept columns), float64
    error_before: float
    error_after: float
    aborted: str | None


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor, damp: float) -> ColumnFit:
    """Least-squares re-fit of the kept input columns S of a Linear to the dense output on the same
    inputs: W_S' = W G[:, S] (G[S, S] + lambda I)^-1 (lambda = ``damp`` x mean diag G[S, S]); the error
    ||X W^T - X_S W_S'^T||^2 = tr(W G W^T) - 2 tr(W_S' G[S, :] W^T) + tr(W_S' G[S, S] W_S'^T).
    Dropped (columns unchanged) when not finite or when it would not lower the calibration error."""
    w, g = weight.detach().double().cpu(), gram.double()
    g_ss = g[columns][:, columns]
    cross = w @ g[:, columns]  # W G[:, S]
    total = float((w @ g * w).sum())

    def error(w_s: torch.Tensor) -> float:
        return total - 2 * float((w_s * cross).sum()) + float((w_s @ g_ss * w_s).sum())

    kept = w[:, columns]
    before = error(kept)
    lam = damp * float(torch.diagonal(g_ss).mean()) + 1e-12
    try:
        chol = torch.linalg.cholesky(g_ss + lam * torch.eye(len(columns), dtype=g.dtype))
        refit = torch.cholesky_solve(cross.T, chol).T
    except RuntimeError:
        return ColumnFit(kept, before, before, "singular system")
    if not bool(torch.isfinite(refit).all()):
        return ColumnFit(kept, before, before, "not finite")
    after = error(refit)
    if not after <= before:
        return ColumnFit(kept, before, before, "no improvement")
    return ColumnFit(refit, before, after, None)


@torch.no_grad()
def fold_column_scales(linear: nn.Linear, columns: torch.Tensor, scales: torch.Tensor) -> None:
    """Multiply input columns ``columns`` of ``linear`` by ``scales`` (same length)."""
    w = linear.weight
    w[:, columns.to(w.device)] *= scales.to(w)


def output_error(dense: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 = tr((W - W') G (W - W')^T) for inputs X with G = X^T X."""
    diff = dense.double().cpu() - weight.detach().double().cpu()
    return float((diff @ gram.double() * diff).sum())


@dataclass
class Grams:
    """A Linear's input Gram matrices over the windows the scales are fitted on and the held-out ones."""

    fit: torch.Tensor
    fit_tokens: int
    heldout: torch.Tensor | None
    heldout_tokens: int

    @property
    def all(self) -> torch.Tensor:
        return self.fit if self.heldout is None else self.fit + self.heldout


def collect_grams(block: nn.Module, linear: nn.Linear, inputs: list, fit_batches: int) -> Grams:
    """The Gram matrices of ``linear``'s inputs over the first ``fit_batches`` mini-batches and the rest."""
    stats = StatsFactory(gram=True)
    fit = collect_stats(block, {"x": linear}, stats, inputs[:fit_batches])["x"]
    if fit_batches == len(inputs):
        return Grams(fit.gram, fit.n, None, 0)
    held = collect_stats(block, {"x": linear}, stats, inputs[fit_batches:])["x"]
    return Grams(fit.gram, fit.n, held.gram, held.n)


def split_windows(n: int, holdout: float) -> int:
    """How many of ``n`` calibration windows are held out from the scale fit (at least one each side
    when ``holdout`` > 0 and there are two windows)."""
    if holdout <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(holdout * n)))


# scales: one scale per kept unit (the abort rule |m| > max_scale applies); columns: re-fit every kept
# column of o_proj / down_proj (damped least squares: a lower layer error, but a worse perplexity on
# SmolLM2-135M at 20%: 57.5 vs 55.2); none: the chosen units are only removed.
MASK_TUNING = ("scales", "columns", "none")


@dataclass
class COMPPruner(OneShotStructured):
    """``pruner=comp``: Block-Influence layer removal, condition-based neurons (and heads), and
    least-squares mask tuning folded into the weights; forward passes only."""

    units: list = None
    damp: float = 0.01  # lambda = damp x mean(diag G) in the condition metric
    mask_tuning: str = "scales"  # scales | columns | none (see MASK_TUNING)
    max_scale: float = 10.0  # a re-fit with any |scale| above this is abandoned (scales stay 1)
    holdout: float = 0.25  # fraction of the calibration windows the scales are not fitted on

    name = "comp"

    def __post_init__(self):
        if self.units is None:
            self.units = ["layers", "neurons"]
        super().__post_init__()
        require(is_number(self.damp) and self.damp > 0, "pruner.damp", self.damp, "must be a number > 0")
        require(
            self.mask_tuning in MASK_TUNING,
            "pruner.mask_tuning",
            self.mask_tuning,
            f"allowed: {', '.join(MASK_TUNING)}",
        )
        require(
            is_number(self.max_scale) and self.max_scale > 1,
            "pruner.max_scale",
            self.max_scale,
            "must be a number > 1",
        )
        require_fraction("pruner.holdout", self.holdout)

    @torch.no_grad()
    def select(self, model: nn.Module, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        structure = Structure(d)
        if budget.layers:
            with ctx.watch("block influence"):
                bi = block_influence(model, ctx.calibration, self.batch_size, ctx.progress)
            structure.layers_removed = layers_to_remove(d, bi, budget)
            self.record_layers("block influence", bi)
        fits: list[dict] = []
        heldout = split_windows(ctx.calibration.shape[0], self.holdout)
        if budget.heads or budget.neurons:
            fits = self._prune_kept_layers(model, structure, budget, ctx, heldout)
        n = ctx.calibration.shape[0]
        self.report["mask_tuning"] = {
            "windows": {"fit": n - heldout, "heldout": heldout},
            "fits": len(fits),
            "aborted": sum(1 for f in fits if f["aborted"]),
            **{
                key: sum(f[key] for f in fits)
                for key in (
                    "fit_error_before",
                    "fit_error_after",
                    "heldout_error_before",
                    "heldout_error_after",
                )
                if all(key in f for f in fits)
            },
            "layers": fits,
        }
        return structure

    def _prune_kept_layers(
        self, model: nn.Module, structure: Structure, budget: Budget, ctx: StructuredContext, heldout: int
    ) -> list[dict]:
        """One kept layer at a time, on the outputs of the already pruned layers before it: score,
        choose, tune. The removed layers are skipped; the layers outside the span are only run."""
        d, layers, watch = structure.dims, decoder_layers(model), ctx.watch
        outputs = {"heads": family_of(model).attention_out, "neurons": family_of(model).mlp_out}
        kept = structure.layers_kept
        calib = ctx.calibration
        with watch("capture"):
            inputs = capture_block_inputs(model, calib[: calib.shape[0] - heldout], self.batch_size)
            fit_batches = len(inputs)
            if heldout:
                inputs += capture_block_inputs(model, calib[calib.shape[0] - heldout :], self.batch_size)
        fits: list[dict] = []

        def visit(k: int, block: nn.Module, block_inputs) -> None:
            i = kept[k]
            if not budget.prunes(d, i):
                return
            for kind in ("heads", "neurons"):
                if not getattr(budget, kind):
                    continue
                linear = block.get_submodule(outputs[kind])
                with watch("statistics"):
                    grams = collect_grams(block, linear, block_inputs, fit_batches)
                with watch("masks"):
                    fits.append(self._choose_and_tune(structure, i, kind, linear, grams, budget))

        walk = nn.ModuleList([layers[i] for i in kept])
        # The visits keep their fits and kept units among the Gram matrices' temporaries: the freed heap
        # goes back after every block (SmolLM2-135M at 20%: peak +213-233 MiB, +293 MiB without).
        run_blocks(walk, inputs, visit, ctx.progress, "prune (comp)", watch, hand_back_each_block=True)
        return fits

    def _choose_and_tune(
        self, structure: Structure, i: int, kind: str, linear: nn.Linear, grams: Grams, budget: Budget
    ) -> dict:
        """Score layer ``i``'s heads or neurons on every calibration window, record the kept ones, then
        tune the kept units on the fit windows and zero the removed ones."""
        d = structure.dims
        if kind == "heads":
            scores = condition_block_scores(linear.weight, grams.all, self.damp, d.head_dim)
            structure.heads[i], structure.kv_heads[i] = heads_to_remove(d, scores, budget)
            kept, width = structure.heads[i], d.head_dim
            unit_of_column = torch.arange(d.heads).repeat_interleave(d.head_dim)
        else:
            scores = condition_scores(linear.weight, grams.all, self.damp)
            kept = keep_all_but(d.intermediate, lowest_units(scores, budget.neurons))
            structure.neurons[i], width = kept, 1
            unit_of_column = torch.arange(d.intermediate)
        return self._tune(i, kind, linear, grams, unit_of_column, kept, width)

    def _tune(
        self,
        layer: int,
        kind: str,
        linear: nn.Linear,
        grams: Grams,
        unit_of_column,
        kept: list[int],
        width: int,
    ) -> dict:
        """Re-fit the kept columns or units' scales on the fit windows and write them into ``linear``
        (or record the untuned error with mask_tuning=none), then zero the removed units' columns. The
        errors are the Linear's output error against its dense output on the same inputs."""
        dense = linear.weight.detach().double().cpu().clone()
        columns = torch.cat([torch.arange(u * width, (u + 1) * width) for u in kept])
        gone = torch.tensor(sorted(set(range(dense.shape[1])) - set(columns.tolist())), dtype=torch.long)
        if self.mask_tuning == "columns":
            fit = refit_columns(linear.weight, grams.fit, columns, self.damp)
            if fit.aborted is None:
                linear.weight[:, columns.to(linear.weight.device)] = fit.weight.to(linear.weight)
        else:
            fit = fit_unit_scales(linear.weight, grams.fit, unit_of_column, kept, self.max_scale)
            if self.mask_tuning == "scales" and fit.aborted is None:
                fold_column_scales(linear, columns, fit.scales.repeat_interleave(width))
            elif self.mask_tuning == "none":
                fit = ScaleFit(fit.scales, fit.error_before, fit.error_before, "mask_tuning=none")
        linear.weight[:, gone.to(linear.weight.device)] = 0.0
        record = {
            "layer": layer,
            "units": kind,
            "aborted": fit.aborted,
            "fit_tokens": grams.fit_tokens,
            "fit_error_before": fit.error_before,
            "fit_error_after": fit.error_after,
        }
        if grams.heldout is not None:
            untuned = dense.clone()
            untuned[:, gone] = 0.0
            record["heldout_tokens"] = grams.heldout_tokens
            record["heldout_error_before"] = output_error(dense, untuned, grams.heldout)
            record["heldout_error_after"] = output_error(dense, linear.weight, grams.heldout)
        return record
