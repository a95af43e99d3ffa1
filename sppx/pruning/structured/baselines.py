"""Structured baselines, on the same units, budget, layer choice and calibration data as COMP.

Every one accepts any of ``units`` = layers / heads / neurons except ShortGPT (layers only), spends
``layer_share`` of the budget on whole layers when it removes layers and more, and prunes only the
layers of ``layer_range``. Layer criteria: the method's own where it has one, Block Influence otherwise.

- ``shortgpt``: remove the layers with the lowest Block Influence.
- ``magnitude_structured``: a unit's score is the L2 norm of all its weights (no data); a layer's, the
  L2 norm of all its projection weights.
- ``llm_pruner``: first-order Taylor group importance sum |W * dL/dW| over the unit's weights, with the
  gradient of the language-modelling loss on a few calibration windows (LLM-Pruner's element-wise
  first-order score, summed over the group); a layer's, the same sum over all its projections (the
  block-wise grouping). The whole model's gradients are held once. By default only LLM-Pruner's layer
  range is pruned (the first 4/32 and last 2/32 of the layers stay).
- ``flap``: the fluctuation metric var_tokens(x_j) * ||W[:, j]||^2 on o_proj / down_proj inputs of the
  dense model (every layer measured before anything is pruned), squared for o_proj's channels; a head
  scores the sum of its channels (``allocation=uniform``) or, with ``allocation=global``, the scores are
  standardised per layer and module and the lowest go across all layers (a head: the mean of its
  standardised channels), so widths differ per layer. Bias compensation b += W[:, pruned] mean(x_pruned)
  keeps the removed units' mean output. Layers (FLAP has no criterion for them): Block Influence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.anatomy import LLAMA, Dims, Family, decoder_layers, family_of, short
from sppx.errors import require, require_positive_int
from sppx.evaluate import next_token_nll
from sppx.progress import bar
from sppx.pruning.structured.base import (
    InputStats,
    OneShotStructured,
    StructuredContext,
    block_influence,
    dense_input_stats,
)
from sppx.pruning.structured.units import (
    Budget,
    Structure,
    add_bias,
    head_columns,
    heads_to_remove,
    keep_all_but,
    layers_to_remove,
    lowest_units,
    spread_globally,
)


def choose_units(structure: Structure, i: int, budget: Budget, head_scores, neuron_scores) -> None:
    """Record layer ``i``'s kept heads and neurons from per-query-head and per-neuron scores."""
    d = structure.dims
    if budget.heads and head_scores is not None:
        structure.heads[i], structure.kv_heads[i] = heads_to_remove(d, head_scores, budget)
    if budget.neurons and neuron_scores is not None:
        structure.neurons[i] = keep_all_but(d.intermediate, lowest_units(neuron_scores, budget.neurons))


def group_sums(
    d: Dims, block: nn.Module, values, family: Family = LLAMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a per-weight quantity ``values(linear)`` (a tensor shaped like its weight) over each query
    head's weights (q rows, attention output columns, and its share of the K/V rows in head_mode=group)
    and each neuron's (gate and up rows, or a plain MLP's up row, and its MLP output column). Fused
    inputs are split into their parts by ``family``'s description."""
    hd, g = d.head_dim, d.group_size
    (q, k, v), mlp_in = family.input_parts(block, d, values)
    o = values(block.get_submodule(family.attention_out))
    heads = q.sum(dim=1).reshape(d.heads, hd).sum(dim=1) + o.sum(dim=0).reshape(d.heads, hd).sum(dim=1)
    kv = (k.sum(dim=1) + v.sum(dim=1)).reshape(d.kv_heads, hd).sum(dim=1)
    heads = heads + kv.repeat_interleave(g) / g  # K/V only matter when whole groups go
    neurons = sum(part.sum(dim=1) for part in mlp_in) + values(block.get_submodule(family.mlp_out)).sum(dim=0)
    return heads.detach().double().cpu(), neurons.detach().double().cpu()


def layer_sum(block: nn.Module, values) -> float:
    """A per-weight quantity ``values(linear)`` summed over every projection of a decoder layer."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    return float(sum(values(lin).double().sum() for lin in linears))


def choose_layers(
    pruner: OneShotStructured, structure: Structure, budget: Budget, criterion: str, scores
) -> None:
    """Remove the budget's layers with the lowest ``scores`` (one per layer) and report them."""
    structure.layers_removed = layers_to_remove(structure.dims, scores, budget)
    pruner.record_layers(criterion, scores)


def pruned_layers(structure: Structure, budget: Budget) -> list[int]:
    """The kept layers whose heads and neurons the budget prunes."""
    return [i for i in structure.layers_kept if budget.prunes(structure.dims, i)]


@dataclass
class ShortGPTPruner(OneShotStructured):
    """``pruner=shortgpt``: whole layers with the lowest Block Influence."""

    units: list = None
    name = "shortgpt"
    allowed_units = ("layers",)

    def __post_init__(self):
        if self.units is None:
            self.units = ["layers"]
        require(
            self.units == ["layers"],
            "pruner.units",
            self.units,
            "shortgpt's Block Influence ranks whole layers only: allowed: [layers]",
        )
        super().__post_init__()

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        structure = Structure(Dims.of(model.config))
        with ctx.watch("block influence"):
            bi = block_influence(model, ctx.calibration, self.batch_size, ctx.progress)
        choose_layers(self, structure, budget, "block influence", bi)
        return structure


@dataclass
class MagnitudeStructuredPruner(OneShotStructured):
    """``pruner=magnitude_structured``: the L2 norm of each layer's, head's and neuron's weights."""

    name = "magnitude_structured"
    needs_calibration = False

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        structure = Structure(d)
        blocks = decoder_layers(model)
        if budget.layers:
            norms = torch.tensor(
                [layer_sum(b, lambda lin: lin.weight.double().pow(2)) for b in blocks]
            ).sqrt()
            choose_layers(self, structure, budget, "weight norm", norms)
        for i in pruned_layers(structure, budget):
            heads, neurons = group_sums(
                d, blocks[i], lambda lin: lin.weight.double().pow(2), family_of(model)
            )
            choose_units(structure, i, budget, heads.sqrt(), neurons.sqrt())
        return structure


@dataclass
class LLMPrunerPruner(OneShotStructured):
    """``pruner=llm_pruner``: first-order Taylor importance of each group from the LM loss's gradient
    on ``nsamples`` calibration windows cut to ``seqlen`` tokens (LLM-Pruner: 10 x 64); by default only
    LLM-Pruner's layer range is pruned."""

    layer_range: object = "reference"
    nsamples: int = 10
    seqlen: int = 64

    name = "llm_pruner"

    def __post_init__(self):
        super().__post_init__()
        require_positive_int("pruner.nsamples", self.nsamples)
        require_positive_int("pruner.seqlen", self.seqlen, minimum=2)

    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d = Dims.of(model.config)
        linears = [m for block in decoder_layers(model) for m in block.modules() if isinstance(m, nn.Linear)]
        was_training = model.training
        model.eval()
        model.requires_grad_(False)  # gradients of the decoder's Linears only
        for lin in linears:
            lin.weight.requires_grad_(True)
        try:
            with ctx.watch("gradients"):
                self._gradients(model, ctx)
            with ctx.watch("masks"), torch.no_grad():
                structure = self._choose(model, d, budget)
        finally:
            for lin in linears:
                lin.weight.grad = None
                lin.weight.requires_grad_(False)
            model.train(was_training)
        return structure

    def _gradients(self, model, ctx: StructuredContext) -> None:
        """Accumulate the gradient of the mean next-token loss over the windows in the weights."""
        windows = ctx.calibration[: self.nsamples, : self.seqlen]
        device = next(model.parameters()).device
        for batch in bar(windows.split(self.batch_size), desc="taylor gradients", disable=not ctx.progress):
            batch = batch.to(device)
            nll, count = next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)
            (nll / (count * windows.shape[0] / batch.shape[0])).backward()  # the mean over all windows

    def _choose(self, model, d: Dims, budget: Budget) -> Structure:
        structure = Structure(d)
        blocks, family = decoder_layers(model), family_of(model)

        def taylor(lin: nn.Linear) -> torch.Tensor:
            return (lin.weight * lin.weight.grad).abs()

        if budget.layers:
            choose_layers(
                self, structure, budget, "taylor", torch.tensor([layer_sum(b, taylor) for b in blocks])
            )
        for i in pruned_layers(structure, budget):
            heads, neurons = group_sums(d, blocks[i], taylor, family)
            choose_units(structure, i, budget, heads, neurons)
        return structure


def fluctuation(stats: InputStats, linear: nn.Linear) -> torch.Tensor:
    """FLAP's per input channel score: var_tokens(x_j) * ||W[:, j]||^2 (float64, CPU)."""
    return stats.variance * linear.weight.detach().double().pow(2).sum(dim=0).cpu()


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the module's units (std with n - 1, as the reference)."""
    return (x - x.mean()) / x.std()


def flap_scores(
    d: Dims, block: nn.Module, stats: dict[str, InputStats], allocation: str, family: Family = LLAMA
):
    """(per query head, per neuron) scores of one layer from its dense input statistics. A channel of
    the attention output (o_proj) scores its fluctuation squared; ``uniform``: a head is the sum of its
    channels', neurons their fluctuation (on the MLP output's inputs); ``global``: both standardised
    over the layer's module first, a head the mean."""
    attention_out, mlp_out = family.attention_out, family.mlp_out
    channels = fluctuation(stats[short(attention_out)], block.get_submodule(attention_out)).pow(2)
    neurons = fluctuation(stats[short(mlp_out)], block.get_submodule(mlp_out))
    if allocation == "uniform":
        return channels.reshape(d.heads, d.head_dim).sum(dim=1), neurons
    return standardise(channels).reshape(d.heads, d.head_dim).mean(dim=1), standardise(neurons)


FLAP_ALLOCATIONS = ("uniform", "global")


@dataclass
class FLAPPruner(OneShotStructured):
    """``pruner=flap``: fluctuation metric on the dense model's activations, uniform or global
    (standardised, per-layer widths) allocation, and bias compensation."""

    allocation: str = "global"  # uniform: the budget's units from every layer | global: the lowest overall
    bias_compensation: bool = True

    name = "flap"

    def __post_init__(self):
        super().__post_init__()
        require(
            self.allocation in FLAP_ALLOCATIONS,
            "pruner.allocation",
            self.allocation,
            f"allowed: {', '.join(FLAP_ALLOCATIONS)}",
        )
        require(
            isinstance(self.bias_compensation, bool),
            "pruner.bias_compensation",
            self.bias_compensation,
            "must be true or false",
        )

    @property
    def adds_biases(self) -> bool:
        """Whether the removal adds biases to the attention and MLP outputs (bias compensation)."""
        return self.bias_compensation and ("heads" in self.units or "neurons" in self.units)

    def varying_widths(self, d: Dims) -> tuple[str, object, str] | None:
        if self.allocation == "global":
            return "pruner.allocation", self.allocation, "uniform"
        return super().varying_widths(d)

    @torch.no_grad()
    def select(self, model, budget: Budget, ctx: StructuredContext) -> Structure:
        d, family = Dims.of(model.config), family_of(model)
        structure = Structure(d)
        blocks = decoder_layers(model)
        if budget.layers:
            with ctx.watch("block influence"):
                bi = block_influence(model, ctx.calibration, self.batch_size, ctx.progress)
            choose_layers(self, structure, budget, "block influence", bi)
        layers = pruned_layers(structure, budget)
        if not (budget.heads or budget.neurons) or not layers:
            return structure
        with ctx.watch("statistics"):
            outputs = [short(family.attention_out), short(family.mlp_out)]
            stats = dense_input_stats(model, ctx.calibration, self.batch_size, outputs, ctx.progress)
        with ctx.watch("masks"):
            scores = {i: flap_scores(d, blocks[i], stats[i], self.allocation, family) for i in layers}
            if self.allocation == "global":
                heads = {i: h for i, (h, _) in scores.items()}
                neurons = {i: n for i, (_, n) in scores.items()}
                budgets = spread_globally(d, budget, heads, neurons, self.neuron_multiple)
            else:
                budgets = dict.fromkeys(layers, budget)
            for i in layers:
                choose_units(structure, i, budgets[i], *scores[i])
                self._remove(structure, i, blocks[i], stats[i], family)
        return structure

    def _remove(
        self, structure: Structure, i: int, block: nn.Module, stats: dict[str, InputStats], family: Family
    ) -> None:
        """Zero layer ``i``'s removed units' attention / MLP output columns, adding their mean output to
        the bias first (with ``bias_compensation``)."""
        d = structure.dims
        gone_heads = head_columns(keep_all_but(d.heads, structure.heads_of(i)), d.head_dim)
        gone_neurons = torch.tensor(keep_all_but(d.intermediate, structure.neurons_of(i)), dtype=torch.long)
        for name, gone in ((family.attention_out, gone_heads), (family.mlp_out, gone_neurons)):
            if not gone.numel():
                continue
            linear, x = block.get_submodule(name), stats[short(name)]
            if self.bias_compensation:
                mean = x.mean[gone].to(linear.weight.device)
                add_bias(linear, linear.weight[:, gone.to(linear.weight.device)].double() @ mean)
            linear.weight[:, gone.to(linear.weight.device)] = 0.0
