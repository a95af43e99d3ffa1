"""SIGINT and SIGTERM at every stage: the run is recorded as interrupted (stage, signal, how to resume),
no temporary folder or complete-looking model is left, tuning stops at a step boundary with a checkpoint
that resumes to exactly the uninterrupted result, and run.py exits with 128 + the signal's number."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

import sppx.pipeline.stages as stages
from sppx.data import TokenizedCorpus
from sppx.interrupts import Interrupted
from sppx.pipeline import run
from tests.conftest import compose_config, run_py, tiny_run_overrides

SIGNALS = [signal.SIGINT, signal.SIGTERM]


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process at the end of optimizer step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def signal_then(original, signum):
    """``original`` with ``signum`` sent to this process first (the handler runs before it returns)."""

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    return wrapped


STAGES = {  # stage -> (object, attribute) whose call is the moment the signal arrives
    "load": (TokenizedCorpus, "build"),
    "prune": (stages, "prune_model"),
    "eval": (stages, "perplexity"),
    "merge": (stages, "verify_model_zeros"),
    "export": (stages, "verify_saved_zeros"),  # inside the export's temporary folder
}


def read_results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_signal_in_any_stage_is_recorded_as_interrupted(tmp_path, text_file, monkeypatch, stage, signum):
    owner, name = STAGES[stage]
    if isinstance(owner, type):
        monkeypatch.setattr(owner, name, staticmethod(signal_then(getattr(owner, name), signum)))
    else:
        monkeypatch.setattr(owner, name, signal_then(getattr(owner, name), signum))
    out = tmp_path / "run"
    overrides = tiny_run_overrides(text_file, **{"trainer.max_steps": 2})
    with pytest.raises(Interrupted) as caught:
        run(compose_config(overrides, out), progress=False, overrides=overrides)
    assert caught.value.exit_code == 128 + signum
    record = read_results(out)
    assert record["status"] == "interrupted" and record["stage"] == stage
    assert record["interrupted"]["signal"] == signal.Signals(signum).name
    assert "overwrite=true" in record["interrupted"]["resume"]  # no checkpoint: it starts over
    assert not (out / "model").exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_tuning_stops_at_a_step_with_a_checkpoint_that_resumes_exactly(tmp_path, text_file, signum):
    steps = {"trainer.max_steps": 6, "data.val_windows": 2, "trainer.log_every_n_steps": 1}
    overrides = tiny_run_overrides(text_file, **steps)
    whole = run(compose_config(overrides, tmp_path / "whole"), progress=False)

    out, cache = tmp_path / "stopped", tmp_path / "whole" / "cache"
    stop = f"[{{_target_:tests.pipeline.test_signals.SignalAtStep,step:3,signum:{int(signum)}}}]"
    stopped = [*overrides, f"trainer.callbacks={stop}", "tune.checkpoint_every=0"]
    with pytest.raises(Interrupted) as caught:
        run(compose_config(stopped, out, cache_dir=cache), progress=False, overrides=stopped)
    assert caught.value.step == 3
    record = read_results(out)
    assert record["status"] == "interrupted" and record["stage"] == "tune"
    assert record["interrupted"]["step"] == 3 and record["interrupted"]["resume"].endswith("resume=true")
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3

    resumed = run(compose_config([*overrides, "resume=true"], out, cache_dir=cache), progress=False)
    assert resumed["tune"]["resumed_after_step"] == 3 and resumed["tune"]["steps"] == 6
    assert resumed["ppl"] == whole["ppl"]
    a = load_file(tmp_path / "whole" / "adapter" / "sppx_adapter.safetensors")
    b = load_file(out / "adapter" / "sppx_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The metrics history survives the resume: every step's loss, once, as the uninterrupted run logged it.
    assert train_losses(out) == train_losses(tmp_path / "whole")
    assert sorted(train_losses(out)) == list(range(6))


def train_losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {int(r["step"]): r["train/loss"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_run_py_exits_with_128_plus_the_signal_and_says_how_to_resume(tmp_path, text_file, signum):
    out = tmp_path / "run"
    stop = f"[{{_target_:tests.pipeline.test_signals.SignalAtStep,step:2,signum:{int(signum)}}}]"
    overrides = tiny_run_overrides(text_file, **{"trainer.max_steps": 6, "trainer.callbacks": stop})
    proc = run_py(*overrides, f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sppx:")]
    assert len(lines) == 1 and "resume with: python run.py" in lines[0], proc.stderr[-2000:]
    assert f"hydra.run.dir={out}" in lines[0] and lines[0].endswith("resume=true")
    assert "Traceback" not in proc.stderr
    assert read_results(out)["interrupted"]["step"] == 2
