"""The kernel of the fp32 products in pruning's calibration forwards on the CPU (sppx.cpu_linear)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sppx import cpu_linear
from sppx.cpu_linear import chosen_kernel, linear_kernel, onednn_linears, onednn_works, use_onednn
from sppx.pipeline import run
from sppx.pruning import SparseGPTPruner, SparsityPattern, WandaPruner, prune_model
from tests.conftest import compose_config, tiny_run_overrides

needs_onednn = pytest.mark.skipif(not onednn_works(), reason="this torch has no working oneDNN Linear")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of every product that went through oneDNN."""
    calls = []
    product = cpu_linear.onednn_linear

    def counted(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return product(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "onednn_linear", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("shape", [(64,), (7, 64), (2, 5, 64), (3, 2, 4, 64)])
def test_onednn_gives_f_linear_outputs_to_fp32_rounding(shape):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    dense = torch.randn(*shape, generator=generator)
    strided = torch.randn(*shape[:-1], 128, generator=generator)[..., ::2]
    for x in (dense, strided):
        for b in (None, bias):
            got = cpu_linear.onednn_linear(x, weight, b)
            assert got.shape == (*shape[:-1], 48)
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_the_setting_picks_the_kernel_from_the_machine(monkeypatch):
    """torch never, onednn whenever it works, auto where MKL runs on a CPU that is not Intel's."""
    with linear_kernel("torch"):
        assert not use_onednn() and chosen_kernel() == "torch"
    with linear_kernel("onednn"):
        assert use_onednn() == onednn_works()
    monkeypatch.setattr(cpu_linear, "onednn_works", lambda: True)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    for vendor, expected in [("GenuineIntel", "torch"), ("AuthenticAMD", "onednn"), ("", "torch")]:
        monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda vendor=vendor: vendor)
        with linear_kernel("auto"):
            assert chosen_kernel() == expected, vendor
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)  # no MKL: torch's own BLAS
    with linear_kernel("auto"):
        assert chosen_kernel() == "torch"
    with (
        pytest.raises(ValueError, match=r"^cpu_linear='fast': allowed auto, onednn, torch$"),
        linear_kernel("fast"),
    ):
        pass


@needs_onednn
def test_only_plain_fp32_linears_are_switched_their_hooks_run_and_they_are_restored(onednn_calls):
    class Wrapped(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(8, 8), Wrapped(8, 8), nn.Linear(8, 8).double(), nn.ReLU()])
    hooked = []
    model[0].register_forward_pre_hook(lambda _m, args: hooked.append(args[0].shape))
    x = torch.randn(2, 8)
    with torch.no_grad(), linear_kernel("onednn"), onednn_linears(model):
        assert [("forward" in vars(m)) for m in model] == [True, False, False, False]
        with onednn_linears(model):  # nested: the enclosing context keeps its own replacement
            model[0](x)
        assert "forward" in vars(model[0])
        out = model[1](model[0](x))
    assert not any("forward" in vars(m) for m in model)
    assert onednn_calls == [(2, 8), (2, 8)] and hooked == [(2, 8), (2, 8)]
    with torch.no_grad():
        torch.testing.assert_close(out, model[1](model[0](x)), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_product_that_needs_gradients_stays_with_torch(onednn_calls):
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    with linear_kernel("onednn"), onednn_linears(linear):
        linear(torch.randn(3, 8)).sum().backward()
        assert onednn_calls == []
        with torch.no_grad():
            linear(torch.randn(3, 8))
    assert linear.weight.grad is not None and onednn_calls == [(3, 8)]


@needs_onednn
@pytest.mark.parametrize("pruner_cls", [WandaPruner, SparseGPTPruner])
def test_pruning_calibrates_through_the_chosen_kernel_with_the_same_counts(tiny, onednn_calls, pruner_cls):
    """With onednn every calibration product of the blocks' Linears goes through it (both passes), with
    torch none does; each matrix keeps exactly half either way, and the masks differ only at rounding
    near-ties."""
    model, _ = tiny
    calib = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    with linear_kernel("torch"):
        reference = prune_model(
            copy.deepcopy(model), pruner_cls(), 0.5, SparsityPattern(), calib, progress=False
        )
    assert onednn_calls == []
    with linear_kernel("onednn"):
        masks = prune_model(copy.deepcopy(model), pruner_cls(), 0.5, SparsityPattern(), calib, progress=False)
    # 2 blocks, one batch of 8 windows: 7 Linears in the output pass of block 0, 6 in each measuring pass (down's
    # input is the last one needed: its product never runs there).
    assert len(onednn_calls) == 6 + 7 + 6
    agree = total = 0
    for name, keep in masks.items():
        assert int(keep.sum()) == keep.numel() // 2 == int(reference[name].sum())
        agree += int((keep == reference[name]).sum())
        total += keep.numel()
    assert agree / total > 0.98


def test_the_run_records_the_kernel(tmp_path, text_file):
    overrides = [
        *tiny_run_overrides(text_file, adapter="none", **{"export.enabled": "false"}),
        "cpu_linear=torch",
    ]
    results = run(compose_config(overrides, tmp_path), progress=False)
    assert results["prune"]["cpu_linear"] == "torch" and results["config"]["cpu_linear"] == "torch"
