"""Extension points: a config folder of your own (``--config-dir``, ``hydra.searchpath``) and a class of
your own (``_target_`` on PYTHONPATH) go through ``run.py`` like sppx's own, checks included; and the
free-form ``tags``. The plugin is tests/plugins/my_plugin (docs/extending.md walks through it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sppx.errors import ConfigError
from sppx.models import TinyLlama
from sppx.tracking import wandb_logger
from tests.conftest import CONF_DIR, ROOT, run_py, tiny_run_overrides

PLUGINS = ROOT / "tests" / "plugins"
USER_CONF = PLUGINS / "my_plugin" / "conf"
BUILT_IN = sorted(p.stem for p in (CONF_DIR / "pruner").glob("*.yaml"))  # the oracle, not run.py's way
TARGET = "my_plugin.LargestFirstPruner"


def plugin_env() -> dict[str, str]:
    """This environment with tests/plugins first on PYTHONPATH (where ``my_plugin`` imports from)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_zeros_are_the_largest_weights(model_dir: Path, per_module: dict) -> dict[str, torch.Tensor]:
    """Every pruned Linear of the exported model is zero exactly where the dense model (the tiny model's
    fixed seed) has its largest half of |W| (magnitude pruning would zero the other half). Returns the
    keep-masks."""
    dense, _ = TinyLlama(seed=0).load()
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert len(per_module) == 14  # 2 blocks x 7 Linears
    zeros = total = 0
    keeps = {}
    for name in per_module:
        w_dense = dense.get_submodule(name).weight.detach()
        w = reloaded.get_submodule(name).weight.detach()
        largest = torch.topk(w_dense.abs().flatten(), w.numel() // 2).indices
        expected_zero = torch.zeros(w.numel(), dtype=torch.bool)
        expected_zero[largest] = True
        assert torch.equal(w.flatten() == 0, expected_zero), name
        zeros += int((w == 0).sum())
        total += w.numel()
        keeps[name] = ~expected_zero.view_as(w)
    assert zeros * 2 == total  # exactly the target sparsity 0.5
    return keeps


@pytest.mark.slow
def test_a_pruner_of_your_own_runs_end_to_end_from_a_config_dir(tmp_path, text_file):
    out = tmp_path / "run"
    proc = run_py(
        "--config-dir",
        str(USER_CONF),
        *tiny_run_overrides(text_file),
        "pruner=mine",
        "tags=[plugin]",
        f"hydra.run.dir={out}",
        env=plugin_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["config"]["pruner"]["_target_"] == TARGET
    assert results["choices"]["pruner"] == "largest_first"  # the user's class named the run
    assert results["tags"] == ["plugin"]
    assert results["sparsity"]["target"] == 0.5 and results["sparsity"]["measured"] == 0.5
    assert results["tune"]["steps"] == 6  # tuned (SPP keeps the zeros through the merge)
    check_zeros_are_the_largest_weights(Path(results["model_dir"]), results["sparsity"]["per_module"])


@pytest.mark.slow
def test_hydra_searchpath_finds_the_same_pruner(tmp_path, text_file):
    out = tmp_path / "run"
    proc = run_py(
        *tiny_run_overrides(text_file),
        f"hydra.searchpath=[file://{USER_CONF}]",
        "pruner=mine",
        "adapter=none",
        "eval.dense=false",
        "+tags=[plugin,searchpath]",
        f"hydra.run.dir={out}",
        env=plugin_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete" and results["choices"]["pruner"] == "largest_first"
    assert results["tags"] == ["plugin", "searchpath"]
    assert results["sparsity"]["measured"] == 0.5
    keeps = check_zeros_are_the_largest_weights(Path(results["model_dir"]), results["sparsity"]["per_module"])
    # Without tuning, the kept weights are the dense model's, bit for bit.
    dense, _ = TinyLlama(seed=0).load()
    reloaded = AutoModelForCausalLM.from_pretrained(results["model_dir"])
    for name, keep in keeps.items():
        w, w_dense = reloaded.get_submodule(name).weight.detach(), dense.get_submodule(name).weight.detach()
        assert torch.equal(w[keep], w_dense[keep]), name


# Command lines run through run.py's own entry point inside one subprocess (as tests/test_cli_fuzz.py).
DRIVER = r"""
import contextlib, io, json, runpy, sys
cases = json.loads(sys.argv[1])
report = []
for argv in cases:
    out = io.StringIO()
    code = 0
    sys.argv = ["run.py", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path("run.py", run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as err:
            import traceback
            out.write("ESCAPED " + "".join(traceback.format_exception(err)))
            code = -1
    report.append({"code": code, "output": out.getvalue()})
print(json.dumps(report))
"""


def drive(cases: list[list[str]]) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=plugin_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(cases)
    return report


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("sppx: error: ")]


@pytest.mark.slow
def test_an_unknown_option_lists_the_built_in_and_the_users_options(tmp_path, text_file):
    both = ", ".join(sorted([*BUILT_IN, "mine"]))
    assert "mine" not in BUILT_IN and "wanda" in BUILT_IN
    user_dirs = [
        ["--config-dir", str(USER_CONF)],
        [f"--config-dir={USER_CONF}"],
        ["-cd", str(USER_CONF)],
        [f"hydra.searchpath=[file://{USER_CONF}]"],
        ["hydra.searchpath=[pkg://my_plugin.conf]"],
        ["-m", "-cd", str(USER_CONF)],  # a sweep: every choice is checked
        ["--cfg", "job", "-cd", str(USER_CONF)],
        ["--help", "-cd", str(USER_CONF)],
        [],  # conf/ alone: the user's option is not listed
    ]
    cases = []
    for i, prefix in enumerate(user_dirs):
        flags = [a for a in prefix if not a.startswith("hydra.")]
        overrides = [a for a in prefix if a.startswith("hydra.")]
        choice = "pruner=mine,nope" if "-m" in prefix else "pruner=nope"
        cases.append(
            [
                *flags,
                *tiny_run_overrides(text_file),
                *overrides,
                f"hydra.run.dir={tmp_path / str(i)}",
                f"hydra.sweep.dir={tmp_path / str(i)}",
                choice,
            ]
        )
    report = drive(cases)
    for i, (prefix, entry) in enumerate(zip(user_dirs, report, strict=True)):
        allowed = both if prefix else ", ".join(BUILT_IN)
        assert error_lines(entry["output"]) == [f"sppx: error: pruner='nope': allowed: {allowed}"], (
            prefix,
            entry["output"][-1500:],
        )
        assert entry["code"] == 2 and "Traceback" not in entry["output"], prefix
        assert not (tmp_path / str(i)).exists(), prefix  # refused before any work


@pytest.mark.slow
def test_the_users_config_composes_with_every_way_of_naming_its_folder():
    folders = [
        ["--config-dir", str(USER_CONF)],
        [f"--config-dir={USER_CONF}"],
        ["-cd", str(USER_CONF)],
        [f"hydra.searchpath=[file://{USER_CONF}]"],
        ["hydra.searchpath=[pkg://my_plugin.conf]"],
    ]
    cases = [
        ["--cfg", "job", *[a for a in f if not a.startswith("hydra.")]]
        + [a for a in f if a.startswith("hydra.")]
        + ["pruner=mine", "pruner.per_row=true"]
        for f in folders
    ]
    cases.append(["--cfg", "job", "+tags=[a,b]"])
    cases.append(["--cfg", "job", "tags=[c]"])
    cases.append(["--config-dir", str(ROOT / "no-such-folder"), "pruner=mine"])
    report = drive(cases)
    for folder, entry in zip(folders, report[: len(folders)], strict=True):
        assert entry["code"] == 0, (folder, entry["output"][-1500:])
        assert f"pruner:\n  _target_: {TARGET}\n  per_row: true\n" in entry["output"], folder
    assert report[-3]["code"] == 0 and "\ntags:\n- a\n- b\n" in report[-3]["output"]
    assert report[-2]["code"] == 0 and "\ntags:\n- c\n" in report[-2]["output"]
    assert report[-1]["code"] == 2
    assert error_lines(report[-1]["output"]) == [
        f"sppx: error: --config-dir={ROOT / 'no-such-folder'}: is not a folder"
    ]


@pytest.mark.slow
def test_the_users_class_goes_through_the_plan_checks(tmp_path, text_file):
    bad = {
        # its own annotated argument: a boolean is a boolean
        "pruner.per_row=yes": "pruner.per_row='yes': must be true or false",
        # the base class's arguments and hooks
        "+pruner.batch_size=0": "pruner.batch_size=0: must be an integer >= 1",
        "+pruner.true_sequential=maybe": "pruner.true_sequential='maybe': must be true or false",
        "pattern=structured": "pattern='structured': pruner=largest_first prunes single weights; "
        "pattern=structured needs a structured pruner "
        "(comp, nuteprune, llm_pruner, flap, shortgpt, magnitude_structured)",
        # what the class does not take, and what the config does not have
        "+pruner.nope=1": f"pruner.nope=1: is not an argument of {TARGET}",
        "pruner.nope=1": "pruner.nope=1: is not a setting of sppx (a new key needs a leading +: +pruner.nope=1)",
    }
    cases = [
        [
            "-cd",
            str(USER_CONF),
            *tiny_run_overrides(text_file),
            f"hydra.run.dir={tmp_path / str(i)}",
            "pruner=mine",
            override,
        ]
        for i, override in enumerate(bad)
    ]
    report = drive(cases)
    for i, ((override, message), entry) in enumerate(zip(bad.items(), report, strict=True)):
        assert error_lines(entry["output"]) == [f"sppx: error: {message}"], (
            override,
            entry["output"][-1500:],
        )
        assert entry["code"] == 2 and "Traceback" not in entry["output"], override
        assert not (tmp_path / str(i)).exists(), override


def test_wandb_run_tags_join_the_loggers_own(tmp_path):
    logger = wandb_logger(mode="offline", save_dir=str(tmp_path), tags=["sppx", "a"], run_tags=["a", "b"])
    assert logger._wandb_init["tags"] == ["sppx", "a", "b"]
    assert wandb_logger(mode="offline", save_dir=str(tmp_path))._wandb_init["tags"] == []
    with pytest.raises(ConfigError, match=r"^tags=\['x+'\]: W&B takes tags of 1 to 64 characters$"):
        wandb_logger(mode="offline", save_dir=str(tmp_path), run_tags=["x" * 65])
