"""What a structured pruner is, and the measurements several of them share.

A structured pruner turns the requested ``sparsity`` (fraction of the decoder's prunable parameters)
into a :class:`~sppx.pruning.structured.units.Budget` of whole units and chooses which units go, as a
:class:`~sppx.pruning.structured.units.Structure`. It may also rewrite the kept weights (COMP folds
its re-fitted scales into them, FLAP adds bias compensation). The pipeline then removes the units
physically (:func:`~sppx.pruning.structured.units.shrink_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sppx.anatomy import PROJECTIONS, Dims, decoder_layers
from sppx.errors import is_int, is_number, require, require_positive_int
from sppx.profiling import Stopwatch
from sppx.progress import bar
from sppx.pruning.masks import SparsityPattern
from sppx.pruning.sequential import capture_block_inputs, collect_stats, run_block
from sppx.pruning.structured.units import (
    HEAD_MODES,
    LAYER_RANGES,
    UNITS,
    Budget,
    Structure,
    allocate,
    pruned_span,
)

# How far the whole-unit budget may land from the requested sparsity before the config is refused.
SPARSITY_TOLERANCE = 0.02


@dataclass
class StructuredContext:
    """What a structured pruner may use besides the model: calibration windows, and (for pruners that
    train masks) tuning windows, the teacher strategy, the logger and the seed. ``lora_factory`` builds
    the LoRA a mask-training pruner tunes alongside its masks (NutePrune): called with the keyword
    arguments ``r``, ``alpha``, ``dropout`` and ``targets``, it returns an adapter such as
    :class:`sppx.adapters.LoRAAdapter`. It is passed in so that pruners import no tuning code."""

    calibration: torch.Tensor | None = None
    progress: bool = True
    watch: Stopwatch = field(default_factory=Stopwatch)
    train: torch.Tensor | None = None
    teacher: object = None
    logger: object = None
    seed: int = 0
    output_dir: object = None
    lora_factory: Callable[..., object] | None = None


@dataclass
class StructuredPruner:
    """Base class. ``units`` are the kinds of unit removed (``layers``, ``heads``, ``neurons``);
    ``head_mode`` is ``query`` (the same number of query heads from every K/V group, K/V kept) or
    ``group`` (whole K/V groups); ``batch_size`` is calibration windows per forward pass; the kept
    neurons per layer are a multiple of ``neuron_multiple``."""

    units: list = field(default_factory=lambda: ["heads", "neurons"])
    head_mode: str = "query"
    batch_size: int = 8
    neuron_multiple: int = 16  # kept neurons per layer are a multiple of this (adapter row groups, kernels)

    name = "structured"
    allowed_units = UNITS  # the unit kinds this method can remove
    needs_calibration = True
    updates_weights = True  # the model is rewritten (units removed); no dense teacher of it remains
    uses_teacher = False  # True: the teacher group drives this pruner's own training (NutePrune)
    allocation = "uniform"
    targets = PROJECTIONS

    def __post_init__(self):
        require(
            isinstance(self.units, list)
            and len(self.units) > 0
            and all(u in self.allowed_units for u in self.units)
            and len(set(self.units)) == len(self.units),
            "pruner.units",
            self.units,
            f"must list some of: {', '.join(self.allowed_units)}",
        )
        require(
            self.head_mode in HEAD_MODES,
            "pruner.head_mode",
            self.head_mode,
            f"allowed: {', '.join(HEAD_MODES)}",
        )
        require_positive_int("pruner.batch_size", self.batch_size)
        require_positive_int("pruner.neuron_multiple", self.neuron_multiple)

    def budget(self, d: Dims, sparsity: float) -> Budget:
        return allocate(d, sparsity, self.units, self.head_mode, neuron_multiple=self.neuron_multiple)

    def check_pattern(self, pattern: SparsityPattern, sparsity: float | None = None) -> None:
        require(
            pattern.is_structured,
            "pattern",
            pattern.label,
            f"pruner={self.name} removes whole units: use pattern=structured",
        )

    def check(self, d: Dims, sparsity: float) -> None:
        """Refuse (before any work) a sparsity the whole units cannot come close to."""
        budget = self.budget(d, sparsity)
        got = budget.sparsity(d)
        require(
            abs(got - sparsity) <= SPARSITY_TOLERANCE,
            "sparsity",
            sparsity,
            f"pruner={self.name} with units {self.units} can only reach {got:.3f} on this model "
            f"(within {SPARSITY_TOLERANCE}); change sparsity or pruner.units",
        )

    def select(self, model: nn.Module, budget: Budget, ctx: StructuredContext) -> Structure:
        """Choose the units to remove (and rewrite kept weights if the method does)."""
        raise NotImplementedError

    def varying_widths(self, d: Dims) -> tuple[str, object, str] | None:
        """The setting that gives pruned layers widths of their own (key, value, the value that does
        not), or None when every layer keeps the same widths."""
        return None


def require_layer_share(value) -> None:
    require(is_number(value) and 0 <= value <= 1, "pruner.layer_share", value, "must be a number in [0, 1]")


def require_layer_range(value) -> None:
    """``all``, ``reference`` or ``[start, end]`` with integers 0 <= start < end."""
    ok = value in LAYER_RANGES or (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(is_int(v) for v in value)
        and 0 <= value[0] < value[1]
    )
    require(ok, "pruner.layer_range", value, "allowed: all, reference or [start, end] with 0 <= start < end")


@dataclass
class OneShotStructured(StructuredPruner):
    """A structured pruner that scores units once from the weights and calibration data (COMP and the
    baselines). ``layer_share`` of the budget goes to whole layers when ``units`` has layers and more;
    ``layer_range`` chooses the layers that may be pruned (``all``; ``reference``: LLM-Pruner's, the first
    4/32 and last 2/32 of the layers kept; ``[start, end]``); the others stay intact and the budget is
    spread over the pruned ones, so the total sparsity is still the target."""

    layer_share: float = 0.5
    layer_range: object = "all"

    def __post_init__(self):
        super().__post_init__()
        require_layer_share(self.layer_share)
        require_layer_range(self.layer_range)
        self.report: dict = {}

    def span(self, d: Dims) -> tuple[int, int]:
        return pruned_span(d.layers, self.layer_range)

    def varying_widths(self, d: Dims) -> tuple[str, object, str] | None:
        """Layers outside ``layer_range`` keep their widths, so they differ from the pruned ones."""
        if self.span(d) != (0, d.layers):
            return "pruner.layer_range", self.layer_range, "all"
        return None

    def budget(self, d: Dims, sparsity: float) -> Budget:
        return allocate(
            d, sparsity, self.units, self.head_mode, self.layer_share, self.neuron_multiple, self.span(d)
        )

    def check(self, d: Dims, sparsity: float) -> None:
        end = self.span(d)[1]
        require(
            end <= d.layers,
            "pruner.layer_range",
            self.layer_range,
            f"the model has {d.layers} decoder layers: end must be <= {d.layers}",
        )
        super().check(d, sparsity)

    def record_layers(self, criterion: str, scores: torch.Tensor) -> None:
        self.report["layer_criterion"] = criterion
        self.report["layer_scores"] = [float(f"{float(x):.6g}") for x in scores]  # 6 significant digits


# --------------------------------------------------------------------------- shared measurements
class InputStats:
    """Running statistics of a Linear's inputs over calibration tokens: count, sum and sum of squares
    per input feature, and optionally the Gram matrix X^T X (accumulated in float64)."""

    def __init__(self, width: int, gram: bool = False):
        self.n = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)
        self.gram = torch.zeros(width, width, dtype=torch.float64) if gram else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.n += x.shape[0]
        self.sum += x.sum(dim=0).cpu().double()
        self.sumsq += (x * x).sum(dim=0).cpu().double()
        if self.gram is not None:  # one batch's product in fp32, the running sum in fp64
            self.gram += (x.T @ x).cpu().double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per feature over the tokens seen."""
        return (self.sumsq / max(self.n, 1) - self.mean**2).clamp_min(0)


class StatsFactory:
    """The ``new_stats`` hook the calibration engine (``collect_stats``) asks for."""

    def __init__(self, gram: bool):
        self.gram = gram

    def new_stats(self, linear: nn.Linear) -> InputStats:
        return InputStats(linear.in_features, self.gram)


@torch.no_grad()
def block_influence(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, progress: bool = True
) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder layer on the calibration windows:
    BI_l = 1 - mean over tokens of cos(h_in, h_out) (low: the layer changes little)."""
    layers = decoder_layers(model)
    inputs = capture_block_inputs(model, calibration, batch_size)
    scores = torch.zeros(len(layers), dtype=torch.float64)
    for i, block in enumerate(bar(layers, desc="block influence", disable=not progress, unit="layer")):
        total, count, outputs = 0.0, 0, []
        for hidden, kwargs in inputs:
            out = run_block(block, hidden, kwargs)
            cos = torch.nn.functional.cosine_similarity(hidden.double(), out.double(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
            outputs.append((out, kwargs))
        scores[i] = 1.0 - total / count
        inputs = outputs
    return scores


@torch.no_grad()
def dense_input_stats(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, names: list[str], progress: bool = True
) -> list[dict[str, InputStats]]:
    """Per decoder layer, the input statistics (no Gram matrix) of its Linears named ``names`` (e.g.
    ``o_proj``, ``down_proj``) over the calibration windows, all measured on the dense model in one pass
    before anything is pruned."""
    stats = StatsFactory(gram=False)
    inputs = capture_block_inputs(model, calibration, batch_size)
    per_layer = []
    for block in bar(decoder_layers(model), desc="dense statistics", disable=not progress, unit="layer"):
        linears = {n: m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in names}
        outputs: list = []
        found = collect_stats(block, linears, stats, inputs, outputs)
        per_layer.append({n.rsplit(".", 1)[-1]: v for n, v in found.items()})
        inputs = outputs
    return per_layer


def head_scores_from_columns(column_scores: torch.Tensor, d: Dims) -> torch.Tensor:
    """Per-query-head score: the sum of its o_proj input columns' scores."""
    return column_scores.reshape(d.heads, d.head_dim).sum(dim=1)
