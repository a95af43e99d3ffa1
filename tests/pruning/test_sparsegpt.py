"""SparseGPT on single Linears: exact mask counts, the Hessian, damping retries, and that its weight
updates reconstruct the layer output better than masks without updates."""

import logging
import math

import pytest
import torch
from torch import nn

from sppx.errors import ConfigError
from sppx.pruning import MagnitudePruner, SparseGPTPruner, SparsityPattern, WandaPruner
from sppx.pruning.sparsegpt import Hessian, hessian_factor, inverse_cholesky_upper, sparsegpt_prune

UNSTRUCTURED = SparsityPattern("unstructured")


def layer_and_inputs(out_f=32, in_f=64, tokens=512, seed=0):
    """A Linear and correlated inputs (features mixed by a random matrix), as real activations are."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen))
    mix = torch.randn(in_f, in_f, generator=gen) / math.sqrt(in_f) + torch.eye(in_f)
    # Feature scales vary 10x in no particular column order. (Scales sorted by column would defeat any
    # per-block mask: every block of columns must give up the same fraction.)
    scale = torch.linspace(0.2, 2.0, in_f)[torch.randperm(in_f, generator=gen)]
    x = torch.randn(tokens, in_f, generator=gen) @ mix * scale
    return lin, x


def prune_with(pruner, lin, x, sparsity, pattern):
    stats = pruner.new_stats(lin)
    if stats is not None:
        for chunk in x.split(100):
            stats.add(chunk)
    return pruner.prune(lin, stats, sparsity, pattern)


def output_error(dense_w, lin, x) -> float:
    return float(torch.linalg.norm(x @ dense_w.T - x @ lin.weight.detach().T))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "pattern", [UNSTRUCTURED, SparsityPattern("nm", 2, 4), SparsityPattern("nm", 4, 8)], ids=lambda p: p.label
)
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern, seed):
    errors = {}
    for name, pruner in [
        ("sparsegpt", SparseGPTPruner(blocksize=16)),
        ("wanda", WandaPruner()),
        ("magnitude", MagnitudePruner()),
    ]:
        lin, x = layer_and_inputs(seed=seed)
        dense = lin.weight.detach().clone()
        prune_with(pruner, lin, x, 0.5, pattern)
        errors[name] = output_error(dense, lin, x)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_has_exactly_n_zeros_per_group(n, m):
    lin, x = layer_and_inputs()
    keep = prune_with(SparseGPTPruner(blocksize=32), lin, x, 0.5, SparsityPattern("nm", n, m))
    assert ((~keep).reshape(32, -1, m).sum(-1) == n).all()
    assert ((lin.weight == 0).reshape(32, -1, m).sum(-1) >= n).all()
    assert (lin.weight[~keep] == 0).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_unstructured_prunes_the_block_quota(sparsity):
    lin, x = layer_and_inputs(in_f=80)
    keep = prune_with(SparseGPTPruner(blocksize=32), lin, x, sparsity, UNSTRUCTURED)
    blocks = [32, 32, 16]
    assert int((~keep).sum()) == sum(math.floor(sparsity * 32 * b) for b in blocks)
    start = 0
    for b in blocks:
        assert int((~keep[:, start : start + b]).sum()) == math.floor(sparsity * 32 * b)
        start += b


def test_hessian_is_two_over_n_xtx_across_batches():
    x = torch.randn(300, 16)
    h = Hessian(16, torch.device("cpu"))
    for chunk in x.split(70):
        h.add(chunk.reshape(2, -1, 16) if chunk.shape[0] % 2 == 0 else chunk)
    torch.testing.assert_close(h.H, 2.0 / 300 * x.T @ x, rtol=1e-5, atol=1e-6)
    assert h.tokens == 300


def test_dead_inputs_get_zero_weights_and_no_nans():
    lin, x = layer_and_inputs()
    x[:, [3, 17]] = 0.0
    keep = prune_with(SparseGPTPruner(blocksize=16), lin, x, 0.5, UNSTRUCTURED)
    assert torch.isfinite(lin.weight).all()
    assert (lin.weight[:, [3, 17]] == 0).all()
    assert (lin.weight[~keep] == 0).all()


def test_dead_inputs_count_as_one_in_the_factor_and_the_shared_hessian_is_left_alone():
    _, x = layer_and_inputs(in_f=48)
    x[:, [3, 17]] = 0.0
    H = 2.0 / x.shape[0] * x.T @ x
    before = H.clone()
    U, dead = hessian_factor(H, 0.01)
    assert torch.equal(H, before)  # q, k and v share it: the factor must not write into it
    assert dead.nonzero().flatten().tolist() == [3, 17]
    fixed = H.clone()
    fixed[[3, 17], [3, 17]] = 1.0
    damped = fixed + 0.01 * torch.diag(fixed).mean() * torch.eye(48)
    torch.testing.assert_close(
        U, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-3, atol=1e-5
    )


def test_failed_cholesky_raises_damping_and_logs(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # mean diag 0.625: PD only once damping > 0.8
    with caplog.at_level(logging.WARNING):
        U = inverse_cholesky_upper(H, percdamp=0.01)
    assert len([r for r in caplog.records if "Cholesky failed" in r.message]) == 2
    expected = torch.linalg.cholesky(torch.linalg.inv(H + 1.0 * 0.625 * torch.eye(4)), upper=True)
    torch.testing.assert_close(U, expected)
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_cholesky_upper(-torch.eye(4) * 1e6 - torch.ones(4, 4), percdamp=0.01, max_tries=2)


def test_weights_keep_their_dtype_and_blocksize_must_fit_m():
    lin, x = layer_and_inputs()
    w, keep = sparsegpt_prune(
        lin.weight.to(torch.bfloat16), 2.0 / 512 * x.T @ x, 0.5, UNSTRUCTURED, blocksize=64
    )
    assert w.dtype == torch.bfloat16 and (w[~keep] == 0).all()
    with pytest.raises(ConfigError, match=r"^pruner\.blocksize=6: must be a multiple of M=4"):
        SparseGPTPruner(blocksize=6).check_pattern(SparsityPattern("nm", 2, 4))


def test_inverse_factor_matches_the_cholesky_of_the_inverse():
    _, x = layer_and_inputs(in_f=48)
    H = 2.0 / x.shape[0] * x.T @ x
    U = inverse_cholesky_upper(H, percdamp=0.01)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(48)
    torch.testing.assert_close(
        U, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-3, atol=1e-5
    )
    assert torch.equal(U, torch.triu(U)) and (torch.diag(U) > 0).all()


def test_a_shared_hessian_gives_the_same_result_as_separate_ones():
    lin_a, x = layer_and_inputs(seed=4)
    lin_b, _ = layer_and_inputs(seed=5)
    pruner = SparseGPTPruner(blocksize=16)
    shared = pruner.new_stats(lin_a)
    shared.add(x)
    alone = pruner.new_stats(lin_b)
    alone.add(x)
    b_copy = nn.Linear(64, 32, bias=False)
    b_copy.weight.data.copy_(lin_b.weight)
    pruner.prune(lin_a, shared, 0.5, UNSTRUCTURED)
    keep_shared = pruner.prune(lin_b, shared, 0.5, UNSTRUCTURED)  # reuses the cached factor
    keep_alone = pruner.prune(b_copy, alone, 0.5, UNSTRUCTURED)
    assert torch.equal(keep_shared, keep_alone) and torch.equal(lin_b.weight, b_copy.weight)


@pytest.mark.parametrize(
    "pattern,sparsity", [(UNSTRUCTURED, 0.5), (UNSTRUCTURED, 0.7), (SparsityPattern("nm", 2, 4), 0.5)]
)
def test_linears_fed_the_same_inputs_pruned_in_one_stacked_sweep_as_each_alone(pattern, sparsity):
    """q, k, v (rows 48, 16, 16) share H: one sweep over their stacked rows gives every matrix its own
    masks and block counts, and its weights to float rounding (fused and plain multiply-adds)."""
    _, x = layer_and_inputs(in_f=80, seed=6)
    gen = torch.Generator().manual_seed(7)
    linears = {name: nn.Linear(80, rows, bias=False) for name, rows in (("q", 48), ("k", 16), ("v", 16))}
    alone = {}
    for name, lin in linears.items():
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.out_features, 80, generator=gen))
        alone[name] = nn.Linear(80, lin.out_features, bias=False)
        alone[name].weight.data.copy_(lin.weight)
    pruner = SparseGPTPruner(blocksize=32)
    stats = pruner.new_stats(linears["q"])
    stats.add(x)
    keeps = pruner.prune_shared(linears, stats, sparsity, pattern)
    for name, lin in linears.items():
        keep_alone = pruner.prune(alone[name], stats, sparsity, pattern)
        assert torch.equal(keeps[name], keep_alone), name
        torch.testing.assert_close(lin.weight, alone[name].weight, rtol=0, atol=1e-5)
        assert (lin.weight[~keeps[name]] == 0).all()
        if not pattern.is_nm:  # each matrix its own count per block of columns
            for start, width in ((0, 32), (32, 32), (64, 16)):
                block = ~keeps[name][:, start : start + width]
                assert int(block.sum()) == math.floor(sparsity * lin.out_features * width)


def test_prune_model_sweeps_each_set_of_linears_with_one_input_together(tiny):
    """The engine hands SparseGPT q/k/v and gate/up as groups (one shared Hessian each), o and down alone."""
    from sppx.anatomy import decoder_layers
    from sppx.pruning import prune_model

    model, _ = tiny
    calls = []

    class Recording(SparseGPTPruner):
        def prune_shared(self, linears, stats, sparsity, pattern):
            calls.append(sorted(linears))
            return super().prune_shared(linears, stats, sparsity, pattern)

    masks = prune_model(
        model, Recording(batch_size=4), 0.5, UNSTRUCTURED, torch.randint(0, 256, (4, 16)), False
    )
    per_block = [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert calls == per_block * len(decoder_layers(model))
    assert len(masks) == 7 * len(decoder_layers(model))
