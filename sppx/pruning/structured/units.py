"""Structured units of a decoder and what removing them means (names as in Llama; every family's
projections are found through :mod:`sppx.anatomy`).

A *unit* is removed whole: a decoder layer; an attention head (its rows of q_proj and columns of
o_proj, K/V kept: ``head_mode=query``) or a whole key/value group (its query heads plus its rows of
k_proj and v_proj: ``head_mode=group``); an FFN neuron (its gate_proj row, up_proj row and down_proj
column). A :class:`Structure` lists what is kept; it can be applied two ways that give the same function:

- :func:`mask_model` zeros the weights that feed nothing any more (a removed layer's o_proj and down_proj,
  a head's o_proj columns, a neuron's down_proj column): same shapes, exactly the removed model's output
  up to the order of floating-point sums;
- :func:`shrink_model` removes them from the matrices and the layer list and rewrites the config, so
  the model is physically smaller and ``save_pretrained`` writes a config that describes it.

Inside a layer every kept K/V group keeps the same number of query heads. Layers may keep different
numbers of heads and neurons (a protected layer range, FLAP's global allocation): a uniform structure
is saved with a standard config; otherwise the config keeps the dense widths and lists each layer's
own under ``sppx_layer_widths`` (see :func:`sppx.models.load_saved_model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sppx.anatomy import (
    LAYER_WIDTHS_KEY,
    LLAMA,
    WIDTH_KEYS,
    Dims,
    Family,
    decoder_layers,
    family_of,
    layers_prefix,
    renumber_layers,
    replace_module,
)

UNITS = ("layers", "heads", "neurons")
HEAD_MODES = ("query", "group")
# LLM-Pruner prunes blocks 4..29 of LLaMA-7B's 32: the first 4/32 and the last 2/32 of the layers stay.
REFERENCE_PROTECTED = (4 / 32, 2 / 32)
LAYER_RANGES = ("all", "reference")


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def pruned_span(layers: int, layer_range) -> tuple[int, int]:
    """``(start, end)``: the decoder layers ``start <= i < end`` that may be pruned; the others stay intact.

    ``all``: every layer. ``reference``: LLM-Pruner's choice scaled to the depth (round(4/32 L) first and
    round(2/32 L) last layers kept, halves rounded up). ``[start, end]``: those layers."""
    if layer_range == "all":
        return 0, layers
    if layer_range == "reference":
        first, last = (round_half_up(f * layers) for f in REFERENCE_PROTECTED)
        return first, max(first + 1, layers - last)
    start, end = layer_range
    return int(start), int(end)


@dataclass
class Structure:
    """What is kept, by original index: layers, query heads and K/V heads per layer, neurons per layer.
    A layer absent from ``heads``/``kv_heads``/``neurons`` keeps all of them."""

    dims: Dims
    layers_removed: list[int] = field(default_factory=list)
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)

    @property
    def layers_kept(self) -> list[int]:
        return [i for i in range(self.dims.layers) if i not in set(self.layers_removed)]

    def heads_of(self, layer: int) -> list[int]:
        return self.heads.get(layer, list(range(self.dims.heads)))

    def kv_heads_of(self, layer: int) -> list[int]:
        return self.kv_heads.get(layer, list(range(self.dims.kv_heads)))

    def neurons_of(self, layer: int) -> list[int]:
        return self.neurons.get(layer, list(range(self.dims.intermediate)))

    def layer_widths(self) -> list[tuple[int, int, int]]:
        """(query heads, K/V heads, neurons) of every kept layer, in order. ValueError when a kept layer
        keeps nothing of a kind, or keeps query heads outside its kept K/V groups or a different number
        of them in each (a layer's attention must stay a plain grouped-query attention)."""
        kept = self.layers_kept
        if not kept:
            raise ValueError("every decoder layer is removed")
        g = self.dims.group_size
        out = []
        for i in kept:
            heads, kv, neurons = len(self.heads_of(i)), len(self.kv_heads_of(i)), len(self.neurons_of(i))
            if heads < 1 or kv < 1 or neurons < 1:
                raise ValueError(f"layer {i}: a kept layer must keep a head, a K/V head and a neuron")
            per_group = [sum(1 for h in self.heads_of(i) if h // g == k) for k in range(self.dims.kv_heads)]
            kv_set = set(self.kv_heads_of(i))
            if any(n and k not in kv_set for k, n in enumerate(per_group)) or any(
                per_group[k] != heads // kv for k in kv_set
            ):
                raise ValueError(
                    f"layer {i}: query heads {self.heads_of(i)} do not keep the same number in every kept "
                    f"K/V group {sorted(kv_set)}"
                )
            out.append((heads, kv, neurons))
        return out

    def uniform_widths(self) -> tuple[int, int, int] | None:
        """The widths every kept layer shares, or None when they differ."""
        shapes = set(self.layer_widths())
        return shapes.pop() if len(shapes) == 1 else None

    def widths(self) -> tuple[int, int, int]:
        """(query heads, K/V heads, neurons) shared by every kept layer; ValueError when they differ
        (see :meth:`layer_widths`)."""
        uniform = self.uniform_widths()
        if uniform is None:
            raise ValueError(f"per-layer widths differ: {sorted(set(self.layer_widths()))}")
        return uniform

    def kept_params(self) -> int:
        d = self.dims
        return sum(
            len(self.heads_of(i)) * d.head_params
            + len(self.kv_heads_of(i)) * d.kv_params
            + len(self.neurons_of(i)) * d.neuron_params
            for i in self.layers_kept
        )

    def sparsity(self) -> float:
        """Fraction of the decoder's prunable parameters removed."""
        return 1.0 - self.kept_params() / self.dims.total

    def summary(self) -> dict:
        """results.json's structure: per-layer widths as one number each when uniform, else as lists
        (one entry per kept layer, in order); ``widths`` always names every kept layer's."""
        widths = self.layer_widths()
        uniform = self.uniform_widths()
        columns = list(zip(*widths, strict=True))
        keys = ("heads_per_layer", "kv_heads_per_layer", "neurons_per_layer")
        return {
            "layers_removed": sorted(self.layers_removed),
            "layers": len(self.layers_kept),
            "uniform": uniform is not None,
            **{k: (uniform[n] if uniform else list(columns[n])) for n, k in enumerate(keys)},
            "widths": [
                {"layer": i, "heads": h, "kv_heads": kv, "neurons": n}
                for i, (h, kv, n) in zip(self.layers_kept, widths, strict=True)
            ],
            "sparsity": round(self.sparsity(), 6),
        }


@dataclass(frozen=True)
class Budget:
    """How many units go: whole layers, then per kept layer ``heads`` query heads (``head_mode=query``:
    ``heads // kv_heads`` from every K/V group; ``group``: ``heads // group_size`` whole groups) and
    ``neurons`` neurons. Only the layers ``start <= i < end`` are pruned (``end`` None: to the last);
    the others keep everything."""

    layers: int = 0
    heads: int = 0
    neurons: int = 0
    head_mode: str = "query"
    start: int = 0
    end: int | None = None

    def span(self, d: Dims) -> range:
        return range(self.start, d.layers if self.end is None else self.end)

    def prunes(self, d: Dims, layer: int) -> bool:
        return layer in self.span(d)

    def per_layer_params(self, d: Dims) -> int:
        """Parameters a kept layer of the span loses."""
        removed = self.heads * d.head_params + self.neurons * d.neuron_params
        if self.head_mode == "group":
            removed += self.heads // d.group_size * d.kv_params
        return removed

    def linear_shapes(
        self, d: Dims, family: Family = LLAMA, prefix: str | None = None
    ) -> dict[str, tuple[int, int]]:
        """``{name: (out, in)}`` of every projection of the pruned model of ``family`` (blocks under
        ``prefix``, the family's own by default; the removed layers are in the span, so the layers
        before it come first and those after it last, all intact)."""
        heads = d.heads - self.heads
        kv = d.kv_heads - (self.heads // d.group_size if self.head_mode == "group" else 0)
        span = self.span(d)
        widths = (
            [(d.heads, d.kv_heads, d.intermediate)] * span.start
            + [(heads, kv, d.intermediate - self.neurons)] * (len(span) - self.layers)
            + [(d.heads, d.kv_heads, d.intermediate)] * (d.layers - span.stop)
        )
        prefix = family.blocks_path if prefix is None else prefix
        shapes = {}
        for i, (q, k, n) in enumerate(widths):
            per_layer = family.layer_shapes(q, k, n, d.hidden, d.head_dim)
            shapes.update({f"{prefix}.{i}.{name}": shape for name, shape in per_layer.items()})
        return shapes

    def removed_params(self, d: Dims) -> int:
        kept_layers = len(self.span(d)) - self.layers
        return self.layers * d.layer_params + kept_layers * self.per_layer_params(d)

    def sparsity(self, d: Dims) -> float:
        return self.removed_params(d) / d.total


def allocate(
    d: Dims,
    sparsity: float,
    units: list[str],
    head_mode: str = "query",
    layer_share: float = 1.0,
    neuron_multiple: int = 1,
    span: tuple[int, int] | None = None,
) -> Budget:
    """Spread ``sparsity`` (fraction of :attr:`Dims.total`) over the chosen units of the layers in
    ``span`` (``(start, end)``; None: every layer).

    With ``layers``: ``layer_share`` of the budget (all of it when layers are the only unit) goes to whole
    layers of the span (rounded). The rest is spread uniformly over the span's kept layers: heads take the
    same fraction of the attention as the rest of the budget is of a layer (rounded to whole heads, the
    same number per K/V group), and neurons take what is left, rounded so that the kept count is a
    multiple of ``neuron_multiple`` (which adapters with row groups and fast kernels like).
    """
    start, end = span or (0, d.layers)
    want = sparsity * d.total
    layers = 0
    if "layers" in units:
        share = layer_share if ("heads" in units or "neurons" in units) else 1.0
        most = end - start - (1 if end - start == d.layers else 0)  # never every layer of the model
        layers = min(most, round(share * want / d.layer_params))
    kept = end - start - layers
    left = max(0.0, want - layers * d.layer_params)
    heads = 0
    if "heads" in units and kept:
        fraction = left / (kept * d.layer_params)
        if head_mode == "query":  # the same number of query heads from every K/V group
            heads = min(d.group_size - 1, round(fraction * d.group_size)) * d.kv_heads
        else:  # whole K/V groups
            heads = min(d.kv_heads - 1, round(fraction * d.kv_heads)) * d.group_size
    budget = Budget(layers, heads, 0, head_mode, start, end)
    neurons = 0
    if "neurons" in units and kept:
        left -= kept * budget.per_layer_params(d)
        removed = min(d.intermediate - 1, max(0, round(left / (kept * d.neuron_params))))
        kept_neurons = max(
            neuron_multiple, round((d.intermediate - removed) / neuron_multiple) * neuron_multiple
        )
        neurons = max(0, d.intermediate - kept_neurons)
    return Budget(layers, heads, neurons, head_mode, start, end)


# --------------------------------------------------------------------------- choosing what goes
def lowest_units(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (stable: among equal scores the lower index goes first)."""
    if k <= 0:
        return []
    order = torch.sort(scores.detach().float().cpu(), stable=True).indices
    return sorted(order[:k].tolist())


def keep_all_but(n: int, removed: list[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(n) if i not in gone]


def heads_to_remove(d: Dims, scores: torch.Tensor, budget: Budget) -> tuple[list[int], list[int]]:
    """(query heads kept, K/V heads kept) of one layer from per-query-head scores.

    ``query``: the ``heads // kv_heads`` lowest in every K/V group go; ``group``: whole groups, scored by
    the sum of their heads, lowest first."""
    g = d.group_size
    if budget.heads == 0:
        return list(range(d.heads)), list(range(d.kv_heads))
    if budget.head_mode == "query":
        per_group = budget.heads // d.kv_heads
        removed = [
            k * g + j for k in range(d.kv_heads) for j in lowest_units(scores[k * g : (k + 1) * g], per_group)
        ]
        return keep_all_but(d.heads, removed), list(range(d.kv_heads))
    group_scores = scores.reshape(d.kv_heads, g).sum(dim=1)
    groups_gone = lowest_units(group_scores, budget.heads // g)
    kv = keep_all_but(d.kv_heads, groups_gone)
    return [k * g + j for k in kv for j in range(g)], kv


def layers_to_remove(d: Dims, scores: torch.Tensor, budget: Budget) -> list[int]:
    """The ``budget.layers`` layers of the budget's span with the lowest scores."""
    span = budget.span(d)
    return [span.start + i for i in lowest_units(scores[span.start : span.stop], budget.layers)]


# --------------------------------------------------------------------------- global allocation
def head_steps(d: Dims, scores: torch.Tensor, head_mode: str) -> torch.Tensor:
    """One layer's head removals in the order they can happen, scored: ``query``: step s removes the
    s-th lowest head of every K/V group (score: their mean); ``group``: the s-th lowest group (score: the
    mean of its heads). A layer always keeps one head per group, or one group."""
    per_group = scores.double().reshape(d.kv_heads, d.group_size)
    if head_mode == "query":
        return torch.sort(per_group, dim=1).values.mean(dim=0)[: d.group_size - 1]
    return torch.sort(per_group.mean(dim=1)).values[: d.kv_heads - 1]


def neuron_steps(d: Dims, scores: torch.Tensor, first: int, multiple: int) -> torch.Tensor:
    """One layer's neuron removals after the ``first`` lowest (always removed): chunks of ``multiple``
    neurons, lowest first, scored by their mean, while at least ``multiple`` neurons stay."""
    ordered = torch.sort(scores.double()).values[first:]
    chunks = max(0, (d.intermediate - first - multiple) // multiple)
    return ordered[: chunks * multiple].reshape(chunks, multiple).mean(dim=1)


def lowest_steps(steps: dict[int, torch.Tensor], total: int) -> dict[int, int]:
    """How many of each layer's steps go when the ``total`` lowest-scored steps over all layers go. A
    layer's step scores never decrease (a running maximum enforces it), so each layer loses a prefix."""
    entries = sorted(
        (float(v), i, s) for i, values in steps.items() for s, v in enumerate(torch.cummax(values, 0).values)
    )
    if total > len(entries):
        raise ValueError(f"{total} steps wanted, {len(entries)} possible")
    counts = dict.fromkeys(steps, 0)
    for _, i, _ in entries[:total]:
        counts[i] += 1
    return counts


def spread_globally(
    d: Dims,
    budget: Budget,
    head_scores: dict[int, torch.Tensor],
    neuron_scores: dict[int, torch.Tensor],
    multiple: int,
) -> dict[int, Budget]:
    """Per-layer budgets for the layers scored (keys: the kept layers of the span): the budget's total
    heads and neurons over those layers, but given to the globally lowest-scored units (scores must be
    comparable across layers, e.g. standardised per layer). Every layer keeps whole steps (the same
    number of heads per K/V group, a multiple of ``multiple`` neurons), and the parameters removed are
    exactly the uniform budget's."""
    layers = sorted(set(head_scores) | set(neuron_scores))
    per_step = d.kv_heads if budget.head_mode == "query" else d.group_size
    heads = dict.fromkeys(layers, 0)
    if budget.heads:
        steps = {i: head_steps(d, head_scores[i], budget.head_mode) for i in layers}
        heads = {
            i: n * per_step for i, n in lowest_steps(steps, len(layers) * budget.heads // per_step).items()
        }
    neurons = dict.fromkeys(layers, 0)
    if budget.neurons:
        first = budget.neurons % multiple
        steps = {i: neuron_steps(d, neuron_scores[i], first, multiple) for i in layers}
        chunks = lowest_steps(steps, len(layers) * (budget.neurons // multiple))
        neurons = {i: first + n * multiple for i, n in chunks.items()}
    return {i: dataclasses.replace(budget, heads=heads[i], neurons=neurons[i]) for i in layers}


# --------------------------------------------------------------------------- applying a structure
def head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of q_proj (and column indices of o_proj) of the given heads."""
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@torch.no_grad()
def mask_model(model: nn.Module, s: Structure) -> None:
    """Zero what the removed units feed into: same shapes, same function as :func:`shrink_model`."""
    d, family = s.dims, family_of(model)
    for i, layer in enumerate(decoder_layers(model)):
        attention_out, mlp_out = (
            layer.get_submodule(family.attention_out),
            layer.get_submodule(family.mlp_out),
        )
        if i in set(s.layers_removed):  # the block adds nothing to the residual stream
            for lin in (attention_out, mlp_out):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            continue
        gone_heads = keep_all_but(d.heads, s.heads_of(i))
        attention_out.weight[:, head_columns(gone_heads, d.head_dim)] = 0.0
        gone = keep_all_but(d.intermediate, s.neurons_of(i))
        mlp_out.weight[:, gone] = 0.0


def _slice(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (outputs) and ``cols`` (inputs) of ``linear``, in place."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        if linear.bias is not None:
            linear.bias = nn.Parameter(
                linear.bias.detach().index_select(0, rows.to(weight.device)).clone(),
                requires_grad=linear.bias.requires_grad,
            )
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


@torch.no_grad()
def shrink_model(model: nn.Module, s: Structure) -> None:
    """Remove the pruned units from the weight matrices and layers and rewrite ``model.config``: the
    standard width keys when every kept layer has the same widths, else the dense widths there and each
    layer's own under ``sppx_layer_widths``."""
    widths = s.layer_widths()
    d, family = s.dims, family_of(model)
    layers = decoder_layers(model)
    if len(layers) != d.layers:
        raise ValueError(f"the structure is for {d.layers} layers, the model has {len(layers)}")
    kept_layers = s.layers_kept
    check_removable(family, s)
    for i, (heads, kv, neurons) in zip(kept_layers, widths, strict=True):
        shrink_layer(layers[i], family, s, i, (heads // kv, kv), neurons)
    kept = nn.ModuleList([layers[i] for i in kept_layers])
    replace_module(model, layers_prefix(model), kept)
    renumber_layers(kept)
    write_widths(model.config, s, widths)
    complete_biases(model)


def check_removable(family: Family, s: Structure) -> None:
    """ValueError when ``s`` removes units ``family`` cannot lose, or gives its layers widths of their
    own where sppx cannot rebuild them (the plan refuses both first: Family.check_structured)."""
    d = s.dims
    kept = s.layers_kept
    if "heads" not in family.units and any(
        len(s.heads_of(i)) < d.heads or len(s.kv_heads_of(i)) < d.kv_heads for i in kept
    ):
        raise ValueError(f"heads cannot be removed from {family.name} models: {family.units_note}")
    if "neurons" not in family.units and any(len(s.neurons_of(i)) < d.intermediate for i in kept):
        raise ValueError(f"neurons cannot be removed from {family.name} models: {family.units_note}")
    if not family.per_layer_widths and s.uniform_widths() is None:
        raise ValueError(f"{family.name} layers must keep the same widths: {sorted(set(s.layer_widths()))}")


def kept_rows(family: Family, layer: nn.Module, names: tuple[str, ...], d: Dims, keep) -> dict:
    """The rows each Linear of ``names`` keeps, in its own order, from ``keep``: per part of their
    rows in role order (q, k, v; gate, up), the indices kept within that part."""
    keep = iter(keep)
    rows = {}
    for name in names:
        positions = torch.arange(layer.get_submodule(name).out_features)
        parts = family.split_rows(name, positions, d)
        rows[name] = family.fuse_rows(name, [part[next(keep)] for part in parts], d.head_dim)
    return rows


def set_if_present(module: nn.Module, **values) -> None:
    """Set the attributes ``module`` has (the forward of some families reads them)."""
    for key, value in values.items():
        if hasattr(module, key):
            setattr(module, key, value)


def shrink_layer(
    layer: nn.Module, family: Family, s: Structure, i: int, groups: tuple[int, int], neurons: int
) -> None:
    """Cut layer ``i``'s projections to the heads and neurons ``s`` keeps (``groups``: query heads per
    kept K/V head and the kept K/V heads; ``neurons``: the kept count). Fused inputs lose each part's
    rows and are put back together in their own layout; the biases of removed rows go."""
    d = s.dims
    q_rows = head_columns(s.heads_of(i), d.head_dim)
    kv_rows = head_columns(s.kv_heads_of(i), d.head_dim)
    if len(q_rows) < d.heads * d.head_dim or len(kv_rows) < d.kv_heads * d.head_dim:
        for name, rows in kept_rows(
            family, layer, family.attention_in, d, (q_rows, kv_rows, kv_rows)
        ).items():
            _slice(layer.get_submodule(name), rows=rows)
        _slice(layer.get_submodule(family.attention_out), cols=q_rows)
        attention = layer.get_submodule(family.attention_out.rpartition(".")[0])
        set_if_present(attention, num_key_value_groups=groups[0], num_key_value_heads=groups[1])
    idx = torch.tensor(s.neurons_of(i), dtype=torch.long)
    if len(idx) < d.intermediate:
        for name, rows in kept_rows(family, layer, family.mlp_in, d, [idx] * family.mlp_parts).items():
            _slice(layer.get_submodule(name), rows=rows)
        _slice(layer.get_submodule(family.mlp_out), cols=idx)
        set_if_present(layer.get_submodule(family.mlp_out.rpartition(".")[0]), intermediate_size=neurons)


def write_widths(config, s: Structure, widths: list[tuple[int, int, int]]) -> None:
    """The pruned model's config: its layers, and its widths (standard keys, or per layer)."""
    d, kept_layers, family = s.dims, s.layers_kept, family_of(config)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[i] for i in kept_layers]
    config.num_hidden_layers = len(kept_layers)
    if "heads" in family.units or hasattr(config, "head_dim"):  # Phi-3 derives it from hidden / heads
        config.head_dim = d.head_dim
    uniform = s.uniform_widths()
    heads, kv, neurons = uniform or (d.heads, d.kv_heads, d.intermediate)
    config.num_attention_heads = heads
    if family.kv_heads_key:
        setattr(config, family.kv_heads_key, kv)
    setattr(config, family.intermediate_key, neurons)
    if uniform is None:
        setattr(config, LAYER_WIDTHS_KEY, [dict(zip(WIDTH_KEYS, w, strict=True)) for w in widths])
    elif hasattr(config, LAYER_WIDTHS_KEY):
        delattr(config, LAYER_WIDTHS_KEY)


@torch.no_grad()
def add_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Add ``bias`` to ``linear``'s output (creating the bias parameter if it has none)."""
    bias = bias.to(linear.weight)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
    else:
        linear.bias.add_(bias)


@torch.no_grad()
def complete_biases(model: nn.Module) -> None:
    """A Llama config has one bias flag for all attention projections and one for all MLP projections
    (other families have some such flags, or none: :attr:`~sppx.anatomy.Family.bias_flags`): when any of
    them has a bias (bias compensation adds some), give the others zero biases and set the flag, so the
    saved model loads with ``from_pretrained`` and nothing is initialised at random."""
    config = model.config
    for flag, names in family_of(model).bias_flags:
        linears = [layer.get_submodule(n) for layer in decoder_layers(model) for n in names]
        if not any(lin.bias is not None for lin in linears):
            continue
        for lin in linears:
            if lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                    requires_grad=False,
                )
        setattr(config, flag, True)
