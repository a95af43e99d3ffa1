"""A run owns its folder: a second run into a folder that holds a finished, interrupted or checkpointed run
is refused in one line (nothing of the old run changes) unless resume=true or overwrite=true; two runs
cannot share a folder at once; a rejected command writes nothing, not even Hydra's .hydra/ record."""

import fcntl
import json
import os

import pytest
import torch

from sppx.errors import ConfigError
from sppx.pipeline import run
from sppx.run_folder import LOCK_FILE
from tests.conftest import compose_config, run_py, tiny_run_overrides


def snapshot(folder) -> dict:
    """Every file under ``folder`` (the lock aside) -> its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE and "run.log" not in p.name
    }


@pytest.mark.slow
def test_a_finished_run_is_not_written_over_without_resume_or_overwrite(tmp_path, text_file):
    out, cache = tmp_path / "run", tmp_path / "cache"
    steps = {"trainer.max_steps": 2, "tune.checkpoint_every": 1}
    args = [*tiny_run_overrides(text_file, **steps), f"paths.cache_dir={cache}"]
    first = run_py(*args, f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / ".hydra" / "overrides.yaml").is_file() and (out / ".hydra" / "config.yaml").is_file()
    before = snapshot(out)

    again = run_py(*args, "trainer.max_steps=1", f"hydra.run.dir={out}")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"sppx: error: hydra.run.dir='{out}': holds a complete run; add resume=true to continue it or "
        "overwrite=true to start it over (or give the run a new folder)"
    ]
    assert snapshot(out) == before  # results, model, checkpoint and .hydra/ untouched

    over = run_py(*args, "trainer.max_steps=1", "overwrite=true", f"hydra.run.dir={out}")
    assert over.returncode == 0, over.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tune"]["steps"] == 1 and results["config"]["overwrite"] is True
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1  # the old run's step-2 checkpoint is gone with it


def test_a_checkpoint_without_a_record_is_a_run_too(tmp_path, text_file):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"from a run killed with SIGKILL")
    with pytest.raises(ConfigError, match=r"holds a run's checkpoint; add resume=true"):
        run(compose_config(tiny_run_overrides(text_file), out), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_two_runs_cannot_share_a_folder(tmp_path, text_file):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid 4242\)$"):
            run(compose_config(tiny_run_overrides(text_file), out), progress=False)
    finally:
        os.close(fd)
    assert not (out / "results.json").exists()
    results = run(
        compose_config(tiny_run_overrides(text_file, **{"trainer.max_steps": 1}), out), progress=False
    )
    assert results["status"] == "complete"


@pytest.mark.slow
def test_a_rejected_command_writes_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    proc = run_py("model=tiny-llama", "sparsity=1.5", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("sppx: error: sparsity=1.5")
    assert not out.exists()
