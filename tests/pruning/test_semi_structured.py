"""2:4 weights through torch's semi-structured sparse kernels (the GPU part skips on CPU-only machines)."""

import pytest
import torch
from torch import nn

from sppx.pruning import MagnitudePruner, SparsityPattern
from sppx.pruning.semi_structured import is_2_4, to_semi_structured


def test_the_2_4_check_reads_every_group():
    lin = nn.Linear(64, 32, bias=False)
    assert not is_2_4(lin.weight)
    MagnitudePruner().prune(lin, None, 0.5, SparsityPattern("nm", 2, 4))
    assert is_2_4(lin.weight)
    with torch.no_grad():
        lin.weight[3, 5] = 1.0 if lin.weight[3, 5] == 0 else lin.weight[3, 4]
        lin.weight[3, 4:8] = 1.0
    assert not is_2_4(lin.weight)
    with pytest.raises(ValueError, match="CUDA fp16/bf16"):
        to_semi_structured(lin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need a CUDA GPU")
def test_semi_structured_linear_gives_the_dense_outputs():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=False)
    MagnitudePruner().prune(lin, None, 0.5, SparsityPattern("nm", 2, 4))
    lin = lin.half().cuda()
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense = lin(x)
        sparse = to_semi_structured(lin)(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)
