"""The sequential layer-wise calibration engine shared by every one-shot pruner.

Hidden states entering decoder block 0 are captured for all calibration windows. Each block is then
run once with hooks that feed its Linears' inputs to the pruner's statistics (stopping as soon as the
last one is seen), its Linears are pruned, and the block is run again with the pruned weights: those
outputs are the next block's inputs, so every block is pruned against the errors of the blocks before
it. Only one block's activations for the calibration set (its inputs and outputs) are alive at a time.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch import nn

from sppx.profiling import Stopwatch
from sppx.progress import bar
from sppx.pruning.base import Pruner
from sppx.pruning.masks import SparsityPattern

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}: expected decoder blocks at model.model.layers (Llama family)"
        )
    return layers


def layers_prefix(model: nn.Module) -> str:
    """The module name of the decoder blocks' ModuleList (``model.layers``)."""
    layers = decoder_layers(model)
    return next(name for name, mod in model.named_modules() if mod is layers)


def block_linears(block: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Linears of one block whose last name component is in ``targets``, by their name in the block."""
    found = {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    return dict(sorted(found.items(), key=lambda kv: targets.index(kv[0].rsplit(".", 1)[-1])))


def prunable_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Every targeted Linear of the decoder, by its full module name."""
    layers, prefix = decoder_layers(model), layers_prefix(model)
    return {
        f"{prefix}.{i}.{name}": lin
        for i, block in enumerate(layers)
        for name, lin in block_linears(block, targets).items()
    }


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# The order of true_sequential pruning inside a block (SparseGPT's option); other targets come last.
SEQUENTIAL_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's Linear names into the true_sequential groups, in order, dropping empty ones."""
    groups = [[n for n in names if n.rsplit(".", 1)[-1] in kinds] for kinds in SEQUENTIAL_ORDER]
    placed = {n for g in groups for n in g}
    groups.append([n for n in names if n not in placed])
    return [g for g in groups if g]


class _StopBlock(Exception):
    """Raised inside a block once every needed Linear input has been seen: the rest is not computed."""


@torch.no_grad()
def collect_stats(
    block: nn.Module, linears: dict[str, nn.Linear], pruner: Pruner, inputs, outputs: list | None = None
) -> dict:
    """Run ``block`` over every calibration mini-batch, feeding each Linear's inputs to its statistics.

    Inputs are read by forward *pre*-hooks. Unless ``outputs`` is a list (then the block runs to the
    end and its outputs are appended, paired with the keyword arguments), the forward is cut short as
    soon as the last needed input has arrived: measuring q..down of a Llama block skips the down
    projection. Linears fed the very same tensor (q, k, v; gate, up) share one accumulator, so a
    Hessian is built once per distinct input.
    """
    stats: dict = {}
    owner: dict[str, str] = {}  # Linear -> the Linear whose accumulator it shares
    # Input tensors seen in this batch (by id, with a weak reference: an id can be reused once its
    # tensor is freed, and holding the tensors would keep memory alive) -> the first Linear fed each.
    batch_inputs: dict[int, tuple[weakref.ref, str]] = {}
    pending: set[str] = set()
    first_batch = True

    def pre_hook(name):
        def hook(_module, args):
            x = args[0]
            seen = batch_inputs.get(id(x))
            if seen is not None and seen[0]() is x:
                first = seen[1]
            else:
                batch_inputs[id(x)] = (weakref.ref(x), name)
                first = name
            if first_batch:
                owner[name] = first
                if first == name:
                    stats[name] = pruner.new_stats(linears[name])
                else:
                    stats[name] = stats[first]
            elif owner[name] != first:
                raise RuntimeError(f"{name}: its input changed identity between calibration batches")
            if owner[name] == name and stats[name] is not None:
                stats[name].add(x)
            pending.discard(name)
            if not pending and outputs is None:
                raise _StopBlock

        return hook

    hooks = [lin.register_forward_pre_hook(pre_hook(name)) for name, lin in linears.items()]
    try:
        for hidden, kwargs in inputs:
            pending.update(linears)
            batch_inputs.clear()
            try:
                out = block(hidden, **kwargs)
            except _StopBlock:
                pass
            else:
                if pending:
                    raise RuntimeError(f"{', '.join(sorted(pending))}: not called by the block's forward")
                outputs.append((_block_output(out), kwargs))
            first_batch = False
    finally:
        for h in hooks:
            h.remove()
    return {name: stats[name] for name in linears}


class _Captured(Exception):
    pass


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (position embeddings, mask) entering block 0, per mini-batch."""
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
) -> None:
    """Walk the decoder blocks in order: ``visit(i, block, inputs)`` (measure, prune) and then the
    block's outputs over all calibration mini-batches become the next block's inputs; ``after(i)``
    (optional) runs once they are computed.

    With ``device``, each block is moved there for its turn and back afterwards, and the calibration
    activations live there: only one block's weights are on that device at a time, so a model larger
    than (GPU) memory is pruned with the model itself kept in (CPU) memory."""
    watch = watch or Stopwatch()
    last = len(layers) - 1
    if device is not None:
        inputs = to_device(inputs, torch.device(device))
    for i, block in enumerate(bar(layers, desc=desc, disable=not progress, unit="block")):
        home = next(block.parameters()).device
        if device is not None:
            block.to(device)
        visit(i, block, inputs)
        if i < last:  # the last block's outputs feed nothing
            with watch("block outputs"):
                inputs = [(_block_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        if after is not None:
            after(i)
        if device is not None:
            block.to(home)


class DenseKeeper:
    """Keeps the dense weights through pruning: a block's weights are copied before its Linears are
    pruned and written back once its (pruned) outputs are computed, so only one block is ever copied.
    With ``steps``, the nested-mask levels of every pruned Linear are recorded from the pruner's scores."""

    def __init__(self, pruner: Pruner, steps: int = 0):
        self.pruner, self.steps = pruner, steps
        self.levels: dict[str, torch.Tensor] = {}
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prune(self, name: str, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern):
        from sppx.masking import nested_levels

        self._saved.append((linear.weight, linear.weight.detach().clone()))
        scores = self.pruner.score(linear, stats) if self.steps else None
        if self.steps and scores is None:
            raise ValueError(f"pruner {self.pruner.name} has no fixed score to order nested masks by")
        keep = self.pruner.prune(linear, stats, sparsity, pattern)
        if self.steps:
            self.levels[name] = nested_levels(scores, keep, self.steps).cpu()
        return keep

    @torch.no_grad()
    def restore(self, _block_index: int | None = None) -> None:
        for weight, dense in self._saved:
            weight.copy_(dense)
        self._saved.clear()


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
) -> dict[str, torch.Tensor]:
    """Prune every targeted Linear of the decoder in place; return ``{module name: keep-mask}``.

    ``sparsity`` is one fraction for every block, or one per block (a layer-wise allocation such as OWL).
    ``watch`` (optional) accumulates the time of each phase: capture, statistics, masks, block outputs.
    With a ``keeper``, the masks are computed exactly the same way (each block still sees the pruned
    blocks before it) but the weights are left dense; see :class:`DenseKeeper`.
    """
    watch = watch or Stopwatch()
    layers, prefix = decoder_layers(model), layers_prefix(model)
    per_layer = list(sparsity) if isinstance(sparsity, (list, tuple)) else [float(sparsity)] * len(layers)
    if len(per_layer) != len(layers):
        raise ValueError(f"{len(per_layer)} layer sparsities for {len(layers)} decoder blocks")
    masks: dict[str, torch.Tensor] = {}

    def prune_one(i: int, name: str, linear: nn.Linear, stats) -> None:
        full = f"{prefix}.{i}.{name}"
        if keeper is None:
            keep = pruner.prune(linear, stats, per_layer[i], pattern)
        else:
            keep = keeper.prune(full, linear, stats, per_layer[i], pattern)
        masks[full] = keep.cpu() if pruner.device is not None else keep  # the masks stay with the model

    if not pruner.collects_stats:
        for i, block in enumerate(bar(layers, desc=f"prune ({pruner.name})", disable=not progress)):
            home = next(block.parameters()).device
            if pruner.device is not None:
                block.to(pruner.device)
            for name, linear in block_linears(block, pruner.targets).items():
                with watch("masks"):
                    prune_one(i, name, linear, None)
            if keeper is not None:
                keeper.restore()
            if pruner.device is not None:
                block.to(home)
        return masks

    if calibration is None:
        raise ValueError(f"pruner {pruner.name} needs calibration windows")

    def prune_block(i: int, block: nn.Module, inputs) -> None:
        linears = block_linears(block, pruner.targets)
        groups = sequential_groups(list(linears)) if pruner.true_sequential else [list(linears)]
        for group in groups:
            # With true_sequential, each group's statistics see the already pruned earlier groups.
            group_linears = {name: linears[name] for name in group}
            with watch("statistics"):
                stats = collect_stats(block, group_linears, pruner, inputs)
            with watch("masks"):
                for name, linear in group_linears.items():
                    prune_one(i, name, linear, stats[name])
            del stats

    with watch("capture"):
        inputs = capture_block_inputs(model, calibration, pruner.batch_size)
    run_blocks(
        layers,
        inputs,
        prune_block,
        progress,
        f"prune ({pruner.name})",
        watch,
        after=keeper.restore if keeper is not None else None,
        device=pruner.device,
    )
    return masks
