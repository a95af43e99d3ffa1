"""Structured units: budgets, masking == physical removal, the exported model, COMP, the baselines."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sppx.anatomy import Dims, decoder_layers
from sppx.errors import ConfigError
from sppx.models import TinyLlama
from sppx.pipeline import plan, run
from sppx.pruning.structured import (
    COMPPruner,
    FLAPPruner,
    LLMPrunerPruner,
    MagnitudeStructuredPruner,
    ShortGPTPruner,
    Structure,
    StructuredContext,
    allocate,
    mask_model,
    shrink_model,
)
from sppx.pruning.structured.base import block_influence
from sppx.pruning.structured.baselines import group_sums
from sppx.pruning.structured.comp import (
    condition_block_scores,
    condition_scores,
    fit_unit_scales,
    refit_columns,
)
from sppx.pruning.structured.units import Budget, add_bias, complete_biases
from tests.conftest import compose_config, structured_overrides


def tiny_model(layers: int = 4, heads: int = 6, kv_heads: int = 2, seed: int = 0):
    """4 layers, hidden 48, 6 heads in 2 K/V groups of 3 (head_dim 8), intermediate 96."""
    model, _ = TinyLlama(
        seed=seed,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    ).load()
    return model.eval()


def token_batch(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def example_structure(d: Dims, head_mode: str) -> Structure:
    """Layer 1 removed; in the others 1 query head per group (query) or group 0 (group), 24 neurons."""
    s = Structure(d, layers_removed=[1])
    for i in (0, 2, 3):
        if head_mode == "query":  # one head of each K/V group of 3, a different one per layer
            s.heads[i] = [h for h in range(d.heads) if h % 3 != i % 3]
        else:
            s.heads[i], s.kv_heads[i] = [3, 4, 5], [1]
        s.neurons[i] = sorted(
            torch.randperm(d.intermediate, generator=torch.Generator().manual_seed(i))[:72].tolist()
        )
    return s


@pytest.mark.slow
@pytest.mark.parametrize("head_mode", ["query", "group"])
def test_removing_units_gives_the_masked_models_logits(head_mode):
    model = tiny_model()
    d = Dims.of(model.config)
    s = example_structure(d, head_mode)
    ids = token_batch(model.config.vocab_size)
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, s)
    shrink_model(removed, s)
    assert not torch.allclose(logits(masked, ids), logits(model, ids), atol=1e-3)  # something was removed
    torch.testing.assert_close(logits(removed, ids), logits(masked, ids), atol=1e-5, rtol=1e-5)
    # The parameters that went are exactly the structure's count.
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in removed.parameters())
    removed_norms = d.hidden * 2  # the removed layer's two RMSNorms
    assert before - after - removed_norms == d.total - s.kept_params()


@pytest.mark.parametrize("head_mode", ["query", "group"])
def test_gqa_shapes_stay_consistent(head_mode):
    model = tiny_model()
    d = Dims.of(model.config)
    s = example_structure(d, head_mode)
    shrink_model(model, s)
    heads, kv = (4, 2) if head_mode == "query" else (3, 1)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (3, heads, kv)
    assert (cfg.head_dim, cfg.intermediate_size) == (d.head_dim, 72)
    for new_index, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        assert attn.layer_idx == new_index
        assert attn.q_proj.weight.shape == (heads * d.head_dim, d.hidden)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv * d.head_dim, d.hidden)
        assert attn.o_proj.weight.shape == (d.hidden, heads * d.head_dim)
        assert attn.num_key_value_groups == heads // kv
        assert layer.mlp.down_proj.weight.shape == (d.hidden, 72)


def test_uneven_heads_per_group_are_refused():
    d = Dims.of(tiny_model().config)
    # Group 0 keeps 2 heads, group 1 keeps 3 (in every layer).
    s = Structure(d, heads={i: [0, 1, 3, 4, 5] for i in range(d.layers)})
    with pytest.raises(ValueError, match="same number"):
        s.layer_widths()
    s = Structure(d, neurons={0: list(range(10))})  # layer 0 narrower than the others: per-layer widths
    assert s.layer_widths() == [(6, 2, 10), (6, 2, 96), (6, 2, 96), (6, 2, 96)]
    assert s.uniform_widths() is None
    with pytest.raises(ValueError, match="widths differ"):
        s.widths()  # no single (heads, K/V heads, neurons) describes it
    assert Structure(d, neurons={i: list(range(10)) for i in range(4)}).widths() == (6, 2, 10)


def test_exported_model_reloads_with_plain_transformers(tmp_path):
    model = tiny_model()
    d = Dims.of(model.config)
    s = example_structure(d, "query")
    shrink_model(model, s)
    add_bias(decoder_layers(model)[0].mlp.down_proj, torch.full((d.hidden,), 0.25))  # as FLAP does
    complete_biases(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3 and saved["num_attention_heads"] == 4
    assert (
        saved["num_key_value_heads"] == 2 and saved["intermediate_size"] == 72 and saved["mlp_bias"] is True
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = token_batch(model.config.vocab_size)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    # Decoding with a KV cache (layer indices renumbered) matches the no-cache forward.
    out = loaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    ref = ids[:1, :8]
    for _ in range(6):
        ref = torch.cat([ref, logits(loaded, ref)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ref)


def test_allocate_matches_a_hand_count():
    d = Dims(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)
    assert d.layer_params == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # q, o; k, v; MLP
    # 20% over heads and neurons: 1 of the 3 query heads per group, then neurons fill the rest.
    b = allocate(d, 0.2, ["heads", "neurons"], "query", neuron_multiple=16)
    assert (b.layers, b.heads) == (0, 3)
    left = 0.2 * d.total - 30 * 3 * d.head_params
    assert b.neurons == 1536 - round((1536 - round(left / (30 * 3 * 576))) / 16) * 16
    assert (1536 - b.neurons) % 16 == 0
    assert abs(b.sparsity(d) - 0.2) < 0.01
    # Layers only: exactly that fraction of the layers.
    assert allocate(d, 0.3, ["layers"]).layers == 9
    # COMP's split: a quarter of the budget as whole layers.
    b = allocate(d, 0.5, ["layers", "neurons"], layer_share=0.25)
    assert b.layers == round(0.25 * 0.5 * d.total / d.layer_params) == 4
    assert abs(b.sparsity(d) - 0.5) < 0.005


def test_budget_shapes_are_the_shrunk_models_shapes():
    model = tiny_model()
    d = Dims.of(model.config)
    budget = allocate(d, 0.5, ["layers", "heads", "neurons"], "group", layer_share=0.5)
    assert budget.layers == 1 and budget.heads == 3
    s = Structure(d, layers_removed=[2])
    for i in (0, 1, 3):
        s.heads[i], s.kv_heads[i] = [0, 1, 2], [0]
        s.neurons[i] = list(range(d.intermediate - budget.neurons))
    shrink_model(model, s)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("_proj")}
    assert shapes == budget.linear_shapes(d)
    assert s.sparsity() == pytest.approx(budget.sparsity(d))


# --------------------------------------------------------------------------- COMP
def test_condition_score_is_the_error_left_after_an_optimal_refit():
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    w = torch.randn(5, 6, dtype=torch.float64)
    scores = condition_scores(w, x.T @ x, damp=1e-12)
    for j in range(6):
        others = [k for k in range(6) if k != j]
        # Re-fit the other columns' weights by least squares to the full output.
        target = x @ w.T
        fit = torch.linalg.lstsq(x[:, others], target).solution
        error = float(((x[:, others] @ fit - target) ** 2).sum())
        assert scores[j].item() == pytest.approx(error, rel=1e-6)
    # Heads: blocks of 2 columns, the same identity for a block.
    blocks = condition_block_scores(w, x.T @ x, damp=1e-12, block=2)
    others = [2, 3, 4, 5]
    fit = torch.linalg.lstsq(x[:, others], x @ w.T).solution
    assert blocks[0].item() == pytest.approx(float(((x[:, others] @ fit - x @ w.T) ** 2).sum()), rel=1e-6)


def test_mask_tuning_lowers_the_output_error_and_never_raises_it():
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.1 * x[:, 1]  # correlated columns: a scale can absorb a removed one
    w = torch.randn(4, 8, dtype=torch.float64)
    kept = [0, 2, 3, 5, 7]
    fit = fit_unit_scales(w, x.T @ x, torch.arange(8), kept, max_scale=10.0)
    assert fit.aborted is None and fit.error_after < fit.error_before

    def direct(scales):
        return float(((x @ w.T - (x[:, kept] * scales) @ w[:, kept].T) ** 2).sum())

    assert fit.error_before == pytest.approx(direct(torch.ones(5, dtype=torch.float64)), rel=1e-9)
    assert fit.error_after == pytest.approx(direct(fit.scales), rel=1e-9)
    # A tiny max_scale makes the solve "ill-conditioned": scales stay 1 and the error is unchanged.
    capped = fit_unit_scales(w, x.T @ x, torch.arange(8), kept, max_scale=1.0 + 1e-9)
    assert capped.aborted is not None and torch.equal(capped.scales, torch.ones(5, dtype=torch.float64))
    assert capped.error_after == capped.error_before
    # Re-fitting the kept columns themselves: the error is the direct one and never above dropping.
    refit = refit_columns(w, x.T @ x, torch.tensor(kept), damp=1e-9)
    assert refit.aborted is None and refit.error_after <= fit.error_after
    direct_refit = float(((x @ w.T - x[:, kept] @ refit.weight.T) ** 2).sum())
    assert refit.error_after == pytest.approx(direct_refit, rel=1e-6)
    # Units of several columns (heads): one scale per block.
    blocks = fit_unit_scales(w, x.T @ x, torch.arange(8) // 2, [0, 2, 3], max_scale=10.0)
    assert blocks.scales.shape == (3,) and blocks.error_after <= blocks.error_before


def calibration(model, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("units", "mode"), [(["neurons"], "scales"), (["heads", "neurons"], "scales"), (["neurons"], "columns")]
)
def test_comp_mask_tuning_lowers_each_layers_calibration_error(units, mode):
    model = tiny_model()
    d = Dims.of(model.config)
    pruner = COMPPruner(units=units, neuron_multiple=8, mask_tuning=mode)
    budget = pruner.budget(d, 0.3)
    s = pruner.select(model, budget, StructuredContext(calibration=calibration(model), progress=False))
    fits = pruner.report["mask_tuning"]["layers"]
    assert len(fits) == len(units) * d.layers
    assert all(f["fit_error_after"] <= f["fit_error_before"] for f in fits)
    assert any(f["fit_error_after"] < f["fit_error_before"] for f in fits)
    untuned = COMPPruner(units=units, neuron_multiple=8, mask_tuning="none")
    s2 = untuned.select(
        tiny_model(), budget, StructuredContext(calibration=calibration(model), progress=False)
    )
    # Layer 0 sees the same inputs either way: tuning changes its scales, not its choice.
    assert s2.neurons[0] == s.neurons[0]
    assert s.uniform_widths()[2] == d.intermediate - budget.neurons


def test_block_influence_ranks_an_identity_layer_lowest():
    model = tiny_model()
    with torch.no_grad():
        layer = decoder_layers(model)[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(model, calibration(model), batch_size=4, progress=False)
    assert bi[2].item() == pytest.approx(0.0, abs=1e-12)
    assert int(bi.argmin()) == 2
    pruner = ShortGPTPruner()
    s = pruner.select(
        model, Budget(layers=1), StructuredContext(calibration=calibration(model), progress=False)
    )
    assert s.layers_removed == [2]


# --------------------------------------------------------------------------- baselines
def test_group_sums_cover_each_units_weights():
    model = tiny_model()
    d = Dims.of(model.config)
    heads, neurons = group_sums(d, decoder_layers(model)[0], lambda lin: torch.ones_like(lin.weight))
    per_head = 2 * d.head_dim * d.hidden + 2 * d.head_dim * d.hidden / d.group_size
    assert torch.allclose(heads, torch.full((d.heads,), per_head, dtype=torch.float64))
    assert torch.equal(neurons, torch.full((d.intermediate,), 3.0 * d.hidden, dtype=torch.float64))


def test_magnitude_structured_removes_the_smallest_neurons():
    model = tiny_model()
    d = Dims.of(model.config)
    with torch.no_grad():
        mlp = decoder_layers(model)[1].mlp
        for j in (5, 40, 77):
            mlp.gate_proj.weight[j] *= 1e-3
            mlp.up_proj.weight[j] *= 1e-3
            mlp.down_proj.weight[:, j] *= 1e-3
    s = MagnitudeStructuredPruner(units=["neurons"]).select(model, Budget(neurons=3), StructuredContext())
    assert set(range(d.intermediate)) - set(s.neurons[1]) == {5, 40, 77}


def test_llm_pruner_scores_are_taylor_sums_and_leave_no_gradients():
    model = tiny_model()
    calib = calibration(model, n=4, seqlen=16)
    pruner = LLMPrunerPruner(units=["neurons"], nsamples=4, seqlen=16, batch_size=2)
    s = pruner.select(model, Budget(neurons=16), StructuredContext(calibration=calib, progress=False))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # The same choice from a hand-computed |W * grad| over the whole batch.
    ref = tiny_model()
    ref.requires_grad_(True)
    out = ref(input_ids=calib, labels=calib, use_cache=False)
    out.loss.backward()
    mlp = decoder_layers(ref)[0].mlp
    taylor = (
        (mlp.gate_proj.weight * mlp.gate_proj.weight.grad).abs().sum(1)
        + (mlp.up_proj.weight * mlp.up_proj.weight.grad).abs().sum(1)
        + (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0)
    )
    expected = sorted(torch.sort(taylor.double(), stable=True).indices[16:].tolist())
    assert s.neurons[0] == expected


def test_flap_bias_compensation_keeps_the_mean_output():
    model = tiny_model()
    calib = calibration(model)
    dense = copy.deepcopy(model)
    captured = {}

    def grab(name):
        def hook(module, args, out):
            captured.setdefault(name, []).append(out.detach())

        return hook

    pruner = FLAPPruner(units=["neurons"], neuron_multiple=8)
    s = pruner.select(model, Budget(neurons=32), StructuredContext(calibration=calib, progress=False))
    # Layer 0 sees the same inputs in both models: its down_proj mean output is unchanged.
    for name, m in (("dense", dense), ("pruned", model)):
        decoder_layers(m)[0].mlp.down_proj.register_forward_hook(grab(name))
        logits(m, calib)
    assert decoder_layers(model)[0].mlp.down_proj.bias is not None
    mean_dense = torch.cat(captured["dense"]).reshape(-1, 48).double().mean(0)
    mean_pruned = torch.cat(captured["pruned"]).reshape(-1, 48).double().mean(0)
    torch.testing.assert_close(mean_pruned, mean_dense, atol=1e-5, rtol=1e-4)
    assert len(s.neurons[0]) == 64


# --------------------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_comp_run_exports_a_smaller_model_that_reloads(tmp_path, text_file):
    cfg = compose_config(structured_overrides(text_file, pruner="comp", sparsity=0.3), tmp_path)
    results = run(cfg, progress=False)
    structure = results["prune"]["structure"]
    assert results["sparsity"]["pattern"] == "structured"
    assert results["sparsity"]["measured"] == pytest.approx(structure["sparsity"], abs=1e-6)
    assert abs(results["sparsity"]["measured"] - 0.3) <= 0.02
    assert results["prune"]["peak_rss_mib"] > 0
    # Per layer, indexed as in the dense model: a removed layer lost all of its parameters.
    per_layer = results["sparsity"]["per_layer"]
    assert len(per_layer) == 4 and len(structure["layers_removed"]) == 1
    assert all((v == 1.0) == (i in structure["layers_removed"]) for i, v in enumerate(per_layer))
    loaded = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    assert loaded.config.intermediate_size == structure["neurons_per_layer"]
    assert sum(p.numel() for p in loaded.parameters()) == results["params"]["total"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "complete" and "dense_shapes" not in saved["prune"]["structure"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"pruner": "wanda"}, "pattern"),
        ({"pruner": "comp", "pattern": "2:4"}, "pattern"),
        ({"pruner": "comp", "teacher": "dense"}, "teacher"),
        ({"pruner": "shortgpt", "sparsity": 0.3}, "sparsity"),
        ({"pruner": "comp", "pruner.units": "[layers,bogus]"}, "pruner.units"),
        ({"pruner": "flap", "pruner.head_mode": "some"}, "pruner.head_mode"),
        ({"pruner": "comp", "pruner.layer_share": 1.5}, "pruner.layer_share"),
        ({"pruner": "comp", "pruner.mask_tuning": "maybe"}, "pruner.mask_tuning"),
        ({"pruner": "nuteprune", "pruner.head_mode": "group"}, "pruner.head_mode"),
        ({"pruner": "shortgpt", "pruner.units": "[neurons]"}, "pruner.units"),
        ({"pruner": "shortgpt", "pruner.units": "[layers,heads]"}, "pruner.units"),
        ({"pruner": "llm_pruner", "pruner.layer_range": "middle"}, "pruner.layer_range"),
        ({"pruner": "llm_pruner", "pruner.layer_range": "[2,1]"}, "pruner.layer_range"),
        ({"pruner": "magnitude_structured", "pruner.layer_range": "[0,9]"}, "pruner.layer_range"),
        ({"pruner": "flap", "pruner.allocation": "owl"}, "pruner.allocation"),
        ({"pruner": "flap", "pruner.layer_share": -0.1}, "pruner.layer_share"),
        ({"pruner": "comp", "pruner.holdout": 1.0}, "pruner.holdout"),
        # 32 divides every dense width of the tiny model but not the 72 neurons left at 30%.
        ({"pruner": "comp", "sparsity": 0.3, "adapter": "spp", "adapter.rows": 32}, "adapter.rows"),
    ],
)
def test_structured_config_errors(tmp_path, text_file, extra, key):
    has_multiple = extra["pruner"] not in ("shortgpt", "wanda")
    overrides = structured_overrides(text_file, neuron_multiple=has_multiple, **extra)
    with pytest.raises(ConfigError) as err:
        plan(compose_config(overrides, tmp_path))
    assert err.value.key == key
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["numerous", "dense", "none"])
def test_nuteprune_run_learns_masks_then_exports_a_smaller_model(tmp_path, text_file, teacher):
    overrides = structured_overrides(
        text_file,
        pruner="nuteprune",
        sparsity=0.25,
        teacher=teacher,
        **{"pruner.steps": 6, "pruner.batch_size": 2},
    )
    if teacher == "numerous":
        # Fast gates and coarse snapshots, so that a snapshot teaches within a few steps.
        overrides += ["pruner.steps=12", "pruner.lambda_lr=100", "pruner.mask_lr=2"]
        overrides += ["teacher.snapshot_every=0.02", "teacher.teacher_gap=0.02"]
    results = run(compose_config(overrides, tmp_path), progress=False)
    structure = results["prune"]["structure"]
    assert results["teacher"]["strategy"] == teacher
    assert len(results["teacher"]["schedule"]) >= 1
    if teacher == "numerous":
        assert results["teacher"]["snapshot_steps"] > 0
    assert results["sparsity"]["measured"] == pytest.approx(structure["sparsity"], abs=1e-6)
    assert abs(structure["sparsity"] - 0.25) <= 0.02
    assert "mask learning" in results["prune"]["phases_s"]
    loaded = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    assert loaded.config.num_attention_heads == structure["heads_per_layer"]
    assert sum(p.numel() for p in loaded.parameters()) == results["params"]["total"]
