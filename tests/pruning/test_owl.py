"""OWL layer-wise sparsity: the allocation formula by hand, outlier ratios measured on the dense model,
and the pruned model's mean sparsity equal to the target while blocks differ."""

import math

import pytest
import torch

from sppx.anatomy import block_linears, decoder_layers, prunable_linears
from sppx.errors import ConfigError
from sppx.models import TinyLlama
from sppx.pruning import MagnitudePruner, SparseGPTPruner, SparsityPattern, WandaPruner, prune_model
from sppx.pruning.owl import block_outlier_ratios, layer_sparsities, outlier_ratio, owl_sparsities

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_allocation_matches_a_hand_calculation():
    # Ratios 1, 2, 3 -> scaled to [0, 0.2] = 0, 0.1, 0.2 (mean 0.1) -> keep 0.4, 0.5, 0.6 of the weights.
    sparsities = owl_sparsities([0.01, 0.02, 0.03], target=0.5, lam=0.1)
    assert sparsities == pytest.approx([0.6, 0.5, 0.4], abs=1e-12)
    assert owl_sparsities([0.02, 0.02], target=0.7, lam=0.1) == pytest.approx([0.7, 0.7])
    # With unequal block sizes the size-weighted mean is the target.
    weighted = owl_sparsities([0.05, 0.01, 0.03], target=0.6, lam=0.05, sizes=[1, 3, 2])
    assert sum(s * n for s, n in zip(weighted, [1, 3, 2], strict=True)) / 6 == pytest.approx(0.6, abs=1e-12)
    assert weighted[0] < weighted[2] < weighted[1]  # more outliers, lower sparsity


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    w = torch.tensor([[1.0, 1.0, 1.0, 10.0]])
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # Scores 1, 1, 1, 10 (mean 3.25): only 10 exceeds 2 x the mean; nothing exceeds 5 x.
    assert outlier_ratio([w], [norms], 2.0) == pytest.approx(0.25)
    assert outlier_ratio([w], [norms], 5.0) == 0.0
    # The mean is over all of the block's Linears together.
    assert outlier_ratio([w, torch.ones(1, 4)], [norms, norms], 2.0) == pytest.approx(1 / 8)


def four_block_model():
    model, _ = TinyLlama(seed=3, num_hidden_layers=4, hidden_size=128, intermediate_size=256).load()
    return model


def dense_block_norms(model, calib):
    """Input norms of every targeted Linear in a plain dense forward, per block."""
    acc, hooks = {}, []
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block, TARGETS).items():
            key = (i, name)
            acc[key] = torch.zeros(lin.in_features)

            def add(_m, args, _out, key=key):
                acc[key].add_((args[0].reshape(-1, args[0].shape[-1]) ** 2).sum(0))

            hooks.append(lin.register_forward_hook(add))
    with torch.no_grad():
        model(input_ids=calib)
    for h in hooks:
        h.remove()
    return {k: v.sqrt() for k, v in acc.items()}


def test_outlier_ratios_are_measured_on_the_dense_model():
    model = four_block_model()
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 32))
    norms = dense_block_norms(model, calib)
    ratios, sizes = block_outlier_ratios(model, TARGETS, calib, m=3.0, batch_size=4, progress=False)
    for i, block in enumerate(decoder_layers(model)):
        linears = block_linears(block, TARGETS)
        expected = outlier_ratio(
            [lin.weight for lin in linears.values()], [norms[(i, name)] for name in linears], 3.0
        )
        assert ratios[i] == pytest.approx(expected, rel=1e-4)
        assert sizes[i] == sum(lin.weight.numel() for lin in linears.values())
    assert len(set(ratios)) > 1


@pytest.mark.slow
@pytest.mark.parametrize("make", [WandaPruner, MagnitudePruner, SparseGPTPruner], ids=lambda c: c.name)
def test_owl_keeps_the_mean_sparsity_at_the_target_while_blocks_differ(make):
    model = four_block_model()
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 32))
    pruner = make(batch_size=4, allocation="owl", owl_m=3.0, owl_lambda=0.08)
    assert pruner.needs_calibration
    target = 0.6
    layers = layer_sparsities(model, pruner, target, calib, progress=False)
    assert sum(layers) / len(layers) == pytest.approx(target, abs=1e-9)
    assert max(layers) - min(layers) == pytest.approx(0.16, abs=1e-9)  # the ratios span [0, 2 lambda]

    masks = prune_model(model, pruner, layers, SparsityPattern(), calib, progress=False)
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(pruned / total - target) <= 0.001
    linears = prunable_linears(model, TARGETS)
    for name, keep in masks.items():
        layer = int(name.split(".")[2])
        # SparseGPT rounds down per block of 128 columns; the others prune exactly floor(numel * p).
        slack = math.ceil(keep.shape[1] / 128) if make is SparseGPTPruner else 0
        assert 0 <= math.floor(keep.numel() * layers[layer] + 1e-9) - int((~keep).sum()) <= slack
        assert torch.equal(linears[name].weight == 0, ~keep)


def test_uniform_allocation_needs_no_calibration_for_magnitude():
    model = four_block_model()
    pruner = MagnitudePruner()
    assert not pruner.needs_calibration
    assert layer_sparsities(model, pruner, 0.5, None) == [0.5] * 4


def test_owl_is_refused_with_nm_patterns_and_too_wide_a_spread():
    with pytest.raises(
        ConfigError, match=r"^pruner\.allocation='owl': allowed with pattern=unstructured only"
    ):
        WandaPruner(allocation="owl").check_pattern(SparsityPattern("nm", 2, 4), 0.5)
    with pytest.raises(ConfigError, match=r"^pruner\.owl_lambda=0\.2: must keep sparsity \+- 2\*lambda in"):
        WandaPruner(allocation="owl", owl_lambda=0.2).check_pattern(SparsityPattern(), 0.7)
    with pytest.raises(ConfigError, match=r"^pruner\.allocation='layerwise': allowed: uniform, owl"):
        WandaPruner(allocation="layerwise")
    with pytest.raises(ConfigError, match=r"^pruner\.owl_m=0: must be a number > 0"):
        SparseGPTPruner(owl_m=0)
