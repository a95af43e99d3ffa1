"""Structured methods on equal terms: any units for every method, per-layer widths end to end (removal,
export, reload), LLM-Pruner's protected layer range, FLAP on dense statistics with global allocation,
COMP's held-out mask-tuning error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sppx.anatomy import LAYER_WIDTHS_KEY, Dims, decoder_layers
from sppx.errors import ConfigError
from sppx.export import save_model
from sppx.models import TinyLlama, byte_tokenizer, load_pretrained
from sppx.pipeline import run
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
from sppx.pruning.structured.base import dense_input_stats
from sppx.pruning.structured.baselines import flap_scores
from sppx.pruning.structured.units import pruned_span
from tests.conftest import compose_config, tiny_run_overrides


def tiny_model(layers: int = 4, seed: int = 0):
    """hidden 48, 6 heads in 2 K/V groups of 3 (head_dim 8), intermediate 96."""
    model, _ = TinyLlama(
        seed=seed,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
    ).load()
    return model.eval()


def calibration(model, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(3))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def ctx(model, **kwargs) -> StructuredContext:
    return StructuredContext(calibration=calibration(model, **kwargs), progress=False)


def uneven_structure(d: Dims, head_mode: str) -> Structure:
    """Layer 1 removed; layer 0 loses 1 query head per group (query) or group 0 (group) and half its
    neurons; layer 2 loses 2 heads per group (query) and no neuron; layer 3 keeps its heads, 80 neurons."""
    s = Structure(d, layers_removed=[1])
    if head_mode == "query":
        s.heads[0], s.heads[2] = [0, 1, 3, 4], [2, 5]
    else:
        s.heads[0], s.kv_heads[0] = [3, 4, 5], [1]
    s.neurons[0] = list(range(0, d.intermediate, 2))
    s.neurons[3] = sorted(
        torch.randperm(d.intermediate, generator=torch.Generator().manual_seed(1))[:80].tolist()
    )
    return s


# --------------------------------------------------------------------------- per-layer widths
@pytest.mark.slow
@pytest.mark.parametrize("head_mode", ["query", "group"])
def test_per_layer_widths_removal_equals_masking_and_the_export_reloads(tmp_path, head_mode):
    model = tiny_model()
    d = Dims.of(model.config)
    s = uneven_structure(d, head_mode)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, s)
    shrink_model(removed, s)
    assert s.uniform_widths() is None
    torch.testing.assert_close(logits(removed, ids), logits(masked, ids), atol=1e-5, rtol=1e-5)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in removed.parameters())
    assert before - after - 2 * d.hidden == d.total - s.kept_params()  # the removed layer's two norms too
    # The config keeps the dense widths and lists each kept layer's own.
    widths = removed.config.to_dict()[LAYER_WIDTHS_KEY]
    assert [tuple(w.values()) for w in widths] == s.layer_widths()
    assert (removed.config.num_attention_heads, removed.config.intermediate_size) == (d.heads, d.intermediate)
    # Save -> reload through sppx's loader: identical logits, and KV-cache decoding works.
    folder = save_model(removed, byte_tokenizer(), tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())[LAYER_WIDTHS_KEY] == widths
    reloaded = load_pretrained(folder)
    assert torch.equal(logits(reloaded, ids), logits(removed, ids))
    out = reloaded.generate(ids[:1, :8], max_new_tokens=5, do_sample=False, use_cache=True)
    ref = ids[:1, :8]
    for _ in range(5):
        ref = torch.cat([ref, logits(reloaded, ref)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ref)
    # Plain transformers builds the dense widths and refuses the smaller tensors (never random weights).
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(folder)


def test_loader_refuses_a_folder_missing_a_tensor(tmp_path):
    model = tiny_model()
    s = uneven_structure(Dims.of(model.config), "query")
    shrink_model(model, s)
    folder = save_model(model, byte_tokenizer(), tmp_path / "model")
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_pretrained(folder)


def test_summary_reports_every_layers_widths():
    d = Dims.of(tiny_model().config)
    summary = uneven_structure(d, "query").summary()
    assert summary["uniform"] is False
    assert summary["heads_per_layer"] == [4, 2, 6] and summary["neurons_per_layer"] == [48, 96, 80]
    assert [w["layer"] for w in summary["widths"]] == [0, 2, 3]
    uniform = Structure(d, neurons={i: list(range(64)) for i in range(4)}).summary()
    assert (
        uniform["uniform"] is True and uniform["neurons_per_layer"] == 64 and uniform["heads_per_layer"] == 6
    )


# --------------------------------------------------------------------------- units for every method
METHODS = {
    "comp": lambda units, **kw: COMPPruner(units=units, neuron_multiple=8, **kw),
    "llm_pruner": lambda units, **kw: LLMPrunerPruner(
        units=units, neuron_multiple=8, nsamples=4, seqlen=16, layer_range="all", **kw
    ),
    "flap": lambda units, **kw: FLAPPruner(units=units, neuron_multiple=8, **kw),
    "magnitude_structured": lambda units, **kw: MagnitudeStructuredPruner(
        units=units, neuron_multiple=8, **kw
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "units", [["layers"], ["heads"], ["neurons"], ["layers", "neurons"], ["layers", "heads", "neurons"]]
)
def test_every_method_prunes_any_units_to_its_budget(method, units):
    model = tiny_model()
    d = Dims.of(model.config)
    pruner = METHODS[method](units, layer_share=0.5)
    budget = pruner.budget(d, 0.3)
    s = pruner.select(model, budget, ctx(model))
    # Exactly the budget's parameters go, and only the unit kinds asked for.
    assert s.kept_params() == d.total - budget.removed_params(d)
    assert bool(s.layers_removed) == ("layers" in units)
    assert bool(s.heads) == ("heads" in units and budget.heads > 0)
    assert bool(s.neurons) == ("neurons" in units)
    if "layers" in units:
        assert pruner.report["layer_criterion"] and len(pruner.report["layer_scores"]) == d.layers
    shrink_model(model, s)  # the structure is a valid model
    assert logits(model, calibration(model, n=1)).isfinite().all()


def test_shortgpt_refuses_units_other_than_layers_in_one_line():
    for units in (["neurons"], ["layers", "heads"]):
        with pytest.raises(ConfigError) as err:
            ShortGPTPruner(units=units)
        assert err.value.key == "pruner.units" and "allowed: [layers]" in str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_layer_criteria_remove_the_least_important_layer():
    model = tiny_model()
    d = Dims.of(model.config)
    with torch.no_grad():  # layer 2: tiny weights everywhere (and so a tiny Taylor score and BI)
        for lin in decoder_layers(model)[2].modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.mul_(1e-3)
    budget = allocate(d, 0.25, ["layers"])
    assert budget.layers == 1
    for method in ("magnitude_structured", "llm_pruner", "flap"):
        pruner = METHODS[method](["layers"])
        assert pruner.select(copy.deepcopy(model), budget, ctx(model)).layers_removed == [2], method
    # LLM-Pruner's layer score is the Taylor sum over every projection of the layer.
    pruner = METHODS["llm_pruner"](["layers"])
    pruner.select(model, budget, ctx(model))
    ref = copy.deepcopy(model)
    ref.requires_grad_(True)
    windows = calibration(model)[:4, :16]
    ref(input_ids=windows, labels=windows, use_cache=False).loss.backward()
    expected = [
        sum(
            float((m.weight * m.weight.grad).detach().abs().sum())
            for m in layer.modules()
            if isinstance(m, torch.nn.Linear)
        )
        for layer in decoder_layers(ref)
    ]
    assert pruner.report["layer_scores"] == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- LLM-Pruner's layer range
def test_reference_range_scales_llm_pruners_choice_to_the_depth():
    assert pruned_span(32, "reference") == (4, 30)  # blocks 4..29 of LLaMA-7B
    assert pruned_span(30, "reference") == (4, 28)  # SmolLM2-135M: round(3.75), round(1.875)
    assert pruned_span(8, "reference") == (1, 7)
    assert pruned_span(8, "all") == (0, 8) and pruned_span(8, [2, 5]) == (2, 5)


def test_llm_pruner_leaves_the_protected_layers_bit_identical():
    model = tiny_model(layers=8)
    d = Dims.of(model.config)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = LLMPrunerPruner(units=["layers", "heads", "neurons"], neuron_multiple=8, nsamples=4, seqlen=16)
    pruner.check(d, 0.3)
    budget = pruner.budget(d, 0.3)
    assert (budget.start, budget.end) == (1, 7)
    s = pruner.select(model, budget, ctx(model))
    assert all(1 <= i < 7 for i in s.layers_removed) and len(s.layers_removed) == budget.layers
    assert abs(s.sparsity() - 0.3) <= 0.02 and s.sparsity() == pytest.approx(budget.sparsity(d), abs=1e-12)
    shrink_model(model, s)
    kept = s.layers_kept
    for old in (0, 7):  # the first and the last layer are untouched, weights bit for bit
        new = kept.index(old)
        for name, tensor in decoder_layers(model)[new].state_dict().items():
            assert torch.equal(tensor, dense[f"model.layers.{old}.{name}"]), (old, name)
    widths = s.layer_widths()
    assert widths[0] == widths[-1] == (d.heads, d.kv_heads, d.intermediate)
    assert all(w[2] < d.intermediate for w in widths[1:-1])
    # The shapes the plan checks adapters against are the pruned model's.
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("_proj")}
    assert shapes == budget.linear_shapes(d)


# --------------------------------------------------------------------------- FLAP
def hand_inputs(model, calib, name: str) -> list[torch.Tensor]:
    """Every decoder layer's ``name`` inputs over the calibration windows (tokens x features), dense."""
    seen = {}
    hooks = [
        getattr(layer.self_attn if name == "o_proj" else layer.mlp, name).register_forward_pre_hook(
            lambda _m, args, i=i: seen.setdefault(i, []).append(
                args[0].detach().reshape(-1, args[0].shape[-1])
            )
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    logits(model, calib)
    for h in hooks:
        h.remove()
    return [torch.cat(seen[i]).double() for i in range(len(seen))]


def test_flap_scores_are_the_fluctuation_of_the_dense_model_by_hand():
    model = tiny_model()
    d = Dims.of(model.config)
    calib = calibration(model)
    stats = dense_input_stats(model, calib, 4, ["o_proj", "down_proj"], progress=False)
    x_o, x_down = hand_inputs(model, calib, "o_proj"), hand_inputs(model, calib, "down_proj")
    for i, layer in enumerate(decoder_layers(model)):
        var_o = x_o[i].var(dim=0, unbiased=False)
        var_d = x_down[i].var(dim=0, unbiased=False)
        col_o = layer.self_attn.o_proj.weight.detach().double().pow(2).sum(dim=0)
        col_d = layer.mlp.down_proj.weight.detach().double().pow(2).sum(dim=0)
        channels = (var_o * col_o) ** 2  # o_proj's channel score is squared
        neurons = var_d * col_d
        heads, got_neurons = flap_scores(d, layer, stats[i], "uniform")
        torch.testing.assert_close(heads, channels.reshape(d.heads, d.head_dim).sum(dim=1), rtol=1e-6, atol=0)
        torch.testing.assert_close(got_neurons, neurons, rtol=1e-6, atol=0)
        z = (channels - channels.mean()) / channels.std()
        heads, got_neurons = flap_scores(d, layer, stats[i], "global")
        torch.testing.assert_close(heads, z.reshape(d.heads, d.head_dim).mean(dim=1), rtol=0, atol=1e-6)
        torch.testing.assert_close(got_neurons, (neurons - neurons.mean()) / neurons.std(), rtol=0, atol=1e-6)
    # Uniform allocation removes, in every layer (the last one too), the lowest neurons by those dense
    # scores: the statistics are never taken on already pruned layers' outputs.
    budget = allocate(d, 0.3, ["neurons"], neuron_multiple=8)
    s = FLAPPruner(units=["neurons"], allocation="uniform", neuron_multiple=8).select(
        copy.deepcopy(model), budget, ctx(model)
    )
    for i in range(d.layers):
        weight = decoder_layers(model)[i].mlp.down_proj.weight.detach().double()
        neurons = x_down[i].var(dim=0, unbiased=False) * weight.pow(2).sum(dim=0)
        lowest = torch.sort(neurons, stable=True).indices[: budget.neurons]
        assert set(range(d.intermediate)) - set(s.neurons[i]) == set(lowest.tolist()), i


@pytest.mark.parametrize("head_mode", ["query", "group"])
def test_flap_global_allocation_removes_exactly_the_budget_with_per_layer_widths(head_mode):
    model = tiny_model()
    d = Dims.of(model.config)
    with torch.no_grad():  # layer 1: a few dominant neurons, so its other neurons' standardised scores
        decoder_layers(model)[1].mlp.down_proj.weight[:, :4] *= 30.0  # sit high: it loses fewer neurons
    pruner = FLAPPruner(
        units=["heads", "neurons"], head_mode=head_mode, allocation="global", neuron_multiple=8
    )
    budget = pruner.budget(d, 0.3)
    assert budget.heads and budget.neurons
    s = pruner.select(model, budget, ctx(model))
    assert s.kept_params() == d.total - budget.removed_params(d)
    widths = s.layer_widths()
    assert s.uniform_widths() is None
    assert all(n % 8 == 0 for _, _, n in widths)
    assert widths[1][2] > sum(n for _, _, n in widths) / len(widths)
    assert sum(d.heads - h for h, _, _ in widths) == d.layers * budget.heads


# --------------------------------------------------------------------------- COMP's held-out error
@pytest.mark.slow
def test_comp_reports_mask_tuning_error_on_held_out_windows():
    model = tiny_model()
    calib = calibration(model)  # 8 windows: 6 fit the scales, 2 are held out
    dense = copy.deepcopy(model)
    pruner = COMPPruner(units=["neurons"], neuron_multiple=8, holdout=0.25, batch_size=4)
    budget = pruner.budget(Dims.of(model.config), 0.3)
    s = pruner.select(model, budget, StructuredContext(calibration=calib, progress=False))
    report = pruner.report["mask_tuning"]
    assert report["windows"] == {"fit": 6, "heldout": 2}
    first = next(f for f in report["layers"] if f["layer"] == 0)
    assert (first["fit_tokens"], first["heldout_tokens"]) == (6 * 32, 2 * 32)
    # Layer 0 sees the dense embeddings: recompute its held-out errors directly.
    x = hand_inputs(dense, calib[6:], "down_proj")[0]
    w = decoder_layers(dense)[0].mlp.down_proj.weight.detach().double()
    untuned = w.clone()
    untuned[:, sorted(set(range(96)) - set(s.neurons[0]))] = 0.0
    tuned = decoder_layers(model)[0].mlp.down_proj.weight.detach().double()
    assert not torch.equal(tuned, untuned)  # the scales were folded in
    assert first["heldout_error_before"] == pytest.approx(float(((x @ (w - untuned).T) ** 2).sum()), rel=1e-6)
    assert first["heldout_error_after"] == pytest.approx(float(((x @ (w - tuned).T) ** 2).sum()), rel=1e-6)
    assert report["heldout_error_after"] == pytest.approx(
        sum(f["heldout_error_after"] for f in report["layers"])
    )


# --------------------------------------------------------------------------- the pipeline
@pytest.mark.slow
def test_llm_pruner_run_exports_per_layer_widths_that_reload(tmp_path, text_file):
    overrides = tiny_run_overrides(
        text_file,
        pruner="llm_pruner",
        pattern="structured",
        sparsity=0.25,
        adapter="lora",
        **{"model.num_hidden_layers": 4, "pruner.neuron_multiple": 8, "trainer.max_steps": 2},
    )
    results = run(compose_config(overrides, tmp_path), progress=False)
    structure = results["prune"]["structure"]
    # Reference range on 4 layers: layer 0 stays intact, layers 1-3 carry the whole budget.
    assert structure["uniform"] is False and structure["neurons_per_layer"][0] == 128
    assert all(n < 128 for n in structure["neurons_per_layer"][1:])
    assert results["sparsity"]["per_layer"][0] == 0.0
    assert results["sparsity"]["measured"] == pytest.approx(structure["sparsity"], abs=1e-6)
    assert abs(results["sparsity"]["measured"] - 0.25) <= 0.02
    loaded = load_pretrained(results["model_dir"])
    assert sum(p.numel() for p in loaded.parameters()) == results["params"]["total"]
    got = [layer.mlp.down_proj.in_features for layer in decoder_layers(loaded)]
    assert got == structure["neurons_per_layer"]
    # The model card says how to load it, and lists every layer's widths.
    card = (Path(results["model_dir"]) / "README.md").read_text()
    assert "from sppx.models import load_pretrained" in card and "AutoModelForCausalLM" not in card
    widths = ", ".join(f"{w['heads']}/{w['kv_heads']}/{w['neurons']}" for w in structure["widths"])
    assert widths in card
