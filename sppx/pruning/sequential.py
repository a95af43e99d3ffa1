"""The sequential layer-wise calibration engine shared by every one-shot pruner.

Hidden states entering decoder block 0 are captured for all calibration windows. Each block is then
run once with hooks that feed its Linears' inputs to the pruner's statistics (stopping as soon as the
last one is seen), its Linears are pruned, and the block is run again with the pruned weights: those
outputs are the next block's inputs, so every block is pruned against the errors of the blocks before
it. Only one block's activations for the calibration set (its inputs and outputs) are alive at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from sppx.anatomy import (
    SEQUENTIAL_ORDER,
    block_linears,
    block_output,
    decoder_layers,
    family_of,
    layers_prefix,
    prunable_linears,
    resolve_targets,
    sequential_groups,
)
from sppx.cpu_linear import onednn_linears
from sppx.masking import DenseKeeper
from sppx.profiling import Stopwatch, heap_reused, release_freed_memory
from sppx.progress import bar
from sppx.pruning.base import Pruner
from sppx.pruning.masks import PackedMasks, SparsityPattern

log = logging.getLogger(__name__)


class _StopBlock(Exception):
    """Raised inside a block once every needed Linear input has been seen: the rest is not computed."""


class _StatsHooks:
    """The forward pre-hooks of :func:`collect_stats`: one statistics accumulator per distinct input.

    Linears fed the very same tensor in a batch share the accumulator of the first one fed it; the
    sharing is fixed by the first batch and checked on every later one.
    """

    def __init__(self, linears: dict[str, nn.Linear], pruner: Pruner, stop_early: bool) -> None:
        self.linears = linears
        self.pruner = pruner
        self.stop_early = stop_early  # raise _StopBlock once every Linear of the batch has been fed
        self.stats: dict = {}
        self.owner: dict[str, str] = {}  # Linear -> the Linear whose accumulator it shares
        # Input tensors seen in this batch (by id, with a weak reference: an id can be reused once its
        # tensor is freed, and holding the tensors would keep memory alive) -> the first Linear fed each.
        self.batch_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self.pending: set[str] = set()
        self.first_batch = True

    def start_batch(self) -> None:
        self.pending.update(self.linears)
        self.batch_inputs.clear()

    def check_all_fed(self) -> None:
        """After a full forward: every Linear must have been fed."""
        if self.pending:
            raise RuntimeError(f"{', '.join(sorted(self.pending))}: not called by the block's forward")

    def end_batch(self) -> None:
        self.first_batch = False

    def first_fed(self, name: str, x: torch.Tensor) -> str:
        """The first Linear of this batch fed the very tensor ``x`` (``name`` itself when it is)."""
        seen = self.batch_inputs.get(id(x))
        if seen is not None and seen[0]() is x:
            return seen[1]
        self.batch_inputs[id(x)] = (weakref.ref(x), name)
        return name

    def share(self, name: str, first: str) -> None:
        """Give ``name`` the accumulator of ``first`` (a new one if it is ``name``) on the first batch;
        on later batches, check that the same Linear comes first."""
        if self.first_batch:
            self.owner[name] = first
            if first == name:
                self.stats[name] = self.pruner.new_stats(self.linears[name])
            else:
                self.stats[name] = self.stats[first]
        elif self.owner[name] != first:
            raise RuntimeError(f"{name}: its input changed identity between calibration batches")

    def hook(self, name: str):
        """The forward pre-hook of the Linear ``name``."""

        def pre_hook(_module, args):
            x = args[0]
            self.share(name, self.first_fed(name, x))
            if self.owner[name] == name and self.stats[name] is not None:
                with torch.autocast(x.device.type, enabled=False):  # statistics stay fp32 under autocast
                    self.stats[name].add(x)
            self.pending.discard(name)
            if not self.pending and self.stop_early:
                raise _StopBlock

        return pre_hook


def calibration_forward(block: nn.Module, compute_dtype: torch.dtype | None):
    """How a calibration forward of ``block`` runs: in its weights' own dtype (``compute_dtype`` None; on
    the CPU, fp32 Linears multiply through the kernel ``cpu_linear`` picks, see :mod:`sppx.cpu_linear`),
    or with its matrix products and attention in ``compute_dtype`` under autocast (weights, the hidden
    states between blocks and every statistic stay as they are)."""
    if compute_dtype is None:
        return onednn_linears(block)
    return torch.autocast(next(block.parameters()).device.type, dtype=compute_dtype)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles). Without them
    (an AVX2-only CPU) PyTorch emulates bf16 products, far slower than fp32 ones: on a 2-core AMD EPYC,
    10 against 66 GFLOP/s for a (2048 x 576) input to a 576 -> 1536 Linear. The checks are torch.cpu's
    own (underscored) probes; a torch without them counts as no bf16 instructions (a warning, nothing
    else)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def warn_if_emulated(compute_dtype: torch.dtype | None, device: torch.device) -> None:
    """Log a warning (once per process) when bf16 products were asked for on a CPU that only emulates
    them."""
    if compute_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_matmul():
        warn_emulated_bf16()


@functools.cache
def warn_emulated_bf16() -> None:
    log.warning(
        "pruner.compute_dtype=bfloat16: this CPU has no bf16 matrix instructions (AVX512-BF16 or "
        "AMX), so its bf16 products are emulated and much slower than fp32 ones; the default "
        "(pruner.compute_dtype=null) is faster here"
    )


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    pruner: Pruner,
    inputs,
    outputs: list | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict:
    """Run ``block`` over every calibration mini-batch, feeding each Linear's inputs to its statistics.

    Inputs are read by forward *pre*-hooks. Unless ``outputs`` is a list (then the block runs to the
    end and its outputs are appended, paired with the keyword arguments), the forward is cut short as
    soon as the last needed input has arrived: measuring q..down of a Llama block skips the down
    projection. Linears fed the very same tensor (q, k, v; gate, up) share one accumulator, so a
    Hessian is built once per distinct input. ``compute_dtype``: see :func:`calibration_forward`.
    """
    state = _StatsHooks(linears, pruner, stop_early=outputs is None)
    hooks = [lin.register_forward_pre_hook(state.hook(name)) for name, lin in linears.items()]
    try:
        for hidden, kwargs in inputs:
            state.start_batch()
            try:
                with calibration_forward(block, compute_dtype):
                    out = block_output(block(hidden, **kwargs_for(block, kwargs)))
            except _StopBlock:
                pass
            else:
                state.check_all_fed()
                outputs.append((out.to(hidden.dtype), kwargs))
            state.end_batch()
    finally:
        for h in hooks:
            h.remove()
    return {name: state.stats[name] for name in linears}


def shared_inputs(stats: dict) -> list[list[str]]:
    """The Linears of ``stats`` grouped by accumulator (those fed the same inputs share one), in order;
    a Linear without statistics is a group of its own."""
    groups: dict[int, list[str]] = {}
    for name, value in stats.items():
        groups.setdefault(id(value) if value is not None else name, []).append(name)
    return list(groups.values())


class _Captured(Exception):
    pass


class LayerKwargs(dict):
    """Block 0's keyword arguments (mask, position embeddings) for one calibration mini-batch, plus
    ``own``: those of the blocks that get others (a model mixing sliding-window and full-attention
    layers gives each kind its own mask and rotary tables). :func:`kwargs_for` picks a block's."""

    def __init__(self, kwargs: dict, own: dict | None = None):
        super().__init__(kwargs)
        self.own: dict[nn.Module, dict] = own or {}


def kwargs_for(block: nn.Module, kwargs: dict) -> dict:
    """The keyword arguments ``block`` is called with (its own where a :class:`LayerKwargs` has them)."""
    own = getattr(kwargs, "own", None)
    return own.get(block, kwargs) if own else kwargs


def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The hidden states ``block`` outputs for ``hidden`` (called with its own keyword arguments), in
    ``hidden``'s dtype; ``compute_dtype``: see :func:`calibration_forward`."""
    with calibration_forward(block, compute_dtype):
        out = block_output(block(hidden, **kwargs_for(block, kwargs)))
    return out.to(hidden.dtype)


def layers_differ(model: nn.Module) -> bool:
    """Whether the decoder blocks are called with different keyword arguments (``layer_types`` mixes
    kinds of attention, e.g. Gemma's sliding-window and full layers)."""
    return len(set(getattr(model.config, "layer_types", None) or ())) > 1


class _KwargsRecorder(nn.Module):
    """Stands in for a decoder block while the keyword arguments of every block are captured: records
    them and passes the hidden states through (the last one stops the forward)."""

    def __init__(self, last: bool):
        super().__init__()
        self.last, self.seen = last, []

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        if self.last:
            raise _Captured
        return hidden


@torch.no_grad()
def capture_layer_kwargs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, LayerKwargs]]:
    """:func:`capture_block_inputs` for a model whose blocks get different keyword arguments: every
    block is replaced by a :class:`_KwargsRecorder` for the forward (no block computes anything)."""
    layers = decoder_layers(model)
    blocks = list(layers)
    recorders = [_KwargsRecorder(last=i == len(blocks) - 1) for i in range(len(blocks))]
    device = next(model.parameters()).device
    try:
        for i, recorder in enumerate(recorders):
            layers[i] = recorder
        for batch in windows.split(batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    captured = []
    for n, (hidden, first) in enumerate(recorders[0].seen):
        own = {}
        for block, recorder in zip(blocks[1:], recorders[1:], strict=True):
            kwargs = recorder.seen[n][1]
            if kwargs.keys() != first.keys() or any(kwargs[k] is not first[k] for k in kwargs):
                own[block] = kwargs
        captured.append((hidden, LayerKwargs(first, own)))
    return captured


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (position embeddings, mask) entering block 0, per mini-batch
    (a :class:`LayerKwargs` with every block's own when the blocks get different ones)."""
    if layers_differ(model):
        return capture_layer_kwargs(model, windows, batch_size)
    first = decoder_layers(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def to_device(value, device: torch.device):
    """``value`` (a tensor, or tuples / lists / dicts of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, LayerKwargs):
        return LayerKwargs(
            to_device(dict(value), device), {b: to_device(kw, device) for b, kw in value.own.items()}
        )
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def run_blocks(
    layers: nn.ModuleList,
    inputs,
    visit,
    progress: bool,
    desc: str,
    watch: Stopwatch | None = None,
    after=None,
    device: str | torch.device | None = None,
    hand_back_each_block: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Walk the decoder blocks in order: ``visit(i, block, inputs)`` (measure, prune) and then the
    block's outputs over all calibration mini-batches become the next block's inputs; ``after(i)``
    (optional) runs once they are computed.

    With ``device``, each block is moved there for its turn and back afterwards, and the calibration
    activations live there: only one block's weights are on that device at a time, so a model larger
    than (GPU) memory is pruned with the model itself kept in (CPU) memory.

    Each batch's outputs are written over its inputs (the caller's hidden-state tensors, unless
    ``device`` copied them: hand over ones that are not needed afterwards), so the only long-lived
    activations stay where they were allocated, before the first block. Were each block's outputs new
    tensors, they would be allocated among the forward's temporaries and live on through the next
    block, splitting the heap's free memory into pieces the next temporaries do not fit (SmolLM2-135M,
    Wanda: peak +184-196 MiB with new tensors, +152-164 MiB written in place, the same time).

    Every pass allocates and frees the same temporaries batch after batch: kept in the C heap, they are
    reused instead of coming on fresh pages each time (SmolLM2-135M, Wanda: 2.4 million page faults
    fewer, see heap_reused). That holds while a visit leaves nothing small and long-lived among them
    (the pruning engine reserves its masks' memory up front): such blocks pin the freed memory around
    them and the heap grows. A visit that does keep such results passes ``hand_back_each_block``: the
    freed heap then goes back to the system after the visit and after the outputs of every block.
    ``compute_dtype``: the precision of the output passes, see :func:`calibration_forward`."""
    watch = watch or Stopwatch()
    last = len(layers) - 1
    inputs = to_device(inputs, torch.device(device)) if device is not None else list(inputs)
    hand_back = release_freed_memory if hand_back_each_block else lambda: None
    with heap_reused():
        for i, block in enumerate(bar(layers, desc=desc, disable=not progress, unit="block")):
            home = next(block.parameters()).device
            if device is not None:
                block.to(device)
            visit(i, block, inputs)
            hand_back()
            if i < last:  # the last block's outputs feed nothing
                with watch("block outputs"):
                    for hidden, kwargs in inputs:  # a batch's outputs are written over its inputs
                        hidden.copy_(run_block(block, hidden, kwargs, compute_dtype))
                hand_back()
            if after is not None:
                after(i)
            if device is not None:
                block.to(home)


def _layer_sparsities(sparsity: float | list[float], n_layers: int) -> list[float]:
    """One sparsity per decoder block: ``sparsity`` repeated, or the per-block list, checked for length."""
    per_layer = list(sparsity) if isinstance(sparsity, (list, tuple)) else [float(sparsity)] * n_layers
    if len(per_layer) != n_layers:
        raise ValueError(f"{len(per_layer)} layer sparsities for {n_layers} decoder blocks")
    return per_layer


class _MaskRecorder:
    """Prunes the targeted Linears of decoder blocks and records their keep-masks by full module name."""

    def __init__(
        self,
        pruner: Pruner,
        per_layer: list[float],
        pattern: SparsityPattern,
        prefix: str,
        watch: Stopwatch,
        keeper: DenseKeeper | None,
        targets: list[str] | None = None,
        order=None,
    ) -> None:
        self.pruner = pruner
        self.targets = pruner.targets if targets is None else targets  # resolved for the model's family
        self.order = order or SEQUENTIAL_ORDER  # the family's true_sequential groups
        self.per_layer = per_layer
        self.pattern = pattern
        self.prefix = prefix
        self.watch = watch
        self.keeper = keeper
        self.masks = PackedMasks()  # a bit per weight: the pruned model's masks cost 1/8 of a bool tensor

    def prune_linear(self, i: int, name: str, linear: nn.Linear, stats) -> None:
        """Prune (or, with a keeper, only mask) the Linear ``name`` of block ``i``; record its mask."""
        full = f"{self.prefix}.{i}.{name}"
        if self.keeper is None:
            keep = self.pruner.prune(linear, stats, self.per_layer[i], self.pattern)
        else:
            keep = self.keeper.prune(full, linear, stats, self.per_layer[i], self.pattern)
        self.record(full, keep)

    def record(self, full: str, keep: torch.Tensor) -> None:
        self.masks[full] = keep.cpu() if self.pruner.device is not None else keep  # masks stay with the model

    def prune_shared(self, i: int, linears: dict[str, nn.Linear], stats) -> None:
        """Prune Linears of block ``i`` fed the same inputs (one ``stats``) together; record their masks."""
        if self.keeper is not None:  # the keeper masks one Linear at a time
            for name, linear in linears.items():
                self.prune_linear(i, name, linear, stats)
            return
        keeps = self.pruner.prune_shared(linears, stats, self.per_layer[i], self.pattern)
        for name, keep in keeps.items():
            self.record(f"{self.prefix}.{i}.{name}", keep)

    def prune_weights_only(self, layers: nn.ModuleList, progress: bool) -> None:
        """Prune every block from its weights alone (a pruner that collects no statistics)."""
        pruner = self.pruner
        for i, block in enumerate(bar(layers, desc=f"prune ({pruner.name})", disable=not progress)):
            home = next(block.parameters()).device
            if pruner.device is not None:
                block.to(pruner.device)
            for name, linear in block_linears(block, self.targets).items():
                with self.watch("masks"):
                    self.prune_linear(i, name, linear, None)
            if self.keeper is not None:
                self.keeper.restore()
            if pruner.device is not None:
                block.to(home)

    def prune_block(self, i: int, block: nn.Module, inputs) -> None:
        """Measure block ``i`` on its calibration inputs and prune it, group by group."""
        linears = block_linears(block, self.targets)
        groups = (
            sequential_groups(list(linears), self.order) if self.pruner.true_sequential else [list(linears)]
        )
        for group in groups:
            # With true_sequential, each group's statistics see the already pruned earlier groups.
            group_linears = {name: linears[name] for name in group}
            with self.watch("statistics"):
                stats = collect_stats(
                    block, group_linears, self.pruner, inputs, compute_dtype=self.pruner.forward_dtype
                )
            with self.watch("masks"):
                for names in shared_inputs(stats):
                    self.prune_shared(i, {name: group_linears[name] for name in names}, stats[names[0]])
            del stats


@torch.no_grad()
def prune_model(
    model: nn.Module,
    pruner: Pruner,
    sparsity: float | list[float],
    pattern: SparsityPattern,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    watch: Stopwatch | None = None,
    keeper: DenseKeeper | None = None,
) -> Mapping[str, torch.Tensor]:
    """Prune every targeted Linear of the decoder in place; return ``{module name: keep-mask}`` (bit-packed,
    see :class:`~sppx.pruning.masks.PackedMasks`).

    ``sparsity`` is one fraction for every block, or one per block (a layer-wise allocation such as OWL).
    ``watch`` (optional) accumulates the time of each phase: capture, statistics, masks, block outputs.
    With a ``keeper``, the masks are computed exactly the same way (each block still sees the pruned
    blocks before it) but the weights are left dense; see :class:`~sppx.masking.DenseKeeper`.
    """
    watch = watch or Stopwatch()
    layers, prefix, family = decoder_layers(model), layers_prefix(model), family_of(model)
    per_layer = _layer_sparsities(sparsity, len(layers))
    targets = resolve_targets(model, pruner.targets)
    recorder = _MaskRecorder(
        pruner, per_layer, pattern, prefix, watch, keeper, targets, family.sequential_order
    )

    if not pruner.collects_stats:
        recorder.prune_weights_only(layers, progress)
        return recorder.masks

    if calibration is None:
        raise ValueError(f"pruner {pruner.name} needs calibration windows")
    recorder.masks.reserve(
        {name: tuple(linear.weight.shape) for name, linear in prunable_linears(model, pruner.targets).items()}
    )
    warn_if_emulated(pruner.forward_dtype, torch.device(pruner.device or next(model.parameters()).device))
    with watch("capture"):
        captured = [capture_block_inputs(model, calibration, pruner.batch_size)]
    run_blocks(
        layers,
        captured.pop(),  # no reference kept here: the walk writes each block's outputs over them
        recorder.prune_block,
        progress,
        f"prune ({pruner.name})",
        watch,
        after=keeper.restore if keeper is not None else None,
        device=pruner.device,
        compute_dtype=pruner.forward_dtype,
    )
    return recorder.masks
