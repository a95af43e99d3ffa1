"""The sequential layer-wise calibration engine shared by every one-shot pruner.

Hidden states entering decoder block 0 are captured for all calibration windows. Each block is then
run once with hooks that feed its Linears' inputs to the pruner's statistics, its Linears are pruned,
and the block is run again with the pruned weights: those outputs are the next block's inputs, so
every block is pruned against the errors of the blocks before it. Only one block's activations for
the calibration set are alive at a time.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

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


# The order of true_sequential pruning inside a block (SparseGPT's option); other targets come last.
SEQUENTIAL_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's Linear names into the true_sequential groups, in order, dropping empty ones."""
    groups = [[n for n in names if n.rsplit(".", 1)[-1] in kinds] for kinds in SEQUENTIAL_ORDER]
    placed = {n for g in groups for n in g}
    groups.append([n for n in names if n not in placed])
    return [g for g in groups if g]


@torch.no_grad()
def collect_stats(block: nn.Module, linears: dict[str, nn.Linear], pruner: Pruner, inputs) -> dict:
    """Run ``block`` over every calibration mini-batch, feeding each Linear's inputs to its statistics."""
    stats = {name: pruner.new_stats(lin) for name, lin in linears.items()}
    hooks = [
        lin.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, lin in linears.items()
    ]
    try:
        for hidden, kwargs in inputs:
            block(hidden, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return stats


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


@torch.no_grad()
def prune_model(
    model: nn.Module,
    pruner: Pruner,
    sparsity: float,
    pattern: SparsityPattern,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune every targeted Linear of the decoder in place; return ``{module name: keep-mask}``."""
    layers, prefix = decoder_layers(model), layers_prefix(model)
    masks: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(layers), desc=f"prune ({pruner.name})", disable=not progress, unit="block")

    if not pruner.needs_calibration:
        for i, block in enumerate(layers):
            for name, linear in block_linears(block, pruner.targets).items():
                masks[f"{prefix}.{i}.{name}"] = pruner.prune(linear, None, sparsity, pattern)
            bar.update()
        bar.close()
        return masks

    if calibration is None:
        raise ValueError(f"pruner {pruner.name} needs calibration windows")
    inputs = capture_block_inputs(model, calibration, pruner.batch_size)
    for i, block in enumerate(layers):
        linears = block_linears(block, pruner.targets)
        groups = sequential_groups(list(linears)) if pruner.true_sequential else [list(linears)]
        for group in groups:
            # With true_sequential, each group's statistics see the already pruned earlier groups.
            group_linears = {name: linears[name] for name in group}
            stats = collect_stats(block, group_linears, pruner, inputs)
            for name, linear in group_linears.items():
                masks[f"{prefix}.{i}.{name}"] = pruner.prune(linear, stats[name], sparsity, pattern)
            del stats
        # Pruned outputs of this block feed the next one.
        inputs = [(_block_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        bar.update()
    bar.close()
    return masks
