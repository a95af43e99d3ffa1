"""Masks in the student's forward over dense weights; nested masks; pruning that keeps weights dense."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sppx.adapters import LoRAAdapter, MaskedLoRAAdapter, SPPAdapter
from sppx.anatomy import prunable_linears
from sppx.masking import NEVER, DenseKeeper, MaskedLinear, StudentMasks, masked_linear, nested_levels
from sppx.pruning import MagnitudePruner, SparsityPattern, WandaPruner, prune_model
from tests.conftest import parameter_storages

UNSTRUCTURED = SparsityPattern("unstructured")


def calibration(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- masked linear
def test_masked_linear_matches_the_masked_weight_and_saves_no_masked_copy():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    keep = torch.rand(48, 32) > 0.5
    x = torch.randn(5, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = masked_linear(x, weight, keep)
    y_ref = x_ref @ (weight * keep).T
    torch.testing.assert_close(y, y_ref)
    # Only references to the frozen weight and the mask are kept for the backward pass: no 48 x 32 float
    # temporary (the masked weight) other than the weight itself.
    big = [t for t in saved if t.numel() == weight.numel() and t.dtype == weight.dtype]
    assert all(t.data_ptr() == weight.data_ptr() for t in big)

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_masked_linear_refuses_a_trainable_weight():
    weight = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3, requires_grad=True)
    y = masked_linear(x, weight, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="frozen"):
        y.sum().backward()


def test_masked_module_shares_the_weight_and_bakes_exact_zeros():
    linear = nn.Linear(8, 6)
    dense = linear.weight.detach().clone()
    keep = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    masked = MaskedLinear(linear, keep)
    assert masked.weight is linear.weight and masked.bias is linear.bias
    assert set(masked.state_dict()) == set(linear.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(masked(x), x @ (dense * keep).T + linear.bias)
    masked.masked = False
    torch.testing.assert_close(masked(x), linear(x))
    assert torch.equal(linear.weight, dense)  # nothing was written to the dense weight
    plain = masked.baked()
    assert type(plain) is nn.Linear and plain.weight is linear.weight
    assert torch.equal(plain.weight, dense * keep)
    assert not torch.signbit(plain.weight[~keep]).any()  # exactly +0.0


# --------------------------------------------------------------------------- nested masks
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_nested_levels_are_nested_and_end_at_the_pruners_mask(steps):
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(12, 40, generator=gen)
    scores[:, :5] = 0.5  # ties
    keep = torch.rand(12, 40, generator=gen) > 0.7
    levels = nested_levels(scores, keep, steps)
    assert levels.dtype == torch.uint8
    assert torch.equal(levels == NEVER, keep)
    pruned_per_row = (~keep).sum(dim=1)
    previous = torch.ones_like(keep)
    for k in range(steps + 1):
        mask = levels > k
        assert not (mask & ~previous).any(), "a later (sparser) mask keeps a weight an earlier one removed"
        assert torch.equal((~mask).sum(dim=1), pruned_per_row * k // steps)  # floor(k / steps * c) per row
        # Within a row, the removed weights are the lowest-scoring of the pruner's removed ones.
        for row in range(keep.shape[0]):
            removed = scores[row][~mask[row]]
            still = scores[row][mask[row] & ~keep[row]]
            if removed.numel() and still.numel():
                assert removed.max() <= still.min()
        previous = mask
    assert torch.equal(levels > 0, torch.ones_like(keep))
    assert torch.equal(levels > steps, keep)


# --------------------------------------------------------------------------- pruning with dense weights kept
@pytest.mark.parametrize("pruner", [MagnitudePruner(), WandaPruner()])
def test_keeping_dense_weights_gives_the_same_masks_and_the_pruned_models_outputs(tiny, pruner):
    model, _ = tiny
    reference = copy.deepcopy(model)
    calib = calibration()
    expected = prune_model(reference, pruner, 0.6, UNSTRUCTURED, calib, progress=False)
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model, pruner.targets).items()}
    keeper = DenseKeeper(pruner, steps=10)
    masks = prune_model(model, pruner, 0.6, UNSTRUCTURED, calib, progress=False, keeper=keeper)
    assert masks.keys() == expected.keys()
    for name, keep in masks.items():
        assert torch.equal(keep, expected[name])
        assert torch.equal(model.get_submodule(name).weight, dense[name])  # restored exactly
        assert torch.equal(keeper.levels[name] > 10, keep)

    before = parameter_storages(model)
    students = StudentMasks.attach(model, masks, keeper.levels, steps=10)
    assert parameter_storages(model) == before  # no parameter was copied
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
        students.set_level(0)
        students.bake()  # level 0: nothing removed
    for name in masks:
        assert type(model.get_submodule(name)) is nn.Linear
        assert torch.equal(model.get_submodule(name).weight, dense[name])


def test_student_masks_levels_and_dense_view(tiny):
    model, _ = tiny
    original = copy.deepcopy(model)
    pruner = MagnitudePruner()
    keeper = DenseKeeper(pruner, steps=4)
    masks = prune_model(model, pruner, 0.5, UNSTRUCTURED, progress=False, keeper=keeper)
    students = StudentMasks.attach(model, masks, keeper.levels, steps=4)
    ids = calibration(2)
    assert students.sparsity() == pytest.approx(0.5, abs=1e-3)
    students.set_level(2)
    assert students.sparsity() == pytest.approx(0.25, abs=0.01)
    with torch.no_grad(), students.dense():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    with students.at_level(0):
        assert students.sparsity() == 0.0
    assert students.level == 2
    with pytest.raises(ValueError):
        students.set_level(5)


@pytest.mark.parametrize("adapter", [SPPAdapter(dropout=0.0), MaskedLoRAAdapter(dropout=0.0)])
def test_adapters_on_masked_linears_merge_to_the_students_function_and_keep_zeros(tiny, adapter):
    model, _ = tiny
    pruner = MagnitudePruner()
    keeper = DenseKeeper(pruner, steps=5)
    masks = prune_model(model, pruner, 0.6, UNSTRUCTURED, progress=False, keeper=keeper)
    students = StudentMasks.attach(model, masks, keeper.levels, steps=5)
    adapter.apply(model)
    with torch.no_grad():
        for t in adapter.state(model).values():
            t.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    ids = calibration(2)
    # The masked-LoRA update and SPP both follow the mask step the student is at.
    students.set_level(3)
    students.set_level(5)
    with torch.no_grad():
        unmerged = model(ids).logits
        adapter.merge(model)
        students.bake()
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    for name, keep in masks.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        assert int((linear.weight[~keep] != 0).sum()) == 0
        assert int((~keep).sum()) > 0


def test_lora_on_masked_linears_merges_the_students_function(tiny):
    model, _ = tiny
    pruner = MagnitudePruner()
    keeper = DenseKeeper(pruner)
    masks = prune_model(model, pruner, 0.5, UNSTRUCTURED, progress=False, keeper=keeper)
    students = StudentMasks.attach(model, masks)
    adapter = LoRAAdapter(dropout=0.0)
    adapter.apply(model)
    with torch.no_grad():
        for key, t in adapter.state(model).items():
            if key.endswith(".B"):
                t.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
    ids = calibration(2)
    with torch.no_grad():
        unmerged = model(ids).logits
        with students.dense(), adapter.disabled(model):
            dense = model(ids).logits
        adapter.merge(model)  # the masked weight plus B A: dense again
        students.bake()
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dense, unmerged)
    for name, keep in masks.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        assert int((linear.weight[~keep] != 0).sum()) == int((~keep).sum())  # every zero filled in
