"""SPP (Lu et al., ICML 2024): sparsity-preserving parameter-efficient fine-tuning.

For a frozen sparse weight W (out x in), SPP learns A (rows x in) and b (out). Row o of W is scaled
elementwise by A[o // (out // rows)] and by b[o]:

    y = x W^T + s * dropout(x) (W * rep(A) * b[:, None])^T,     s = alpha / r
    merged: W' = W * (1 + s * rep(A) * b[:, None])

Every zero of W stays exactly zero, so the sparsity ratio and any N:M pattern survive the merge.
b starts at zero, so training starts exactly at the pruned model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sppx.adapters.base import Adapter, replace_module
from sppx.errors import ConfigError, is_int, is_number, require
from sppx.pruning.sequential import prunable_linears


class SPPLinear(nn.Module):
    """A frozen Linear with SPP's row/column factors."""

    def __init__(self, base: nn.Linear, rows: int, scale: float, dropout: float):
        super().__init__()
        out_features, in_features = base.weight.shape
        if out_features % rows:
            raise ValueError(f"SPP rows={rows} must divide the output width {out_features}")
        self.base = base.requires_grad_(False)
        self.rows, self.scale = rows, scale
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        factors = self.row_factors().to(w.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # No dropout: one matmul with W * (1 + s * factors), the same function as the two-branch form.
            return F.linear(x, w + self.scale * (w * factors), self.base.bias)
        return self.base(x) + self.scale * F.linear(self.dropout(x), w * factors)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W * (1 + s * rep(A) * b) computed in fp32, cast back to W's dtype."""
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.b).all()):
            raise FloatingPointError(
                "SPP factors are not finite; refusing to merge (0 * inf would break sparsity)"
            )
        w = self.base.weight.float()
        return (w * (1.0 + self.scale * self.row_factors())).to(self.base.weight.dtype)


@dataclass
class SPPAdapter(Adapter):
    """``adapter=spp``. ``rows`` learnable rows of A; scale = alpha / r (r as in a LoRA config)."""

    rows: int = 16
    alpha: float = 16.0
    r: int = 8
    dropout: float = 0.05

    name = "spp"

    def __post_init__(self):
        super().__post_init__()
        require(is_int(self.rows) and self.rows >= 1, "adapter.rows", self.rows, "must be an integer >= 1")
        require(is_int(self.r) and self.r >= 1, "adapter.r", self.r, "must be an integer >= 1")
        require(
            is_number(self.alpha) and math.isfinite(self.alpha),
            "adapter.alpha",
            self.alpha,
            "must be a finite number",
        )
        require(
            is_number(self.dropout) and 0 <= self.dropout < 1,
            "adapter.dropout",
            self.dropout,
            "must be a number in [0, 1)",
        )

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

    def apply(self, model: nn.Module) -> list[str]:
        model.requires_grad_(False)
        linears = prunable_linears(model, self.targets)
        self.check_shapes({n: tuple(lin.weight.shape) for n, lin in linears.items()})
        for name, linear in linears.items():
            wrapper = SPPLinear(linear, self.rows, self.scale, self.dropout)
            replace_module(model, name, wrapper.train(linear.training))
        return list(linears)

    def wrapped(self, model: nn.Module) -> dict[str, SPPLinear]:
        return {n: m for n, m in model.named_modules() if isinstance(m, SPPLinear)}

    @torch.no_grad()
    def merge(self, model: nn.Module) -> list[str]:
        merged = []
        for name, mod in self.wrapped(model).items():
            mod.base.weight.copy_(mod.merged_weight())
            replace_module(model, name, mod.base)
            merged.append(name)
        return merged
