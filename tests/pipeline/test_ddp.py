"""Data-parallel tuning: two CPU processes (gloo) on the same global batch end with the adapter one
process trains; only the first process writes; FSDP is refused without GPUs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sppx.errors import ConfigError
from sppx.pipeline import plan, run
from tests.conftest import compose_config, run_py, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


def ddp_overrides(text_file) -> list[str]:
    # Without dropout: its masks are drawn in each process, so they differ from one process's masks. On
    # the CPU, also on a machine with a GPU: the two runs compared must share their kernels.
    return tiny_run_overrides(
        text_file,
        **{"trainer.max_steps": 3, "adapter.dropout": 0, "data.batch_size": 4, "trainer.accelerator": "cpu"},
    )


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(tmp_path, text_file):
    one = run(compose_config(ddp_overrides(text_file), tmp_path / "one"), progress=False)
    two_dir = tmp_path / "two"
    proc = run_py(
        *ddp_overrides(text_file),
        "trainer=ddp",
        "trainer.devices=2",
        f"hydra.run.dir={two_dir}",
        f"paths.cache_dir={tmp_path / 'one' / 'cache'}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((two_dir / "results.json").read_text())
    assert two["status"] == "complete" and two["tune"]["steps"] == one["tune"]["steps"] == 3
    a = load_file(tmp_path / "one" / "adapter" / "sppx_adapter.safetensors")
    b = load_file(two_dir / "adapter" / "sppx_adapter.safetensors")
    assert a.keys() == b.keys()
    # The same global batches and averaged gradients: equal up to the order of float sums (gloo's
    # all-reduce). Adam divides by sqrt(v), so an element whose gradient is near zero can turn such a
    # rounding difference into a visible one: at least 99% of all elements agree to 1e-5 and every one
    # to 1e-3, a small fraction of one step at SPP's lr 3e-2 (a process that trained on its own slice of
    # the batch alone would differ on most elements).
    diff = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
    assert diff.max().item() < 1e-3
    assert (diff <= 1e-5).float().mean().item() >= 0.99
    assert not torch.equal(a[next(iter(a))], torch.zeros_like(a[next(iter(a))]))  # it did train
    assert two["ppl"]["final"] == pytest.approx(one["ppl"]["final"], rel=1e-4)
    assert two["sparsity"]["zeros_verified"] == one["sparsity"]["zeros_verified"] > 0
    # Only the first process wrote: one results.json, one export.
    assert (
        len(list(two_dir.rglob("results.json"))) == 1 and (two_dir / "model" / "model.safetensors").is_file()
    )


def test_the_global_batch_must_divide_among_the_processes(tmp_path, text_file):
    overrides = [
        *tiny_run_overrides(text_file, **{"data.batch_size": 3, "trainer.accelerator": "cpu"}),
        "trainer=ddp",
    ]
    with pytest.raises(ConfigError, match=r"^data\.batch_size=3: is the global batch: it must divide among"):
        plan(compose_config(overrides, tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on CPU-only machines")
def test_fsdp_is_refused_without_gpus_in_one_line(tmp_path, text_file):
    with pytest.raises(ConfigError, match=r"requires a GPU accelerator") as err:
        plan(compose_config([*tiny_run_overrides(text_file), "trainer=fsdp"], tmp_path))
    assert "\n" not in str(err.value)
