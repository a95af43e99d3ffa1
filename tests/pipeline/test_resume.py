"""Resume: a run killed mid-tuning and started again with resume=true ends exactly where an uninterrupted
run ends (CPU, same seed: identical adapter tensors and metrics); the data loader resumes mid-epoch;
a checkpoint from other settings is refused before any work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from sppx.errors import ConfigError, RunError
from sppx.loaders import tuning_loader
from sppx.pipeline import plan, run
from tests.conftest import compose_config, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


class HoldBeforeStep(pl.Callback):
    """Writes ``marker`` and sleeps before optimizer step ``step + 1`` (after step ``step``'s checkpoint)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text("waiting")
            time.sleep(600)


def resume_overrides(text_file, teacher: str) -> list[str]:
    return tiny_run_overrides(
        text_file,
        **{"trainer.max_steps": 8, "tune.checkpoint_every": 2, "teacher": teacher, "data.val_windows": 2},
    )


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["none", "numerous"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, text_file, teacher):
    overrides = resume_overrides(text_file, teacher)
    whole = run(compose_config(overrides, tmp_path / "whole"), progress=False)

    killed = tmp_path / "killed"
    marker = tmp_path / "holding"
    hold = f"[{{_target_:tests.pipeline.test_resume.HoldBeforeStep,step:4,marker:'{marker}'}}]"
    cmd = [sys.executable, "run.py", *overrides, f"trainer.callbacks={hold}", f"hydra.run.dir={killed}"]
    cmd.append(f"paths.cache_dir={tmp_path / 'whole' / 'cache'}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "the run never reached step 4"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up of any kind
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "results.json").exists() and not (killed / "model").exists()
    state = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4

    resumed_cfg = compose_config([*overrides, "resume=true"], killed, cache_dir=tmp_path / "whole" / "cache")
    resumed = run(resumed_cfg, progress=False)
    assert resumed["tune"]["resumed_after_step"] == 4 and resumed["tune"]["steps"] == 8
    # Exactly the uninterrupted run's result (CPU, same seed): tolerance zero.
    assert resumed["ppl"] == whole["ppl"]
    a = load_file(tmp_path / "whole" / "adapter" / "sppx_adapter.safetensors")
    b = load_file(killed / "adapter" / "sppx_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if teacher == "numerous":
        assert resumed["teacher"]["schedule"] == whole["teacher"]["schedule"]


@pytest.mark.slow
def test_a_checkpoint_of_other_settings_or_none_at_all_is_refused_in_the_plan(tmp_path, text_file):
    overrides = resume_overrides(text_file, "none")
    run(compose_config([*overrides, "trainer.max_steps=4"], tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match=r"^resume=True: found no checkpoint at .*b/checkpoints/last\.ckpt"):
        plan(compose_config([*overrides, "resume=true"], tmp_path / "b"))
    with pytest.raises(
        ConfigError,
        match=r"^resume='.*last\.ckpt': the checkpoint belongs to another run \(tune\.lr: 0\.03 there, 0\.02 now\)$",
    ):
        plan(
            compose_config(
                [*overrides, "trainer.max_steps=4", "tune.lr=0.02", f"resume={tmp_path / 'a'}"],
                tmp_path / "c",
            )
        )
    p = plan(compose_config([*overrides, "trainer.max_steps=4", f"resume={tmp_path / 'a'}"], tmp_path / "d"))
    assert p.resume_from == tmp_path / "a" / "checkpoints" / "last.ckpt" and p.resume_step == 4
    with pytest.raises(ConfigError, match=r"^resume=True: continues tuning, but this run does not tune"):
        plan(compose_config([*overrides, "trainer.max_steps=0", "resume=true"], tmp_path / "e"))


def test_the_tuning_loader_keeps_the_shuffle_resumes_mid_epoch_and_splits_batches():
    data = TensorDataset(torch.arange(22))
    plain = DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7), drop_last=True
    )
    ours = tuning_loader(data, 4, seed=7)
    expected = [b[0].tolist() for _ in range(3) for b in plain]  # three epochs
    got = [b[0].tolist() for _ in range(3) for b in ours]
    assert got == expected and len(ours) == 5

    # Epoch 2, after 3 of its batches: a fresh loader with that state and skip gives the rest of it.
    loader = tuning_loader(data, 4, seed=7)
    list(loader)
    iterator = iter(loader)
    state = loader.state_dict()
    first = [next(iterator)[0].tolist() for _ in range(3)]
    rest = [b[0].tolist() for b in iterator]
    fresh = tuning_loader(data, 4, seed=123)
    fresh.load_state_dict(state)
    fresh.batch_sampler.skip = 3
    assert [b[0].tolist() for b in fresh] == rest and first + rest == expected[5:10]

    # Two processes: each takes its slice of every global batch; together they are the one-process batches.
    class Trainer:
        world_size = 2
        fit_loop = None

    slices = []
    for rank in (0, 1):
        t = Trainer()
        t.global_rank = rank
        t.fit_loop = type("Loop", (), {"restarting": False})()
        slices.append([b[0].tolist() for b in tuning_loader(data, 4, seed=7, trainer=t)])
    assert [sorted(a + b) for a, b in zip(*slices, strict=True)] == [sorted(b) for b in expected[:5]]
    assert all(len(b) == 2 for b in slices[0])


@pytest.mark.slow
def test_a_checkpoint_missing_an_adapter_tensor_ends_in_one_line(tmp_path, text_file):
    overrides = [*resume_overrides(text_file, "none"), "trainer.max_steps=4"]
    run(compose_config(overrides, tmp_path / "a"), progress=False)
    path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["state_dict"].pop(sorted(state["state_dict"])[0])
    torch.save(state, path)
    with pytest.raises(
        RunError, match=r"^the checkpoint does not hold this adapter: 1 trainable tensors missing"
    ):
        run(compose_config([*overrides, "resume=true"], tmp_path / "a"), progress=False)
