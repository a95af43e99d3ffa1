"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight updates, one block of columns at a time.

H = (2/n) sum X^T X over the calibration tokens (fp32). Dead inputs (H_jj = 0) get H_jj = 1 and a
zero weight column. H is damped by ``percdamp * mean(diag H)``; U is the upper Cholesky factor of H^-1.
Columns are swept in blocks of ``blocksize``: within a block the mask is chosen adaptively (unstructured:
the floor(p * rows * B) lowest W^2 / diag(U)^2 of the block; N:M: every M columns, the N lowest per row),
each pruned column's error is spread over the block's remaining columns, and the block's errors over
all later columns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from sppx.errors import is_number, require, require_positive_int
from sppx.pruning.base import Pruner
from sppx.pruning.masks import SparsityPattern

log = logging.getLogger(__name__)


class Hessian:
    """Running H = (2/n) sum_t x_t x_t^T over every calibration token seen so far (fp32)."""

    def __init__(self, in_features: int, device: torch.device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * math.sqrt(2.0 / self.tokens)
        self.H.addmm_(x.T, x)


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1 with lambda = percdamp * mean(diag H). A failed
    factorisation raises the damping tenfold and retries (logged); it never falls back to identity."""
    mean_diag = torch.diag(H).mean()
    damp = percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        try:
            L = torch.linalg.cholesky(H + damp * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            if attempt == max_tries - 1:
                break
            log.warning("SparseGPT: Cholesky failed with percdamp=%g; retrying with %g", damp, damp * 10)
            damp *= 10
    raise torch.linalg.LinAlgError(f"SparseGPT: H is not positive definite even with percdamp={damp:g}")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight in weight's dtype with pruned entries exactly 0, keep-mask)."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_cholesky_upper(H, percdamp)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:
            scores = W1**2 / d1[None, :] ** 2
            k = math.floor(sparsity * rows * count)
            if k:
                order = torch.sort(scores.flatten(), stable=True).indices[:k]
                mask1.view(-1)[order] = True
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                scores = W1[:, i : i + pattern.m] ** 2 / d1[None, i : i + pattern.m] ** 2
                lowest = torch.sort(scores, dim=1, stable=True).indices[:, : pattern.n]
                mask1[:, i : i + pattern.m].scatter_(1, lowest, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[pruned] = 0.0
    return W.to(weight.dtype), ~pruned


@dataclass
class SparseGPTPruner(Pruner):
    """``pruner=sparsegpt``: ``blocksize`` columns per lazy-update block, ``percdamp`` Hessian damping."""

    blocksize: int = 128
    percdamp: float = 0.01

    name = "sparsegpt"
    needs_calibration = True

    def __post_init__(self):
        super().__post_init__()
        require_positive_int("pruner.blocksize", self.blocksize)
        require(
            is_number(self.percdamp) and self.percdamp > 0,
            "pruner.percdamp",
            self.percdamp,
            "must be a number > 0",
        )

    def check_pattern(self, pattern: SparsityPattern) -> None:
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
        self.check_pattern(pattern)
        weight, keep = sparsegpt_prune(
            linear.weight, stats.H, sparsity, pattern, self.blocksize, self.percdamp
        )
        linear.weight.copy_(weight)
        return keep.cpu()
