"""SPP (Lu et al., ICML 2024): sparsity-preserving parameter-efficient fine-tuning.

For a frozen sparse weight W (out x in), SPP learns A (rows x in) and b (out). Row o of W is scaled
elementwise by A[o // (out // rows)] and by b[o]:

    y = x W^T + s * dropout(x) (W * rep(A) * b[:, None])^T,     s = alpha / r
    merged: W' = W * (1 + s * rep(A) * b[:, None])

Every zero of W stays exactly zero, so the sparsity ratio and any N:M pattern survive the merge.
b starts at zero, so training starts exactly at the pruned model.

Three forward forms compute the same function: ``fused`` (one matmul with the merged weight; used when
there is no dropout or in eval mode), ``two_branch`` (x W^T plus the adapter branch on dropout(x),
which builds the out x in factor matrix) and ``grouped``, the memory-lean form that never builds an
out x in matrix: the rows split into ``rows`` groups, y_g = (x * A[g]) W_g^T, then times b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sppx.adapters.base import WrappingAdapter, check_scale_args
from sppx.errors import ConfigError, is_int, require
from sppx.masking import apply_keep, forward_keep, masked_linear, student_weight


class SPPLinear(nn.Module):
    """A frozen Linear with SPP's row/column factors."""

    def __init__(self, base: nn.Linear, rows: int, scale: float, dropout: float, grouped: bool = False):
        super().__init__()
        out_features, in_features = base.weight.shape
        if out_features % rows:
            raise ValueError(f"SPP rows={rows} must divide the output width {out_features}")
        self.base = base.requires_grad_(False)
        self.rows, self.scale, self.grouped = rows, scale, grouped
        self.enabled = True  # False: the adapter is switched off (a teacher pass), the base Linear alone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(rows, in_features, dtype=torch.float32, device=base.weight.device))
        self.b = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "b": self.b}

    def row_factors(self) -> torch.Tensor:
        """rep(A) * b[:, None]: the (out x in) elementwise factor, in fp32."""
        return self.A.repeat_interleave(self.base.out_features // self.rows, dim=0) * self.b[:, None]

    def grouped_branch(self, x: torch.Tensor) -> torch.Tensor:
        """x (W * rep(A) * b)^T without an out x in temporary: one (x * A[g]) W_g^T per row group."""
        w, keep = self.base.weight, forward_keep(self.base)
        shape = (self.rows, w.shape[0] // self.rows, w.shape[1])
        groups, keeps = w.view(shape), None if keep is None else keep.view(shape)
        A = self.A.to(x.dtype)
        y = torch.cat(
            [
                masked_linear(x * A[g], groups[g], None if keeps is None else keeps[g])
                for g in range(self.rows)
            ],
            dim=-1,
        )
        return y * self.b.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if self.grouped:
            return self.base(x) + self.scale * self.grouped_branch(self.dropout(x))
        w, keep = self.base.weight, forward_keep(self.base)
        factors = self.row_factors().to(w.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # No dropout: one matmul with the merged weight W * (1 + s * factors) (* keep when masked).
            merged = apply_keep(w * (1.0 + self.scale * factors), keep)
            return F.linear(x, merged, self.base.bias)
        branch = apply_keep(w * factors, keep)
        return self.base(x) + self.scale * F.linear(self.dropout(x), branch)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W * (1 + s * rep(A) * b) computed in fp32, cast back to W's dtype."""
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.b).all()):
            raise FloatingPointError(
                "SPP factors are not finite; refusing to merge (0 * inf would break sparsity)"
            )
        w = student_weight(self.base).float()
        return (w * (1.0 + self.scale * self.row_factors())).to(self.base.weight.dtype)


@dataclass
class SPPAdapter(WrappingAdapter):
    """``adapter=spp``. ``rows`` learnable rows of A; scale = alpha / r (r as in a LoRA config)."""

    rows: int = 16
    alpha: float = 16.0
    r: int = 8
    dropout: float = 0.05
    grouped: bool = False  # memory-lean forward: no out x in temporary, `rows` smaller matmuls instead

    name = "spp"
    wrapper = SPPLinear

    def __post_init__(self):
        super().__post_init__()
        require(is_int(self.rows) and self.rows >= 1, "adapter.rows", self.rows, "must be an integer >= 1")
        check_scale_args(self.r, self.alpha, self.dropout)
        require(isinstance(self.grouped, bool), "adapter.grouped", self.grouped, "must be true or false")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check_shapes(self, linears: dict[str, tuple[int, int]]) -> None:
        if not linears:
            raise ConfigError("adapter.targets", self.targets, "match no Linear of the model")
        for name, (out_features, _) in linears.items():
            if out_features % self.rows:
                raise ConfigError(
                    "adapter.rows", self.rows, f"must divide the output width {out_features} of {name}"
                )

    def wrap(self, linear: nn.Linear) -> SPPLinear:
        return SPPLinear(linear, self.rows, self.scale, self.dropout, self.grouped)
