"""Guarantees on every output: a diverging run stops with the last good checkpoint kept, nothing
half-written looks complete, weights are safetensors only, runs are deterministic, and the zeros are
re-checked on the saved files."""

import ast
import hashlib
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

import sppx.models as models
from sppx.errors import RunError
from sppx.export import SparsityViolation
from sppx.files import write_text_atomic
from sppx.pipeline import run
from sppx.provenance import without_paths
from tests.conftest import compose_config, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


class PoisonAdapter(pl.Callback):
    """Sets one trainable tensor to NaN before optimizer step ``step + 1`` (``when=before``) or right
    after optimizer step ``step`` (``when=after``)."""

    def __init__(self, step: int, when: str = "before"):
        self.step, self.when = step, when

    def _poison(self, pl_module) -> None:
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.when == "before" and trainer.global_step == self.step:
            self._poison(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "after" and trainer.global_step == self.step:
            self._poison(pl_module)


def poisoned_overrides(text_file, step: int, when: str) -> list[str]:
    callback = f"[{{_target_:tests.test_trust.PoisonAdapter,step:{step},when:{when}}}]"
    return tiny_run_overrides(
        text_file, **{"trainer.max_steps": 8, "tune.checkpoint_every": 2, "trainer.callbacks": callback}
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "message", "good_step"),
    [
        ("before", r"the training loss is nan at step 5", 4),
        ("after", r"adapter tensors are not finite after step 4 \(.+\); no checkpoint written for it", 2),
    ],
)
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, text_file, when, message, good_step
):
    cfg = compose_config(poisoned_overrides(text_file, 4, when), tmp_path)
    with pytest.raises(RunError, match=rf"^tuning stopped: {message}; the last good checkpoint is ") as err:
        run(cfg, progress=False)
    assert "\n" not in str(err.value)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert str(err.value).endswith(f"{checkpoint} (after step {good_step})")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == good_step
    # Only the adapter's tensors (SPP: A and b of every wrapped Linear), every one finite.
    assert state["state_dict"] and all(k.endswith((".A", ".b")) for k in state["state_dict"])
    assert len(state["state_dict"]) == 2 * 7 * 2
    assert all(bool(torch.isfinite(t).all()) for t in state["state_dict"].values())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["error"] == str(err.value)
    assert not (tmp_path / "model").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_a_finished_run_keeps_an_adapter_only_checkpoint(tmp_path, text_file):
    overrides = tiny_run_overrides(text_file, **{"tune.checkpoint_every": 3, "export.enabled": "false"})
    results = run(compose_config(overrides, tmp_path), progress=False)
    state = torch.load(results["tune"]["checkpoint"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    adapter = load_file(tmp_path / "adapter" / "sppx_adapter.safetensors")
    saved = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    assert len(saved) == len(adapter) == 28
    assert all(any(name.endswith(k) for name in saved) for k in adapter)
    assert sum(t.numel() for t in saved.values()) == results["params"]["trainable"]


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_complete_looking_output(tmp_path, text_file, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(tiny_run_overrides(text_file), tmp_path), progress=False)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.tmp-*"))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"


def test_atomic_text_writes_keep_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")

    def no_rename(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("sppx.data.os.replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow
def test_zeros_are_rechecked_on_the_saved_files(tmp_path, text_file, monkeypatch):
    real_save = LlamaForCausalLM.save_pretrained

    def save_then_corrupt(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        path = Path(directory) / "model.safetensors"
        tensors = load_file(path)
        weight = tensors["model.layers.1.mlp.down_proj.weight"]
        weight[weight == 0] = 0.5  # every pruned weight of one matrix, on disk only
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_then_corrupt)
    with pytest.raises(SparsityViolation, match=r"saved files in .*down_proj has \d+ of \d+ pruned weights"):
        run(compose_config(tiny_run_overrides(text_file), tmp_path), progress=False)
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".model.tmp-*"))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_same_command_and_seed_give_identical_masks_metrics_and_files(tmp_path, text_file):
    def once(name: str, seed: int = 0) -> tuple[dict, bytes]:
        results = run(
            compose_config(tiny_run_overrides(text_file, seed=seed), tmp_path / name), progress=False
        )
        return results, (Path(results["model_dir"]) / "model.safetensors").read_bytes()

    (a, file_a), (b, file_b), (c, file_c) = once("a"), once("b"), once("c", seed=1)
    for key in ("ppl", "sparsity", "params", "data"):
        assert a[key] == b[key], key
    assert a["tune"]["steps"] == b["tune"]["steps"]
    assert hashlib.sha256(file_a).digest() == hashlib.sha256(file_b).digest()
    weights_a, weights_b = (
        load_file(tmp_path / "a" / "model" / "model.safetensors"),
        load_file(tmp_path / "b" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(weights_a[k] == 0, weights_b[k] == 0) for k in weights_a)  # the masks
    assert c["data"]["calibration"]["digest"] != a["data"]["calibration"]["digest"] and file_c != file_a


@pytest.mark.slow
def test_the_export_has_a_model_card_and_only_safetensors_weights(tmp_path, text_file):
    results = run(compose_config(tiny_run_overrides(text_file), tmp_path), progress=False)
    model_dir = Path(results["model_dir"])
    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names and not {n for n in names if n.endswith((".bin", ".pt", ".ckpt"))}
    card = (model_dir / "README.md").read_text()
    assert f"| final (this model) | {results['ppl']['final']:.2f} |" in card
    assert f"| dense | {results['ppl']['dense']:.2f} |" in card
    for module_type, value in results["sparsity"]["per_type"].items():
        assert f"| {module_type} | {value:.4f} |" in card
    assert "Wanda" in card and "SPP" in card and "sparsity: 0.5" in card  # method and the config
    assert f"{results['sparsity']['zeros_verified']:,} pruned weights" in card
    assert "not started from the command line" in card  # run() was given no overrides
    # The Hub reads its metadata; the machine's folders stay on the machine.
    from huggingface_hub import ModelCard
    from transformers import AutoConfig

    meta = ModelCard.load(model_dir / "README.md").data
    assert "sppx" in meta.tags and meta.library_name == "transformers"
    assert meta.eval_results[0].metric_type == "perplexity"
    assert meta.eval_results[0].metric_value == pytest.approx(results["ppl"]["final"], rel=1e-4)
    assert str(tmp_path) not in card and "<path>/" in card
    assert results["sppx"]["version"] and f"sppx {results['sppx']['version']}" in card
    # Tuning ran without a KV cache; the export generates with the model's own setting.
    assert AutoConfig.from_pretrained(model_dir).use_cache is True


def test_the_model_card_gives_the_command_that_reproduces_the_run(tmp_path, text_file):
    overrides = tiny_run_overrides(text_file, **{"trainer.max_steps": 2})
    results = run(compose_config(overrides, tmp_path), progress=False, overrides=overrides)
    card = (Path(results["model_dir"]) / "README.md").read_text()
    assert results["command"].startswith("python run.py model=tiny-llama data=text")
    assert f"```\n{without_paths(results['command'])}\n```" in card and str(tmp_path) in results["command"]


def source_files() -> list[Path]:
    return [*ROOT.joinpath("sppx").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py"), ROOT / "run.py"]


@pytest.mark.slow
def test_every_torch_load_is_weights_only_and_no_remote_code_is_trusted_by_default():
    loads, problems = 0, []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and getattr(func.value, "id", "")
                in (
                    "torch",
                    "pickle",
                )
            ):
                loads += 1
                value = keywords.get("weights_only")
                if func.value.id == "pickle" or not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{path.name}:{node.lineno} loads without weights_only=True")
            value = keywords.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                problems.append(f"{path.name}:{node.lineno} trusts remote code")
    assert loads >= 1 and not problems, problems


def test_hub_models_load_without_remote_code_unless_asked(tmp_path, monkeypatch):
    seen = []

    def fake(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    for trusted in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            models.HubModel(name_or_path=str(tmp_path), trust_remote_code=trusted).load()
    with pytest.raises(RuntimeError, match="stop here"):
        models.HubModel(name_or_path=str(tmp_path)).load()
    assert seen == [False, True, False]
