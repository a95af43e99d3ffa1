"""Sparse weights stored compactly: only the kept values plus a bitmask of where they sit.

The tensor layouts are compressed-tensors' ``sparse-bitmask`` and ``sparse-24-bitmask`` (as its
releases up to 0.14 wrote them), one group of tensors per compressed weight ``<name>``:

- ``sparse-bitmask`` (any sparsity): ``<name>.shape`` (int64 [rows, cols]), ``<name>.compressed`` (the
  nonzero values, row by row, 1-D), ``<name>.bitmask`` (uint8 [rows, ceil(cols / 8)], bit ``j % 8`` of
  byte ``j // 8`` set where column ``j`` is kept, little bit order) and ``<name>.row_offsets`` (int64
  [rows], where each row starts in ``compressed``).
- ``sparse-24-bitmask`` (2:4), named after the module (``<module>.shape`` for the weight
  ``<module>.weight``): ``.shape`` (int64 [2, 1]), ``.compressed`` ([rows, cols / 2]: the two kept
  values of every group of four, in order) and ``.bitmask`` as above.

Compressed-tensors 0.15 and later (which transformers 5 requires) no longer read these formats, and
vLLM dropped its 2:4 sparse kernels in 2026, so nothing outside sppx loads them today: an export in this
form keeps its weights in ``model.sparse.safetensors`` (no ``model.safetensors``, so a plain
``from_pretrained`` fails loudly instead of initialising the missing weights at random) and
:func:`sppx.models.load_pretrained` reads it. config.json records the sparsity config as
compressed-tensors wrote it under :data:`CONFIG_KEY`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_KEY = "sppx_compression"
SUFFIX = ".sparse.safetensors"
BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
PARTS = {
    BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    BITMASK_24: ("shape", "compressed", "bitmask"),
}


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols / 8)] uint8, little bit order."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.cpu().numpy(), axis=-1, count=cols, bitorder="little")).bool()


def keep_two_of_four(weight: torch.Tensor) -> torch.Tensor:
    """The two entries kept in every group of four consecutive inputs: every nonzero, topped up with
    zeros (a kept weight may be exactly 0); a group with more than two nonzeros is not 2:4."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    if int(nonzero.sum(-1).max()) > 2:
        raise ValueError("the weight has a group of four inputs with more than two nonzeros: it is not 2:4")
    # Nonzeros first, then the leftmost zeros: a stable sort of "is zero" picks exactly two per group.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    keep = torch.zeros_like(nonzero).scatter_(-1, order, True)
    return keep.reshape(rows, cols)


def compress(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The parts of one 2-D weight in ``fmt`` (keys without the name prefix)."""
    if weight.dim() != 2:
        raise ValueError(f"only 2-D weights compress, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if fmt == BITMASK_24:
        if cols % 4:
            raise ValueError(f"{BITMASK_24} needs the input width to be a multiple of 4, got {cols}")
        keep = keep_two_of_four(weight)
        return {
            "shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
            "compressed": weight[keep].reshape(rows, cols // 2).contiguous(),
            "bitmask": pack_bits(keep),
        }
    keep = weight != 0
    counts = keep.sum(-1)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "compressed": weight[keep].contiguous(),
        "bitmask": pack_bits(keep),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from its parts (either format)."""
    rows, cols = (int(v) for v in parts["shape"].flatten().tolist())
    keep = unpack_bits(parts["bitmask"], cols).reshape(rows, cols)
    values = parts["compressed"].flatten()
    weight = torch.zeros(rows, cols, dtype=values.dtype)
    weight[keep] = values
    return weight


def prefix(weight_key: str, fmt: str) -> str:
    """What a compressed weight's parts are named after: the weight (``sparse-bitmask``) or its module."""
    return weight_key.removesuffix(".weight") if fmt == BITMASK_24 else weight_key


def format_for(pattern) -> str:
    """2:4 (two of every four kept) gets the 2:4 layout; anything else the general bitmask."""
    return BITMASK_24 if pattern.is_nm and (pattern.n, pattern.m) == (2, 4) else BITMASK


def sparsity_config(fmt: str, structure: str, sparsity: float, names: list[str]) -> dict:
    """The sparsity section as compressed-tensors writes it (``targets``: the compressed modules)."""
    return {
        "format": fmt,
        "global_sparsity": sparsity,
        "sparsity_structure": structure,
        "targets": sorted(names),
        "ignore": [],
    }


def compress_folder(directory: Path, names: list[str], fmt: str, config: dict) -> None:
    """Rewrite the safetensors files ``save_pretrained`` wrote in ``directory``: each ``<name>.weight``
    of ``names`` (module names) as its ``fmt`` parts, everything else as is, into ``*.sparse.safetensors``
    files; the dense files and their index are removed and ``config`` goes into config.json."""
    wanted = {f"{name}.weight" for name in names}
    dense_files = sorted(f for f in directory.glob("*.safetensors") if not f.name.endswith(SUFFIX))
    found: set[str] = set()
    for file in dense_files:
        tensors = {}
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in wanted:
                    found.add(key)
                    parts = compress(fh.get_tensor(key), fmt)
                    tensors.update({f"{prefix(key, fmt)}.{k}": v for k, v in parts.items()})
                else:
                    tensors[key] = fh.get_tensor(key)
        save_file(
            tensors, str(directory / (file.name[: -len(".safetensors")] + SUFFIX)), metadata={"format": "pt"}
        )
        file.unlink()
    missing = sorted(wanted - found)
    if missing:
        raise RuntimeError(f"the export has no tensor {missing[0]} to compress")
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    path = directory / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved[CONFIG_KEY] = {"sparsity_config": config, "weights": f"*{SUFFIX}"}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def saved_format(directory) -> str | None:
    """The compressed format of a local model folder's weights (None: plain safetensors, or not a folder)."""
    config = Path(str(directory)) / "config.json"
    if not config.is_file():
        return None
    section = json.loads(config.read_text(encoding="utf-8")).get(CONFIG_KEY) or {}
    return (section.get("sparsity_config") or {}).get("format")


def read_folder(directory, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weight files, compressed weights decompressed (only ``names``, full
    tensor names, when given). Reads both the compressed and the plain safetensors form."""
    directory = Path(directory)
    fmt = saved_format(directory)
    parts_of = PARTS.get(fmt, ())
    tensors: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                base, _, part = key.rpartition(".")
                weight = base if fmt == BITMASK else f"{base}.weight"
                if part in parts_of:
                    if names is None or weight in names:
                        pending.setdefault(weight, {})[part] = fh.get_tensor(key)
                elif names is None or key in names:
                    tensors[key] = fh.get_tensor(key)
    for base, parts in pending.items():
        tensors[base] = decompress(parts)
    return tensors


def folder_bytes(directory) -> int:
    """Bytes of a model folder's weight files."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
