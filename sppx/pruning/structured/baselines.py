"""Structured baselines, on the same units, budget and calibration data as COMP and NutePrune.

- ``shortgpt``: remove the layers with the lowest Block Influence.
- ``magnitude_structured``: a unit's score is the L2 norm of all its weights (no data).
- ``llm_pruner``: first-order Taylor group importance sum |W * dL/dW| over the unit's weights, with the
  gradient of the language-modelling loss on a few calibration windows (LLM-Pruner's element-wise
  first-order score, summed over the group); the whole model's gradients are held once.
- ``flap``: the fluctuation metric var_tokens(x_j) * ||W[:, j]||^2 on o_proj / down_proj inputs, and
  bias compensation b += W[:, pruned] mean(x_pruned) so the removed units' mean output stays; one layer
  at a time on the already pruned layers' outputs. (FLAP's adaptive, non-uniform widths are not used:
  every layer removes the same number of units.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sppx.errors import require, require_positive_int
from sppx.evaluate import next_token_nll
from sppx.pruning.sequential import capture_block_inputs, collect_stats, decoder_layers, run_blocks
from sppx.pruning.structured.base import (
    StatsFactory,
    StructuredContext,
    StructuredPruner,
    block_influence,
    head_scores_from_columns,
)
from sppx.pruning.structured.units import (
    Budget,
    Dims,
    Structure,
    add_bias,
    head_columns,
    heads_to_remove,
    keep_all_but,
    lowest_units,
)


def choose_units(structure: Structure, i: int, budget: Budget, head_scores, neuron_scores) -> None:
    """Record layer ``i``'s kept heads and neurons from per-query-head and per-neuron scores."""
    d = structure.dims
    if budget.heads and head_scores is not None:
        structure.heads[i], structure.kv_heads[i] = heads_to_remove(d, head_scores, budget)
    if budget.neurons and neuron_scores is not None:
        structure.neurons[i] = keep_all_but(d.intermediate, lowest_units(neuron_scores, budget.neurons))


def group_sums(d: Dims, block: nn.Module, values) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a per-weight quantity ``values(linear)`` (a tensor shaped like its weight) over each query
    head's weights (q_proj rows, o_proj columns, and its share of the K/V rows in head_mode=group) and
    each neuron's (gate_proj and up_proj rows, down_proj column)."""
    attn, mlp = block.self_attn, block.mlp
    hd, g = d.head_dim, d.group_size
    q = values(attn.q_proj).sum(dim=1).reshape(d.heads, hd).sum(dim=1)
    o = values(attn.o_proj).sum(dim=0).reshape(d.heads, hd).sum(dim=1)
    kv = (values(attn.k_proj).sum(dim=1) + values(attn.v_proj).sum(dim=1)).reshape(d.kv_heads, hd).sum(dim=1)
    heads = q + o + kv.repeat_interleave(g) / g  # K/V only matter when whole groups go
    neurons = (
        values(mlp.gate_proj).sum(dim=1) + values(mlp.up_proj).sum(dim=1) + values(mlp.down_proj).sum(dim=0)
    )
    return heads.detach().double().cpu(), neurons.detach().double().cpu()


@dataclass
class ShortGPTPruner(StructuredPruner):
    """``pruner=shortgpt``: whole layers with the lowest Block Influence."""

    units: list = None
    name = "shortgpt"
    allowed_units = ("layers",)

    def __post_init__(self):
        self.units = self.units or ["layers"]
        super().__post_init__()
        self.report: dict = {}

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        structure = Structure(Dims.of(model.config))
        with ctx.watch("block influence"):
            bi = block_influence(model, ctx.calibration, self.batch_size, ctx.progress)
        structure.layers_removed = lowest_units(bi, budget.layers)
        self.report = {"block_influence": [round(float(x), 6) for x in bi]}
        return structure


@dataclass
class MagnitudeStructuredPruner(StructuredPruner):
    """``pruner=magnitude_structured``: the L2 norm of each head's and neuron's weights."""

    name = "magnitude_structured"
    allowed_units = ("heads", "neurons")
    needs_calibration = False

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        structure = Structure(d)
        for i, block in enumerate(decoder_layers(model)):
            heads, neurons = group_sums(d, block, lambda lin: lin.weight.double().pow(2))
            choose_units(structure, i, budget, heads.sqrt(), neurons.sqrt())
        return structure


@dataclass
class LLMPrunerPruner(StructuredPruner):
    """``pruner=llm_pruner``: first-order Taylor importance of each group from the LM loss's gradient
    on ``nsamples`` calibration windows cut to ``seqlen`` tokens (LLM-Pruner: 10 x 64)."""

    nsamples: int = 10
    seqlen: int = 64

    name = "llm_pruner"
    allowed_units = ("heads", "neurons")

    def __post_init__(self):
        super().__post_init__()
        require_positive_int("pruner.nsamples", self.nsamples)
        require_positive_int("pruner.seqlen", self.seqlen, minimum=2)

    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        windows = ctx.calibration[: self.nsamples, : self.seqlen]
        device = next(model.parameters()).device
        linears = [m for block in decoder_layers(model) for m in block.modules() if isinstance(m, nn.Linear)]
        was_training = model.training
        model.eval()
        model.requires_grad_(False)  # gradients of the decoder's Linears only
        for lin in linears:
            lin.weight.requires_grad_(True)
        try:
            with ctx.watch("gradients"):
                for batch in tqdm(
                    windows.split(self.batch_size), desc="taylor gradients", disable=not ctx.progress
                ):
                    batch = batch.to(device)
                    nll, count = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
                    (
                        nll / (count * windows.shape[0] / batch.shape[0])
                    ).backward()  # the mean over all windows
            structure = Structure(d)
            with ctx.watch("masks"), torch.no_grad():
                for i, block in enumerate(decoder_layers(model)):
                    heads, neurons = group_sums(d, block, lambda lin: (lin.weight * lin.weight.grad).abs())
                    choose_units(structure, i, budget, heads, neurons)
        finally:
            for lin in linears:
                lin.weight.grad = None
                lin.weight.requires_grad_(False)
            model.train(was_training)
        return structure


@dataclass
class FLAPPruner(StructuredPruner):
    """``pruner=flap``: fluctuation metric and bias compensation, one layer at a time."""

    bias_compensation: bool = True

    name = "flap"
    allowed_units = ("heads", "neurons")

    def __post_init__(self):
        super().__post_init__()
        require(
            isinstance(self.bias_compensation, bool),
            "pruner.bias_compensation",
            self.bias_compensation,
            "must be true or false",
        )

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        structure = Structure(d)
        stats = StatsFactory(gram=False)
        with ctx.watch("capture"):
            inputs = capture_block_inputs(model, ctx.calibration, self.batch_size)

        def remove(linear: nn.Linear, gone: torch.Tensor, mean: torch.Tensor) -> None:
            if self.bias_compensation and gone.numel():
                add_bias(linear, linear.weight[:, gone].double() @ mean[gone].to(linear.weight.device))
            linear.weight[:, gone] = 0.0

        def visit(i: int, block: nn.Module, block_inputs) -> None:
            attn, mlp = block.self_attn, block.mlp
            if budget.heads:
                with ctx.watch("statistics"):
                    x = collect_stats(block, {"o_proj": attn.o_proj}, stats, block_inputs)["o_proj"]
                with ctx.watch("masks"):
                    fluct = x.variance * attn.o_proj.weight.double().pow(2).sum(dim=0).cpu()
                    choose_units(structure, i, budget, head_scores_from_columns(fluct, d), None)
                    gone = head_columns(keep_all_but(d.heads, structure.heads[i]), d.head_dim)
                    remove(attn.o_proj, gone, x.mean)
            if budget.neurons:
                with ctx.watch("statistics"):
                    x = collect_stats(block, {"down_proj": mlp.down_proj}, stats, block_inputs)["down_proj"]
                with ctx.watch("masks"):
                    fluct = x.variance * mlp.down_proj.weight.double().pow(2).sum(dim=0).cpu()
                    choose_units(structure, i, budget, None, fluct)
                    gone = keep_all_but(d.intermediate, structure.neurons[i])
                    remove(mlp.down_proj, torch.tensor(gone, dtype=torch.long), x.mean)

        run_blocks(decoder_layers(model), inputs, visit, ctx.progress, "prune (flap)", ctx.watch)
        return structure
