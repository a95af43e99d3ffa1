"""export.format and export.dtype: compressed and half-precision exports reload with the merged weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from run import accept_shorthands
from sppx.errors import ConfigError
from sppx.models import load_pretrained
from sppx.pipeline import plan, run
from sppx.sparse_format import CONFIG_KEY
from tests.conftest import compose_config, tiny_run_overrides


def export_run(tmp_path, text_file, name: str, **extra) -> dict:
    overrides = tiny_run_overrides(text_file, **{"trainer.max_steps": 2, "eval.dense": "false", **extra})
    return run(compose_config(overrides, tmp_path / name, tmp_path / "cache"), progress=False)


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pattern", "fmt"), [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")]
)
def test_a_compressed_export_reloads_with_the_merged_weights_and_is_smaller(
    tmp_path, text_file, pattern, fmt
):
    dense = export_run(tmp_path, text_file, "dense", pattern=pattern)
    small = export_run(tmp_path, text_file, "small", pattern=pattern, **{"export.format": "compressed"})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "model").eval()
    model_dir = tmp_path / "small" / "model"
    assert not (model_dir / "model.safetensors").exists()
    with pytest.raises(OSError):  # plain transformers refuses it rather than loading random weights
        AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = load_pretrained(model_dir)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert torch.equal(logits(reloaded), logits(merged))

    saved = json.loads((model_dir / "config.json").read_text())[CONFIG_KEY]["sparsity_config"]
    assert saved["format"] == fmt and saved["sparsity_structure"] == (
        "2:4" if pattern == "2:4" else "unstructured"
    )
    assert sorted(saved["targets"]) == sorted(small["sparsity"]["per_module"])
    assert small["sparsity"]["zeros_verified_on_disk"] == dense["sparsity"]["zeros_verified_on_disk"] > 0
    assert small["export"]["format"] == "compressed" and small["export"]["bytes"] < dense["export"]["bytes"]
    assert dense["export"]["bytes"] == pytest.approx(dense["export"]["dense_float32_bytes"], rel=0.01)
    assert "load_pretrained" in (model_dir / "README.md").read_text()


@pytest.mark.slow
def test_a_bfloat16_export_holds_the_merged_weights_rounded_in_half_the_bytes(tmp_path, text_file):
    full = export_run(tmp_path, text_file, "full")
    half = export_run(tmp_path, text_file, "half", **{"export.dtype": "bfloat16"})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "half" / "model").eval()
    assert json.loads((tmp_path / "half" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in merged.state_dict().items():
        assert reloaded.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert half["export"]["bytes"] == pytest.approx(full["export"]["bytes"] / 2, rel=0.01)
    assert half["sparsity"]["zeros_verified_on_disk"] == full["sparsity"]["zeros_verified_on_disk"]
    # The run's own numbers are the float32 model's: the export is rounded, the model in memory is not.
    assert half["ppl"]["final"] == full["ppl"]["final"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"adapter": "lora"}, "merge fills the pruned weights in"),
        ({"pruner": "none"}, "prunes nothing"),
        (
            {"pruner": "magnitude_structured", "pattern": "structured", "pruner.units": "[neurons]"},
            "structured pruning removes",
        ),
    ],
)
def test_a_compressed_export_of_a_model_without_zeros_fails_in_the_plan(tmp_path, text_file, extra, reason):
    overrides = tiny_run_overrides(text_file, **{"export.format": "compressed", **extra})
    with pytest.raises(ConfigError, match=reason) as err:
        plan(compose_config(overrides, tmp_path / "run"))
    assert err.value.key == "export.format" and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(("key", "value"), [("export.format", "zip"), ("export.dtype", "int8")])
def test_a_bad_export_setting_names_the_allowed_values(tmp_path, text_file, key, value):
    with pytest.raises(ConfigError, match="allowed: ") as err:
        plan(compose_config(tiny_run_overrides(text_file, **{key: value}), tmp_path / "run"))
    assert err.value.key == key


def test_export_true_or_false_on_the_command_line_means_export_enabled():
    assert accept_shorthands(["export=false", "export=True,false", "+tags=[a]", "export.dtype=bfloat16"]) == [
        "export.enabled=false",
        "export.enabled=True,false",
        "tags=[a]",
        "export.dtype=bfloat16",
    ]
    assert accept_shorthands(["export=maybe"]) == ["export=maybe"]
