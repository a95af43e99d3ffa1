"""SPP: forward semantics, exact zero preservation through the merge, and what trains."""

import copy

import pytest
import torch
from torch import nn

from sppx.adapters import SPPAdapter, SPPLinear, load_adapter
from sppx.errors import ConfigError
from sppx.pruning import SparsityPattern, WandaPruner, prune_model


def sparse_linear(out_f=32, in_f=48, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.5)
    return lin


def trained_factors(layer: SPPLinear, seed=1) -> SPPLinear:
    """Nonzero b (and perturbed A), as after some training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.b.normal_(0, 0.5)
        layer.A.add_(0.3 * torch.randn_like(layer.A))
    return layer


def test_forward_is_the_papers_formula():
    base = sparse_linear()
    layer = trained_factors(SPPLinear(base, rows=8, scale=2.0, dropout=0.0))
    x = torch.randn(5, 48)
    rep = layer.A.repeat_interleave(32 // 8, dim=0)  # row o uses A[o // (out // rows)]
    expected = x @ base.weight.T + 2.0 * x @ (base.weight * rep * layer.b[:, None]).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rep[7], layer.A[1]) and torch.equal(rep[8], layer.A[2])


def test_dropout_branch_equals_fused_form_without_dropout():
    base = sparse_linear()
    layer = trained_factors(SPPLinear(base, rows=4, scale=2.0, dropout=0.3))
    x = torch.randn(3, 48)
    layer.eval()  # eval: dropout off, fused path
    fused = layer(x)
    two_branch = base(x) + 2.0 * nn.functional.linear(x, base.weight * layer.row_factors())
    torch.testing.assert_close(fused, two_branch, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_and_keeps_every_zero():
    base = sparse_linear()
    zeros_before = base.weight == 0
    layer = trained_factors(SPPLinear(copy.deepcopy(base), rows=16, scale=2.0, dropout=0.05)).eval()
    x = torch.randn(7, 48)
    unmerged = layer(x)
    merged = layer.merged_weight()
    torch.testing.assert_close(x @ merged.T, unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged == 0, zeros_before | (layer.row_factors() * 2.0 == -1))
    assert (merged[zeros_before] == 0).all()


def test_zero_b_gives_the_pruned_output_exactly():
    base = sparse_linear()
    layer = SPPLinear(copy.deepcopy(base), rows=8, scale=2.0, dropout=0.05)
    x = torch.randn(4, 48)
    assert torch.equal(layer.eval()(x), base(x))
    assert torch.equal(layer.merged_weight(), base.weight)


def test_rows_must_divide_output_width():
    with pytest.raises(ValueError, match="rows=5 must divide the output width 32"):
        SPPLinear(sparse_linear(), rows=5, scale=2.0, dropout=0.0)
    with pytest.raises(ConfigError, match=r"^adapter\.rows=5: must divide the output width"):
        SPPAdapter(rows=5).check_shapes({"layers.0.q_proj": (32, 48)})


def _pruned_tiny(tiny, sparsity=0.5, pattern=SparsityPattern("unstructured")):
    model, _ = tiny
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 16))
    masks = prune_model(model, WandaPruner(batch_size=2), sparsity, pattern, calib, progress=False)
    return model, masks


def test_model_level_b_zero_start_merge_and_sparsity(tiny):
    model, masks = _pruned_tiny(tiny, pattern=SparsityPattern("nm", 2, 4))
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        pruned_logits = model(input_ids=ids).logits
    adapter = SPPAdapter(rows=16, dropout=0.05)
    names = adapter.apply(model)
    assert set(names) == set(masks)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, pruned_logits)  # b = 0: exactly the pruned model
        for mod in adapter.wrapped(model).values():
            trained_factors(mod)
        unmerged = model(input_ids=ids).logits
    adapter.merge(model)
    assert not adapter.wrapped(model)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert (w[~keep] == 0).all()
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()  # 2:4 groups survive


def test_only_adapter_parameters_change_after_an_optimizer_step(tiny):
    model, _ = _pruned_tiny(tiny)
    adapter = SPPAdapter(rows=16, dropout=0.0)
    adapter.apply(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".b")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    ids = torch.randint(0, 256, (2, 24))
    logits = model(input_ids=ids).logits
    nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {k for k in after if k.endswith((".A", ".b"))}
    assert any(k.endswith(".b") for k in changed)


def test_saved_adapter_rebuilds_the_same_merge(tiny, tmp_path):
    model, _ = _pruned_tiny(tiny)
    reference = copy.deepcopy(model)
    adapter = SPPAdapter(rows=8, alpha=32.0, r=8)
    adapter.apply(model)
    for mod in adapter.wrapped(model).values():
        trained_factors(mod)
    adapter.save(model, tmp_path / "adapter")
    adapter.merge(model)
    rebuilt = load_adapter(reference, tmp_path / "adapter")
    assert isinstance(rebuilt, SPPAdapter) and rebuilt.scale == 4.0 and rebuilt.rows == 8
    rebuilt.merge(reference)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from sppx.module import TuneConfig, TuneModule

    grads = []
    for checkpointing in (False, True):
        model, _ = _pruned_tiny((copy.deepcopy(tiny[0]), tiny[1]))
        SPPAdapter(rows=16, dropout=0.0).apply(model)
        for mod in model.modules():
            if isinstance(mod, SPPLinear):
                trained_factors(mod)
        module = TuneModule(model, TuneConfig(gradient_checkpointing=checkpointing))
        model.train()
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        logits = model(input_ids=ids).logits
        nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1)).backward()
        active = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        assert active == checkpointing and module.trainable_parameters()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_grouped_forward_gives_the_same_outputs_and_gradients():
    base = sparse_linear()
    plain = trained_factors(SPPLinear(copy.deepcopy(base), rows=8, scale=2.0, dropout=0.0))
    grouped = SPPLinear(copy.deepcopy(base), rows=8, scale=2.0, dropout=0.0, grouped=True)
    grouped.load_state_dict(plain.state_dict())  # the same factors
    x = torch.randn(2, 5, 48)
    y_plain, y_grouped = plain(x), grouped(x)
    torch.testing.assert_close(y_grouped, y_plain, rtol=1e-5, atol=1e-5)
    y_plain.square().sum().backward()
    y_grouped.square().sum().backward()
    torch.testing.assert_close(grouped.A.grad, plain.A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped.b.grad, plain.b.grad, rtol=1e-4, atol=1e-5)
    # With dropout the grouped form is the two-branch form with the same mask.
    drop = trained_factors(
        SPPLinear(copy.deepcopy(base), rows=8, scale=2.0, dropout=0.3, grouped=True)
    ).train()
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    expected = base(x) + 2.0 * nn.functional.linear(drop.dropout(x), base.weight * drop.row_factors())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert SPPAdapter(grouped=True).wrap(copy.deepcopy(base)).grouped
