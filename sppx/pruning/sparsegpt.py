"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight updates, one block of columns at a time.

H = (2/n) sum X^T X over the calibration tokens (fp32). Dead inputs (H_jj = 0) get H_jj = 1 and a
zero weight column. H is damped by ``percdamp * mean(diag H)``; U is the upper Cholesky factor of H^-1.
Linears fed the same inputs (q, k, v; gate, up) share H and its factor, and are swept together over
their stacked rows (every step is row-wise: each matrix gets exactly its own sweep). Columns are swept
in blocks of ``blocksize``: within a block the mask is chosen adaptively (unstructured: the
floor(p * rows * B) lowest W^2 / diag(U)^2 of the block, per matrix; N:M: every M columns, the N lowest
per row), each pruned column's error is spread over the block's remaining columns, and the block's
errors over all later columns.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from sppx.errors import is_number, require, require_positive_int
from sppx.pruning.base import Pruner
from sppx.pruning.masks import SparsityPattern, lowest

log = logging.getLogger(__name__)


class Hessian:
    """Running H = (2/n) sum_t x_t x_t^T over every calibration token seen so far (fp32)."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self._factor: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * math.sqrt(2.0 / self.tokens)
        self.H.addmm_(x.T, x)
        self._factor.clear()

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead) of ``hessian_factor``, computed once and shared by every Linear fed these inputs."""
        if percdamp not in self._factor:
            self._factor[percdamp] = hessian_factor(self.H, percdamp)
        return self._factor[percdamp]


def inverse_cholesky_upper(
    H: torch.Tensor, percdamp: float, max_tries: int = 6, dead: torch.Tensor | None = None
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = H^-1), lambda = percdamp * mean(diag H).
    ``dead`` (optional) marks inputs whose H_jj counts as 1 (``H`` itself is left as it is). A failed
    factorisation raises the damping tenfold and retries (logged); it never falls back to identity.

    With J the reversal permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J) and J L^-1 J is
    upper triangular with a positive diagonal: one Cholesky and one triangular inverse, instead of
    a Cholesky, an inverse and a second Cholesky. At most two matrix-sized temporaries are alive at a
    time (a 7B model's MLP H is 0.5 GB): the reversed copy of H with the damped diagonal written in,
    then L, into whose column-major identity L^-1 is solved in place.
    """
    diag = torch.diag(H)
    if dead is not None:
        diag = torch.where(dead, torch.ones_like(diag), diag)
    mean_diag = diag.mean()
    damp = percdamp
    for attempt in range(max_tries):
        try:
            work = H.flip(0, 1)
            work.diagonal().copy_((diag + damp * mean_diag).flip(0))
            L = torch.linalg.cholesky(work)
            del work
            inverse = torch.eye(H.shape[0], dtype=H.dtype, device=H.device).t()  # column-major, as LAPACK's
            torch.linalg.solve_triangular(L, inverse, upper=False, out=inverse)
            del L
            return inverse.flip(0, 1)
        except torch.linalg.LinAlgError:
            if attempt == max_tries - 1:
                break
            log.warning("SparseGPT: Cholesky failed with percdamp=%g; retrying with %g", damp, damp * 10)
            damp *= 10
    raise torch.linalg.LinAlgError(f"SparseGPT: H is not positive definite even with percdamp={damp:g}")


def hessian_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): dead inputs (H_jj = 0) get H_jj = 1; U is the upper Cholesky factor of the damped H^-1."""
    dead = torch.diag(H) == 0
    return inverse_cholesky_upper(H, percdamp, dead=dead), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor | None,
    sparsity: float,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
    segments: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight in weight's dtype with pruned entries exactly 0, keep-mask).

    ``factor`` is ``hessian_factor(H, percdamp)`` when already computed. The sweep works on W^T, so a
    column of W is a contiguous row and each column step is two fused kernels (scale, rank-1 update).
    ``segments`` (row counts summing to the rows): ``weight`` stacks several matrices fed the same
    inputs; every step of the sweep is row-wise, so each gets exactly its own sweep, and the
    unstructured count of a block is taken in each matrix apart.
    """
    U, dead = factor if factor is not None else hessian_factor(H, percdamp)
    WT = weight.detach().float().t().contiguous()  # (cols, rows): WT[j] is column j of W
    cols, rows = WT.shape
    WT.mul_(~dead[:, None])
    bounds = [0, *itertools.accumulate(segments or [rows])]
    if bounds[-1] != rows:
        raise ValueError(f"segments {segments} do not add up to the {rows} rows")

    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=WT.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = WT[i1:i2]  # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        mask1 = pruned[i1:i2]  # a view: True = pruned
        scale = torch.zeros(count, rows, dtype=WT.dtype, device=WT.device)  # mask / U_ii per column
        if not pattern.is_nm:
            for a, b in itertools.pairwise(bounds):
                k = math.floor(sparsity * (b - a) * count)
                if k:
                    scores = (W1[:, a:b] / d1[:, None]) ** 2
                    mask1[:, a:b] = lowest(scores.flatten(), k, 0).view(count, b - a)
            torch.div(mask1, d1[:, None], out=scale)
        err = torch.empty(count, rows, dtype=WT.dtype, device=WT.device)
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = (W1[group] / d1[group, None]) ** 2
                mask1[group] = lowest(scores, pattern.n, 0)
                torch.div(mask1[group], d1[group, None], out=scale[group])
            # err = (w - q) / U_ii with q = w where kept, 0 where pruned; then spread it over the block.
            torch.mul(W1[i], scale[i], out=err[i])
            W1[i:].addr_(U1[i, i:], err[i], alpha=-1.0)
        WT[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1.0)
    keep = ~pruned.t()
    W = WT.t().mul(keep).add_(0.0)  # pruned entries exactly 0.0 (not -0.0)
    return W.to(weight.dtype), keep.contiguous()


@dataclass
class SparseGPTPruner(Pruner):
    """``pruner=sparsegpt``: ``blocksize`` columns per lazy-update block, ``percdamp`` Hessian damping."""

    blocksize: int = 128
    percdamp: float = 0.01

    name = "sparsegpt"
    updates_weights = True  # OBS updates rewrite the kept weights
    collects_stats = True

    def __post_init__(self):
        super().__post_init__()
        require_positive_int("pruner.blocksize", self.blocksize)
        require(
            is_number(self.percdamp) and self.percdamp > 0,
            "pruner.percdamp",
            self.percdamp,
            "must be a number > 0",
        )

    def check_pattern(self, pattern: SparsityPattern, sparsity: float | None = None) -> None:
        super().check_pattern(pattern, sparsity)
        if pattern.is_nm:
            require(
                self.blocksize % pattern.m == 0,
                "pruner.blocksize",
                self.blocksize,
                f"must be a multiple of M={pattern.m} for pattern {pattern.label}",
            )

    def new_stats(self, linear: nn.Linear) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    @torch.no_grad()
    def prune(
        self, linear: nn.Linear, stats: Hessian, sparsity: float, pattern: SparsityPattern
    ) -> torch.Tensor:
        return self.prune_shared({"linear": linear}, stats, sparsity, pattern)["linear"]

    @torch.no_grad()
    def prune_shared(
        self, linears: dict[str, nn.Linear], stats: Hessian, sparsity: float, pattern: SparsityPattern
    ) -> dict[str, torch.Tensor]:
        """Linears fed the same inputs (q, k, v; gate, up) in one sweep over their stacked rows, a third of
        the column steps for q, k, v: the same masks, and the same weights (bit for bit where the row
        counts are multiples of the SIMD width, as in released models; else to float rounding, fused and
        plain multiply-adds falling on other rows). Matrices of different dtypes or devices go one by one."""
        weights = [linear.weight for linear in linears.values()]
        if len({(w.dtype, w.device) for w in weights}) > 1:
            return super().prune_shared(linears, stats, sparsity, pattern)
        self.check_pattern(pattern)
        sizes = [w.shape[0] for w in weights]
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        pruned, keep = sparsegpt_prune(
            stacked,
            stats.H,
            sparsity,
            pattern,
            self.blocksize,
            self.percdamp,
            factor=stats.factor(self.percdamp),
            segments=sizes,
        )
        keeps = {}
        for (name, linear), weight, part in zip(
            linears.items(), pruned.split(sizes), keep.split(sizes), strict=True
        ):
            linear.weight.copy_(weight)
            keeps[name] = part.cpu()
        return keeps
