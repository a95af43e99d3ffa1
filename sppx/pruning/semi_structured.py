"""2:4 weights on NVIDIA sparse tensor cores: torch's semi-structured sparse format (CUDA, fp16/bf16).

A 2:4-pruned Linear keeps at most 2 nonzeros in every group of 4 consecutive input weights; torch stores
the kept values and 2-bit indices and multiplies with cuSPARSELt/CUTLASS kernels. CPUs have no such
kernels: there the weights stay dense.
"""

from __future__ import annotations

import torch
from torch import nn

from sppx.anatomy import prunable_linears


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along a row holds at most 2 nonzeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def to_semi_structured(linear: nn.Linear) -> nn.Linear:
    """Replace a 2:4-pruned CUDA fp16/bf16 Linear's weight with a semi-structured sparse tensor (in place)."""
    weight = linear.weight.detach()
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"semi-structured sparsity needs a CUDA fp16/bf16 weight, not {weight.device} {weight.dtype}"
        )
    if not is_2_4(weight):
        raise ValueError("weight is not 2:4 sparse: prune it with pattern=2:4 first")
    from torch.sparse import to_sparse_semi_structured

    linear.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
    return linear


@torch.no_grad()
def semi_structured_model(
    model: nn.Module, targets: list[str], dtype: torch.dtype = torch.float16
) -> nn.Module:
    """A ``dtype`` copy of a CUDA model whose 2:4 target Linears use semi-structured sparse weights
    (the original is left as it is)."""
    import copy

    if next(model.parameters()).device.type != "cuda":
        raise ValueError("semi-structured kernels need the model on a CUDA device")
    twin = copy.deepcopy(model).to(dtype)
    converted = 0
    for linear in prunable_linears(twin, targets).values():
        if is_2_4(linear.weight):
            to_semi_structured(linear)
            converted += 1
    if not converted:
        raise ValueError("no target Linear is 2:4 sparse")
    return twin.eval()
