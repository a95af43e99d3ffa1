"""Merge verification, sparsity accounting and the export (safetensors, dense or compressed)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sppx import sparse_format
from sppx.anatomy import layers_prefix, prunable_linears
from sppx.errors import RunError, require
from sppx.files import make_temp_folder
from sppx.models import DTYPES

FORMATS = ("safetensors", "compressed")


@dataclass
class ExportConfig:
    """The ``export`` section: whether the merged model is written to ``<run dir>/model``, in which form
    (``safetensors``: dense tensors, zeros included, loads with plain transformers; ``compressed``: only
    the kept weights plus a bitmask, see ``sppx.sparse_format``) and which floating-point type."""

    enabled: bool = True
    format: str = "safetensors"
    dtype: str = "float32"

    def __post_init__(self):
        require(isinstance(self.enabled, bool), "export.enabled", self.enabled, "must be true or false")
        require(self.format in FORMATS, "export.format", self.format, f"allowed: {', '.join(FORMATS)}")
        require(self.dtype in DTYPES, "export.dtype", self.dtype, f"allowed: {', '.join(DTYPES)}")


@dataclass
class Compression:
    """How a compressed export stores the pruned Linears: ``names`` (module names), the format
    (``sparse_format.BITMASK`` or ``BITMASK_24``) and the sparsity config written to config.json."""

    names: list[str]
    format: str
    config: dict


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
    """Re-check the sparsity invariant on the exported files themselves (compressed weights are
    decompressed from their values and bitmask first)."""
    saved = sparse_format.read_folder(directory, {f"{name}.weight" for name in masks})
    weights = {name: saved[f"{name}.weight"] for name in masks if f"{name}.weight" in saved}
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


def compression_of(masks: dict[str, torch.Tensor], pattern, sparsity: float) -> Compression:
    """The compressed form of a run's pruned Linears (``masks``' names) for its sparsity ``pattern``."""
    fmt = sparse_format.format_for(pattern)
    structure = f"{pattern.m - pattern.n}:{pattern.m}" if pattern.is_nm else "unstructured"
    names = sorted(masks)
    return Compression(names, fmt, sparse_format.sparsity_config(fmt, structure, sparsity, names))


def export_sizes(directory: Path, parameters: int) -> dict[str, float]:
    """Bytes of the exported weight files, what the model's ``parameters`` (tied tensors once) take as
    dense float32 (file headers not counted) and their ratio."""
    dense = 4 * parameters
    written = sparse_format.folder_bytes(directory)
    return {"bytes": written, "dense_float32_bytes": dense, "ratio_to_dense_float32": written / dense}


def save_weights(model, directory: Path, dtype: str) -> None:
    """``save_pretrained`` (safetensors) with the weights cast to ``dtype`` and config.json saying so;
    the model in memory is not changed."""
    target, state = DTYPES[dtype], model.state_dict()
    if all(t.dtype == target for t in state.values() if t.is_floating_point()):
        state = None  # save_pretrained's own state dict
    else:
        cast: dict[int, torch.Tensor] = {}  # one copy per storage, so tied weights stay tied (saved once)
        state = {
            k: cast.setdefault(v.data_ptr(), v.to(target)) if v.is_floating_point() else v
            for k, v in state.items()
        }
    use_cache = model.config.use_cache
    try:
        # The loaded model's own setting: whoever generates with the export gets the KV cache.
        model.config.use_cache = getattr(model, "sppx_use_cache", True)
        model.save_pretrained(directory, safe_serialization=True, state_dict=state)
    finally:
        model.config.use_cache = use_cache
    # save_pretrained writes the dtype of the model in memory, not of the tensors it was given.
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(
    model,
    tokenizer,
    directory: Path,
    card: str | None = None,
    verify: Callable[[Path], object] | None = None,
    dtype: str = "float32",
    compression: Compression | None = None,
) -> Path:
    """``save_pretrained`` (safetensors only, weights in ``dtype``; with ``compression`` the pruned
    Linears rewritten in their compressed form) + tokenizer (+ ``card`` as README.md) into ``directory``.

    Everything is written under a temporary name, ``verify(tmp)`` (e.g. the zero check on the saved
    files) runs on it, and only then is it renamed: an interrupted or failed export never leaves a
    complete-looking folder."""
    directory = Path(directory)
    tmp = make_temp_folder(directory)
    try:
        save_weights(model, tmp, dtype)
        if compression is not None:
            sparse_format.compress_folder(tmp, compression.names, compression.format, compression.config)
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
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
