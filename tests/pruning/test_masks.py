"""Mask selection and the magnitude / Wanda pruners on single Linears."""

import math

import pytest
import torch
from torch import nn

from sppx.errors import ConfigError
from sppx.pruning import MagnitudePruner, SparsityPattern, WandaPruner
from sppx.pruning.masks import PackedMasks, kth_smallest, lowest, nm_mask, per_matrix_mask, per_row_mask
from sppx.pruning.wanda import cumulative_mask, wanda_scores

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


def stable_sort_lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    order = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, order, True)


def test_lowest_selects_exactly_what_a_stable_sort_does_ties_included():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        shape = (
            int(torch.randint(1, 7, (1,), generator=gen)),
            int(torch.randint(1, 12, (1,), generator=gen)),
        )
        scores = torch.randint(0, 4, shape, generator=gen).float()  # many ties
        dim = trial % 2
        k = int(torch.randint(0, shape[dim] + 1, (1,), generator=gen))
        assert torch.equal(lowest(scores, k, dim), stable_sort_lowest(scores, k, dim)), (scores, k, dim)


@pytest.mark.parametrize(
    "dtype, width",
    [
        (torch.float32, 4),  # groups of four: the min/max network
        (torch.float32, 9),  # NumPy's selection
        (torch.float64, 7),
        (torch.bfloat16, 9),  # torch.kthvalue
        (torch.int64, 4),
    ],
)
def test_kth_smallest_gives_kthvalues_values_on_every_path(dtype, width):
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        scores = torch.randint(0, 5, (3, 5, width), generator=gen).to(dtype)  # many ties
        if trial % 3 == 0:
            scores = torch.rand(3, 5, width, generator=gen).to(dtype)
        if trial % 5 == 0 and dtype.is_floating_point:  # NaN goes last, as kthvalue orders it
            scores[0, 1, trial % width] = float("nan")
        for dim in (2, 0, -1):
            for k in range(1, scores.shape[dim] + 1):
                expected = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
                got = kth_smallest(scores, k, dim)
                torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("sparsity", [0.6, 0.55, 0.123])
def test_per_row_mask_prunes_exactly_floor_numel_p_rows_differing_by_at_most_one(sparsity):
    torch.manual_seed(0)
    scores = torch.rand(24, 50)
    keep = per_row_mask(scores, sparsity)
    per_row = (~keep).sum(dim=1)
    assert int(per_row.sum()) == math.floor(24 * 50 * sparsity + 1e-9)
    assert set(per_row.tolist()) <= {math.floor(50 * sparsity), math.floor(50 * sparsity) + 1}
    for row in range(24):  # each row prunes its lowest scores
        assert scores[row][~keep[row]].max() <= scores[row][keep[row]].min()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6, 0.75, 0.9])
def test_wanda_variant_hits_the_target_within_0_001_with_rows_that_differ(sparsity):
    lin = linear(64, 256, seed=2)
    torch.manual_seed(3)
    x = torch.randn(40, 256) * torch.logspace(-1, 0.5, 256)
    w = lin.weight.detach().clone()
    pruner = WandaPruner(use_variant=True)
    stats = pruner.new_stats(lin)
    stats.add(x)
    keep = pruner.prune(lin, stats, sparsity, UNSTRUCTURED)
    assert abs(float((~keep).float().mean()) - sparsity) <= 0.001
    assert torch.equal(lin.weight == 0, ~keep) and torch.equal(lin.weight[keep], w[keep])
    per_row = (~keep).sum(dim=1)
    assert per_row.max() > per_row.min()  # unlike plain Wanda, rows get different sparsities

    # The rule itself: in each row the pruned entries are the lowest scores, and their sum stays within
    # alpha x the row's total while one more would exceed it.
    scores = wanda_scores(w, stats.norms)
    mask, alpha = cumulative_mask(scores, sparsity)
    assert torch.equal(mask, keep)
    for row in range(64):
        pruned, kept = scores[row][~keep[row]], scores[row][keep[row]]
        assert pruned.max() <= kept.min()
        assert float(pruned.sum()) <= alpha * float(scores[row].sum()) * (1 + 1e-5)
        assert float(pruned.sum() + kept.min()) > alpha * float(scores[row].sum()) * (1 - 1e-5)


def test_wanda_variant_is_refused_with_nm_patterns():
    with pytest.raises(
        ConfigError, match=r"^pruner\.use_variant=True: allowed with pattern=unstructured only"
    ):
        WandaPruner(use_variant=True).check_pattern(SparsityPattern("nm", 2, 4), 0.5)
    with pytest.raises(ConfigError, match=r"^pruner\.use_variant='yes': must be true or false"):
        WandaPruner(use_variant="yes")


def test_reserved_masks_are_packed_into_one_buffer_and_read_back_exactly():
    torch.manual_seed(0)
    keeps = {"a": torch.rand(5, 13) > 0.5, "b": torch.rand(3, 2, 8) > 0.3, "c": torch.rand(4, 9) > 0.5}
    masks = PackedMasks()
    masks.reserve({"a": (5, 13), "b": (3, 2, 8), "c": (2, 9)})  # c comes with another shape
    for name, keep in keeps.items():
        masks[name] = keep
    masks["d"] = keeps["a"]  # not reserved
    assert list(masks) == ["a", "b", "c", "d"]
    for name, keep in {**keeps, "d": keeps["a"]}.items():
        assert torch.equal(masks[name], keep)
    storage = {name: bits.untyped_storage().data_ptr() for name, bits in masks.bits.items()}
    assert storage["a"] == storage["b"] and len({storage["a"], storage["c"], storage["d"]}) == 3
    assert masks.bits["a"].shape == (5, 2) and masks.bits["b"].shape == (3, 2)
    assert not masks.reserved  # every reserved name recorded (c in memory of its own)
