"""Mask selection and the magnitude / Wanda pruners on single Linears."""

import math

import pytest
import torch
from torch import nn

from sppx.errors import ConfigError
from sppx.pruning import MagnitudePruner, SparsityPattern, WandaPruner
from sppx.pruning.masks import nm_mask, per_matrix_mask, per_row_mask

UNSTRUCTURED = SparsityPattern()


def linear(out_f: int, in_f: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    # Rows of very different scale: a per-matrix threshold then prunes rows unequally.
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1, 1, out_f)[:, None])
    return lin


def wanda_prune(lin: nn.Linear, x: torch.Tensor, sparsity: float, pattern=UNSTRUCTURED) -> torch.Tensor:
    pruner = WandaPruner()
    stats = pruner.new_stats(lin)
    stats.add(x)
    return pruner.prune(lin, stats, sparsity, pattern)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_wanda_rows_have_floor_in_times_p_zeros_and_follow_hand_ordering(sparsity):
    lin = linear(12, 40)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 40) * torch.linspace(0.1, 3.0, 40)
    w = lin.weight.detach().clone()
    keep = wanda_prune(lin, x, sparsity)

    k = math.floor(40 * sparsity)
    assert ((~keep).sum(dim=1) == k).all()
    assert ((lin.weight == 0) == ~keep).all()
    norms = [math.sqrt(sum(float(v) ** 2 for v in x.reshape(-1, 40)[:, j])) for j in range(40)]
    for row in range(12):
        scores = [(abs(float(w[row, j])) * norms[j], j) for j in range(40)]
        expected = {j for _, j in sorted(scores)[:k]}
        assert set(torch.nonzero(~keep[row]).flatten().tolist()) == expected
    # Kept weights are untouched (Wanda does not update weights).
    assert torch.equal(lin.weight[keep], w[keep])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda"])
def test_nm_groups_have_exactly_n_zeros(n, m, pruner):
    lin = linear(10, 64, seed=n * m)
    pattern = SparsityPattern("nm", n, m)
    if pruner == "wanda":
        keep = wanda_prune(lin, torch.randn(50, 64), 0.5, pattern)
    else:
        keep = MagnitudePruner().prune(lin, None, 0.5, pattern)
    zeros_per_group = (lin.weight == 0).reshape(10, 64 // m, m).sum(dim=2)
    assert (zeros_per_group == n).all()
    assert ((~keep).reshape(10, 64 // m, m).sum(dim=2) == n).all()


def test_magnitude_uses_one_threshold_per_matrix():
    lin = linear(16, 32)
    w = lin.weight.detach().abs().clone()
    keep = MagnitudePruner().prune(lin, None, 0.5, UNSTRUCTURED)
    assert int((~keep).sum()) == math.floor(16 * 32 * 0.5)
    assert w[~keep].max() <= w[keep].min()
    per_row = (~keep).sum(dim=1)
    assert per_row.max() > per_row.min()  # small-scale rows lose more: not a per-row rule
    assert per_row[0] > per_row[-1]


def test_ties_are_broken_by_position_deterministically():
    scores = torch.ones(3, 8)
    assert torch.equal(per_row_mask(scores, 0.5)[0], torch.tensor([False] * 4 + [True] * 4))
    assert int((~per_matrix_mask(scores, 0.25)).sum()) == 6
    assert torch.equal(per_matrix_mask(scores, 0.25).flatten()[:6], torch.zeros(6, dtype=torch.bool))
    assert torch.equal(nm_mask(scores, 2, 4)[0], torch.tensor([False, False, True, True] * 2))


def test_masks_are_pure_functions_of_scores():
    torch.manual_seed(0)
    scores = torch.rand(6, 16)
    before = scores.clone()
    assert torch.equal(per_row_mask(scores, 0.5), per_row_mask(scores, 0.5))
    assert torch.equal(scores, before)


@pytest.mark.parametrize(
    "kind,n,m,key",
    [
        ("nm", 4, 4, "pattern.n"),
        ("nm", 5, 4, "pattern.n"),
        ("nm", 0, 4, "pattern.n"),
        ("nm", 1, 1, "pattern.m"),
        ("blocky", None, None, "pattern.kind"),
    ],
)
def test_bad_patterns_are_rejected(kind, n, m, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        SparsityPattern(kind, n, m)


def test_pattern_width_check_names_the_module():
    with pytest.raises(ConfigError, match=r"M=8 must divide the input width 36 of layer\.q"):
        SparsityPattern("nm", 2, 8).check_width(36, "layer.q")
