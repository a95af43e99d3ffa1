"""The tuning recipe: each adapter's own learning rate, a warmup that never starts at lr 0, and the
fused single-matmul forms of the adapters."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sppx.adapters import MaskedLoRAAdapter, SPPAdapter
from sppx.errors import ConfigError
from sppx.lr_search import GridSearch, search
from sppx.module import TuneConfig, TuneModule, WarmupSchedule
from sppx.pipeline import plan
from tests.conftest import compose_config


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_warmup_starts_above_zero_and_never_reaches_zero_on_a_step(kind):
    total, warmup = 30, 3
    f = WarmupSchedule(warmup, total, kind)
    factors = [f(step) for step in range(total)]
    assert factors[0] == pytest.approx(1 / warmup)  # the first step learns at lr / warmup
    assert factors[:warmup] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert max(factors) == pytest.approx(1.0)
    assert min(factors) > 0  # no step is taken at lr 0
    if kind == "linear":
        assert factors[-1] == pytest.approx(1 / (total - warmup))
        assert all(a >= b for a, b in zip(factors[warmup - 1 :], factors[warmup:], strict=False))
    if kind == "constant_with_warmup":
        assert factors[warmup:] == [1.0] * (total - warmup)


def test_no_warmup_starts_at_the_full_lr():
    assert WarmupSchedule(0, 10, "linear")(0) == 1.0
    assert WarmupSchedule(1, 30, "linear")(0) == 1.0  # ceil(0.03 x 30) = 1: the first step at the full lr


def test_the_first_optimizer_step_runs_at_a_positive_lr(tiny):
    model, _ = tiny
    SPPAdapter(rows=4).apply(model)
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    windows = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    module = TuneModule(model, TuneConfig(lr=1e-2, warmup_ratio=0.5, checkpoint_every=0))
    trainer = pl.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, DataLoader(TensorDataset(windows), batch_size=2))
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])  # warmup 2 of 4 steps, then linear decay


@pytest.mark.parametrize("adapter", ["spp", "masked_lora", "lora"])
def test_each_adapter_tunes_at_its_own_lr_unless_tune_lr_is_set(tmp_path, adapter):
    p = plan(compose_config(["model=tiny-llama", f"adapter={adapter}"], tmp_path / adapter))
    assert p.tune.lr == p.adapter.lr
    assert isinstance(p.tune.lr, float) and 0 < p.tune.lr < 1
    q = plan(compose_config(["model=tiny-llama", f"adapter={adapter}", "tune.lr=0.0042"], tmp_path / "set"))
    assert q.tune.lr == 0.0042 and q.adapter.lr == p.adapter.lr
    assert p.cfg.tune.lr == p.adapter.lr and q.cfg.tune.lr == 0.0042  # the config records the lr that ran


def test_an_adapter_without_an_lr_needs_tune_lr(tmp_path):
    with pytest.raises(ConfigError, match=r"^tune\.lr=None: must be set: adapter=spp has no lr of its own"):
        plan(compose_config(["model=tiny-llama", "adapter.lr=null"], tmp_path))


def _pruned_linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(32, 16, bias=True)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.5] = 0.0
    return linear


@pytest.mark.parametrize("adapter_cls", [SPPAdapter, MaskedLoRAAdapter])
def test_fused_forward_equals_the_two_branch_forward_with_its_gradients(adapter_cls):
    """dropout 0 takes one matmul with the merged weight; with dropout in eval mode it is the
    two-branch sum. Same outputs and the same adapter gradients."""
    kwargs = {"rows": 4} if adapter_cls is SPPAdapter else {"r": 4}
    fused = adapter_cls(targets=["lin"], dropout=0.0, **kwargs).wrap(_pruned_linear())
    branches = adapter_cls(targets=["lin"], dropout=0.5, **kwargs).wrap(_pruned_linear())
    with torch.no_grad():
        for name, t in fused.adapter_state().items():
            t.normal_()
            branches.adapter_state()[name].copy_(t)
    x = torch.randn(3, 5, 32)
    fused.train()
    y_fused = fused(x)
    branches.train()
    branches.dropout.p = 0.0  # two branches, no dropping: the reference form
    y_branches = branches(x)
    torch.testing.assert_close(y_fused, y_branches, rtol=1e-5, atol=1e-5)
    y_fused.pow(2).sum().backward()
    y_branches.pow(2).sum().backward()
    for name, t in fused.adapter_state().items():
        torch.testing.assert_close(t.grad, branches.adapter_state()[name].grad, rtol=1e-4, atol=1e-4)
    # and the merged weight computes the same function, keeping every zero
    merged = fused.merged_weight()
    assert bool((merged[fused.base.weight == 0] == 0).all())
    torch.testing.assert_close(torch.nn.functional.linear(x, merged, fused.base.bias), y_fused.detach())
    assert math.isfinite(float(y_fused.sum()))


def test_the_lr_search_picks_the_validation_minimum_and_extends_past_an_edge():
    """Validation ppl is a bowl in log lr with its bottom at 0.09: the grid [1e-3, 1e-2] has its best at
    the top edge, so it grows (0.1, then 1.0 is out of range) and the pick is the scored minimum."""

    def ppl(lr: float) -> float:
        return 20 + (math.log10(lr) - math.log10(0.09)) ** 2

    asked: list[list] = []

    def evaluate(due):
        asked.append(due)
        return {(key, lr): (None if lr > 0.5 else ppl(lr)) for key, lr in due}

    searches = {"a": GridSearch([1e-3, 1e-2], max_extend=3), "b": GridSearch([3e-2, 1e-1, 3e-1])}
    best = search(searches, evaluate)
    assert searches["a"].grid == [1e-3, 1e-2, 0.1]  # 0.1^2 / 0.01 = 1.0 is not a learning rate
    assert best["a"] == 0.1 == min(searches["a"].scores, key=searches["a"].scores.get)
    assert best["b"] == 0.1 and searches["b"].grid == [3e-2, 1e-1, 3e-1]  # inside: no extension
    assert asked[0] == [("a", 1e-3), ("a", 1e-2), ("b", 3e-2), ("b", 1e-1), ("b", 3e-1)]  # one batch


def test_a_failed_run_never_wins_and_a_lower_edge_extends_down():
    s = GridSearch([1e-2, 1e-1], max_extend=1)
    best = search({"k": s}, lambda due: {(k, lr): (30.0 if lr < 0.05 else float("nan")) for k, lr in due})
    assert s.grid == [1e-3, 1e-2, 1e-1] and s.scores[1e-1] == math.inf
    assert best["k"] == 1e-3  # ties go to the smaller lr
    with pytest.raises(ValueError, match="values in"):
        GridSearch([0.0, 1e-2])
