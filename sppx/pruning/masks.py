"""Mask selection as pure functions. A mask is a bool tensor shaped like the weight: True = kept.

Ties are broken deterministically: a stable sort keeps the earlier (lower index) entry of equal
scores and prunes it first. This matters for quantized checkpoints, whose weights repeat values.

Counts: a matrix of n weights at sparsity p loses exactly floor(n * p) of them, whatever the rule,
so the measured sparsity is the requested one (to 1/n).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from sppx.errors import ConfigError, is_int, require
from sppx.sparse_format import pack_bits, unpack_bits

PATTERN_KINDS = ("unstructured", "nm", "structured")


@dataclass(frozen=True)
class SparsityPattern:
    """``unstructured`` (the top-level ``sparsity`` is the fraction pruned), ``nm`` (N of every M
    consecutive input weights pruned, in each row; sparsity is N/M) or ``structured`` (whole layers,
    heads and neurons removed: ``sparsity`` is the fraction of the decoder's prunable parameters)."""

    kind: str = "unstructured"
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        require(self.kind in PATTERN_KINDS, "pattern.kind", self.kind, f"allowed: {', '.join(PATTERN_KINDS)}")
        if self.kind == "nm":
            require(is_int(self.m) and self.m >= 2, "pattern.m", self.m, "must be an integer >= 2")
            require(
                is_int(self.n) and 1 <= self.n < self.m,
                "pattern.n",
                self.n,
                f"must be an integer with 1 <= N < M (M={self.m})",
            )

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def is_structured(self) -> bool:
        return self.kind == "structured"

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else self.kind

    def target(self, sparsity: float) -> float:
        """The fraction of weights this pattern prunes at the requested ``sparsity``."""
        return self.n / self.m if self.is_nm else float(sparsity)

    def check_width(self, in_features: int, where: str) -> None:
        if self.is_nm and in_features % self.m:
            raise ConfigError(
                "pattern", self.label, f"M={self.m} must divide the input width {in_features} of {where}"
            )


def kth_smallest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) along ``dim``, kept as a size-1 dim: ``torch.kthvalue``'s
    values, found faster where the data allow (the same values exactly: a selection does no arithmetic).

    Groups of four (2:4 and the other N:4) take a min/max network; fp32 / fp64 CPU tensors take NumPy's
    introselect, which does not carry indices along. On SmolLM2-135M's pruned Linears, 2 threads, this
    takes 0.17-0.18 s per row, 0.13 s per matrix and 0.14 s in 2:4 groups, against kthvalue's 0.55-0.57,
    1.01 and 0.52 s (scripts/bench_selection.py). NaN orders last, as in ``torch.kthvalue`` (NumPy does the same;
    the network falls back to kthvalue on a NaN).
    """
    dim = dim % scores.dim()
    if scores.shape[dim] == 4 and scores.is_floating_point():
        a, b, c, d = scores.unbind(dim)
        low1, high1 = torch.minimum(a, b), torch.maximum(a, b)
        low2, high2 = torch.minimum(c, d), torch.maximum(c, d)
        if k in (2, 3):  # the middle two of four are max(low1, low2) and min(high1, high2)
            middle = torch.maximum(low1, low2), torch.minimum(high1, high2)
            kth = (torch.minimum if k == 2 else torch.maximum)(*middle)
        else:
            kth = torch.minimum(low1, low2) if k == 1 else torch.maximum(high1, high2)
        if not bool(kth.isnan().any()):
            return kth.unsqueeze(dim)
    elif scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(
            np.partition(scores.detach().numpy(), k - 1, axis=dim).take([k - 1], axis=dim)
        )
    return torch.kthvalue(scores, k, dim=dim, keepdim=True).values


def lowest(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores along ``dim`` (True = among the lowest), exactly the first
    ``k`` of a stable ascending sort: ties at the threshold go to the lower indices first.

    A selection (:func:`kth_smallest`) plus a pass over the ties costs a fraction of a full sort.
    """
    size = scores.shape[dim]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = kth_smallest(scores, k, dim)
    at_or_below = scores <= kth
    # Every slice along dim holds at least k of them, so the total is k per slice only when each holds
    # exactly k: no ties straddle the threshold (the usual case). One reduction over the whole tensor.
    if int(at_or_below.sum()) == k * (at_or_below.numel() // size):
        return at_or_below
    below = scores < kth
    ties = at_or_below & ~below
    missing = k - below.sum(dim=dim, keepdim=True)  # >= 1: how many ties to take, lowest index first
    return below | (ties & (ties.cumsum(dim=dim) <= missing))


def pruned_count(numel: int, sparsity: float) -> int:
    """floor(numel * sparsity), immune to float noise such as 0.7 * 10 = 6.999999999999999."""
    return math.floor(numel * sparsity + 1e-9)


def per_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix (one threshold)."""
    k = pruned_count(scores.numel(), sparsity)
    return ~lowest(scores.flatten(), k, 0).view_as(scores)


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(cols * sparsity)`` lowest scores of every row (each output row alike).

    When ``cols * sparsity`` is not a whole number, the floor alone would under-prune (0.5991 instead
    of 0.6 on 576 columns); the ``floor(rows * cols * sparsity) - rows * k`` zeros left over go, one
    each, to evenly spaced rows, which prune their next-lowest score.
    """
    rows, _cols = scores.shape
    k, extra = divmod(pruned_count(scores.numel(), sparsity), rows)
    keep = ~lowest(scores, k, 1)
    if extra:
        chosen = torch.arange(extra, device=scores.device) * rows // extra
        keep[chosen] = ~lowest(scores[chosen], k + 1, 1)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row and every group of ``m`` consecutive columns, prune the ``n`` lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the column count {cols} to be a multiple of M")
    return ~lowest(scores.reshape(rows, cols // m, m), n, 2).view(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, *, per_row: bool
) -> torch.Tensor:
    """The keep-mask for ``scores`` under ``pattern``; unstructured masks compare per row or per matrix."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return per_row_mask(scores, sparsity) if per_row else per_matrix_mask(scores, sparsity)


class PackedMasks(Mapping):
    """``{module name: keep-mask}`` holding one bit per weight (a bool tensor takes a byte per weight:
    101 MiB for SmolLM2-135M's pruned Linears, 6.5 GB for a 7B model). ``masks[name]`` unpacks one, a
    new bool tensor on the device the mask was recorded on."""

    def __init__(self) -> None:
        self.bits: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], torch.device]] = {}
        self.reserved: dict[str, torch.Tensor] = {}

    def reserve(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Allocate the bits of every mask to come in one buffer now. Masks recorded one by one while
        pruning are small blocks that live on among the large temporaries of the forward passes; the C
        allocator cannot give back or merge the memory around them, and its heap grows block after block."""
        sizes = {name: (shape[0], (math.prod(shape[1:]) + 7) // 8) for name, shape in shapes.items()}
        buffer = torch.empty(sum(rows * cols for rows, cols in sizes.values()), dtype=torch.uint8)
        start = 0
        for name, (rows, cols) in sizes.items():
            self.reserved[name] = buffer[start : start + rows * cols].view(rows, cols)
            start += rows * cols

    def __setitem__(self, name: str, keep: torch.Tensor) -> None:
        bits = pack_bits(keep.reshape(keep.shape[0], -1))
        slot = self.reserved.pop(name, None)
        self.bits[name] = bits if slot is None or slot.shape != bits.shape else slot.copy_(bits)
        self.shapes[name] = (tuple(keep.shape), keep.device)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, device = self.shapes[name]
        keep = unpack_bits(self.bits[name], math.prod(shape[1:])).reshape(shape)
        return keep.to(device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)
