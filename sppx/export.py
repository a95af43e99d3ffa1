"""Merge verification, sparsity accounting and the safetensors export."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sppx.anatomy import layers_prefix, prunable_linears
from sppx.errors import RunError
from sppx.files import make_temp_folder


class SparsityViolation(RunError, AssertionError):
    """A weight that the pruner zeroed is no longer exactly zero."""


@torch.no_grad()
def verify_zeros(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], where: str) -> int:
    """Check that every pruned entry (mask False) of ``weights[name]`` is exactly 0.0; return their count."""
    checked = 0
    for name, keep in masks.items():
        if name not in weights:
            raise SparsityViolation(f"{where}: {name} is missing")
        pruned = weights[name][~keep.to(weights[name].device)]
        bad = int((pruned != 0).sum())
        if bad:
            raise SparsityViolation(
                f"{where}: {name} has {bad} of {pruned.numel()} pruned weights that are not 0.0"
            )
        checked += pruned.numel()
    return checked


def verify_model_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    weights = {name: mod.weight for name, mod in model.named_modules() if name in masks}
    return verify_zeros(weights, masks, "merged model")


def verify_saved_zeros(directory: Path, masks: dict[str, torch.Tensor]) -> int:
    """Re-check the sparsity invariant on the exported safetensors files themselves."""
    wanted = {f"{name}.weight": name for name in masks}
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in wanted:
                    weights[wanted[key]] = fh.get_tensor(key)
    return verify_zeros(weights, masks, f"saved files in {directory}")


def sparsity_report(model: nn.Module, targets: list[str]) -> dict:
    """Measured zeros of every targeted Linear: overall, per module type (q_proj, ...), per decoder
    block (in order) and per module."""
    per_module, by_type, by_layer = {}, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    prefix = layers_prefix(model) + "."
    zeros_total = numel_total = 0
    for name, lin in prunable_linears(model, targets).items():
        zeros, numel = int((lin.weight == 0).sum()), lin.weight.numel()
        per_module[name] = zeros / numel
        for key, counts in (
            (name.rsplit(".", 1)[-1], by_type),
            (int(name[len(prefix) :].split(".")[0]), by_layer),
        ):
            counts[key][0] += zeros
            counts[key][1] += numel
        zeros_total += zeros
        numel_total += numel
    return {
        "measured": zeros_total / numel_total if numel_total else 0.0,
        "per_type": {k: z / n for k, (z, n) in by_type.items()},
        "per_layer": [z / n for _, (z, n) in sorted(by_layer.items())],
        "per_module": per_module,
    }


def structured_report(
    model: nn.Module, dense_shapes: dict[str, tuple[int, int]], layers_kept: list[int], targets: list[str]
) -> dict:
    """Parameters removed (not zeroed) from every targeted Linear, against the dense shapes, named and
    indexed as in the dense model: overall, per module type, per original decoder layer, per module."""
    prefix = layers_prefix(model) + "."
    now = {}
    for name, lin in prunable_linears(model, targets).items():
        index, rest = name[len(prefix) :].split(".", 1)
        now[f"{prefix}{layers_kept[int(index)]}.{rest}"] = lin.weight.numel()
    by_type, by_layer = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    per_module = {}
    for name, (rows, cols) in dense_shapes.items():
        dense, kept = rows * cols, now.get(name, 0)
        per_module[name] = 1 - kept / dense
        for key, counts in (
            (name.rsplit(".", 1)[-1], by_type),
            (int(name[len(prefix) :].split(".")[0]), by_layer),
        ):
            counts[key][0] += dense - kept
            counts[key][1] += dense
    removed = sum(r for r, _ in by_type.values())
    total = sum(n for _, n in by_type.values())
    return {
        "measured": removed / total if total else 0.0,
        "per_type": {k: r / n for k, (r, n) in by_type.items()},
        "per_layer": [r / n for _, (r, n) in sorted(by_layer.items())],
        "per_module": per_module,
    }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and nonzero parameters (tied tensors once) and how many require grad."""
    seen, total, nonzero, trainable = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "nonzero": nonzero, "trainable": trainable}


def save_model(
    model,
    tokenizer,
    directory: Path,
    card: str | None = None,
    verify: Callable[[Path], object] | None = None,
) -> Path:
    """``save_pretrained`` (safetensors only) + tokenizer (+ ``card`` as README.md) into ``directory``.

    Everything is written under a temporary name, ``verify(tmp)`` (e.g. the zero check on the saved
    files) runs on it, and only then is it renamed: an interrupted or failed export never leaves a
    complete-looking folder."""
    directory = Path(directory)
    tmp = make_temp_folder(directory)
    use_cache = model.config.use_cache
    try:
        # The loaded model's own setting: whoever generates with the export gets the KV cache.
        model.config.use_cache = getattr(model, "sppx_use_cache", True)
        model.save_pretrained(tmp, safe_serialization=True)
        model.config.use_cache = use_cache
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        unsafe = [f.name for f in tmp.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if unsafe:
            raise RuntimeError(f"the export wrote pickled weights {unsafe}; only safetensors are allowed")
        if verify is not None:
            verify(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        model.config.use_cache = use_cache
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
