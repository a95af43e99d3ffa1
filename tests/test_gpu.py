"""Where the model lives (``device``) and the paths that only run on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from sppx.checks import fit_device, resolve_device
from sppx.errors import ConfigError
from sppx.models import load_pretrained
from sppx.pipeline import plan, run
from sppx.pipeline.planning import weight_bytes
from sppx.pruning import MagnitudePruner, SparseGPTPruner, SparsityPattern, WandaPruner, prune_model
from sppx.pruning.semi_structured import is_2_4
from sppx.pruning.structured.comp import condition_block_scores, condition_scores
from tests.conftest import compose_config, structured_overrides, tiny_run_overrides

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def trainer(**values):
    return OmegaConf.create({"accelerator": "auto", "devices": 1, **values})


def test_auto_takes_the_gpu_only_when_one_process_may_tune_on_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", trainer()) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", trainer()) == torch.device("cuda", 0)
    assert resolve_device("auto", trainer(accelerator="gpu", devices=[1])) == torch.device("cuda", 0)
    assert resolve_device("auto", trainer(accelerator="cpu")) == torch.device("cpu")
    assert resolve_device("auto", trainer(devices=2)) == torch.device("cpu")  # each process its own GPU
    assert resolve_device("cuda:1", trainer()) == torch.device("cuda", 1)
    assert resolve_device("cpu", trainer(devices=2)) == torch.device("cpu")


def test_a_device_the_run_cannot_use_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cases = {
        "tpu": r"^device='tpu': must be auto, cpu, cuda or cuda:<index>$",
        None: r"^device=None: must be auto, cpu, cuda or cuda:<index>$",
        "cuda:3": r"^device='cuda:3': this machine has 1 CUDA device\(s\); use auto or cpu$",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            resolve_device(value, trainer())
    with pytest.raises(ConfigError, match=r"^device='cuda': cannot hold the model for trainer.devices=2"):
        resolve_device("cuda", trainer(devices=2))


def test_a_model_too_large_for_the_gpu_stays_on_the_cpu_under_auto_and_is_refused_on_cuda(
    monkeypatch, caplog
):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert fit_device(gpu, "auto", 3 * 2**30) == gpu
    assert fit_device(gpu, "auto", 3 * 2**30 + 1) == torch.device("cpu")
    assert "exceed the free memory of cuda:0 (3.0 GiB); it stays on the CPU" in caplog.text
    with pytest.raises(
        ConfigError, match=r"^device='cuda': the model's weights take 4\.0 GiB and cuda:0 has 3\.0 GiB"
    ):
        fit_device(gpu, "cuda", 4 * 2**30)
    assert fit_device(torch.device("cpu"), "cpu", 2**50) == torch.device("cpu")


def test_the_weights_are_counted_from_the_config_alone_tied_ones_once(tmp_path):
    p = plan(compose_config(["model=tiny-llama", "model.dtype=bfloat16"], tmp_path))
    model, _ = p.model.load()
    assert model.config.tie_word_embeddings
    assert weight_bytes(p) == sum(t.numel() for t in model.parameters()) * 2


def test_the_run_records_where_the_model_lived(tmp_path, text_file):
    overrides = [*tiny_run_overrides(text_file, adapter="none", **{"export.enabled": "false"}), "device=cpu"]
    results = run(compose_config(overrides, tmp_path), progress=False)
    assert results["device"] == "cpu" and results["config"]["device"] == "cpu"


@needs_cuda
@pytest.mark.parametrize("pruner", [WandaPruner, SparseGPTPruner, MagnitudePruner])
@pytest.mark.parametrize("pattern", [SparsityPattern(), SparsityPattern("nm", 2, 4)], ids=["50%", "2:4"])
def test_pruning_on_the_gpu_gives_the_cpu_masks(tiny, pruner, pattern):
    """The model on the GPU, or one block at a time moved there (pruner.device): exact counts per row
    (per matrix for SparseGPT) as on the CPU, and the same masks up to rounding near-ties."""
    model, _ = tiny
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    on_cpu = prune_model(copy.deepcopy(model), pruner(), 0.5, pattern, calib, progress=False)
    on_gpu = prune_model(copy.deepcopy(model).cuda(), pruner(), 0.5, pattern, calib, progress=False)
    offloaded = prune_model(copy.deepcopy(model), pruner(device="cuda"), 0.5, pattern, calib, progress=False)
    for masks in (on_gpu, offloaded):
        assert masks.keys() == on_cpu.keys()
        for name, keep in masks.items():
            expected = on_cpu[name]
            assert torch.equal(keep.cpu().sum(1), expected.sum(1)), name
            assert (keep.cpu() == expected).float().mean() >= 0.99, name
            if pattern.is_nm:
                assert is_2_4(keep.cpu().float()), name
    assert all(keep.device.type == "cpu" for keep in offloaded.values())  # masks come back with the model


@needs_cuda
@pytest.mark.slow
def test_a_2_4_run_on_the_gpu_stays_there_and_times_the_sparse_kernels(tmp_path, text_file):
    overrides = tiny_run_overrides(
        text_file,
        pattern="2:4",
        **{
            "trainer.precision": "bf16-mixed",
            "eval.speed": "true",
            "eval.speed_repeats": 1,
            "eval.speed_decode_tokens": 4,
            "export.format": "compressed",
        },
    )
    results = run(compose_config(overrides, tmp_path / "run"), progress=False)
    assert results["device"] == "cuda:0" and results["speed"]["setup"]["device"] == "cuda:0"
    assert "final_2:4_kernels" in results["speed"]  # the semi-structured copy was timed
    assert results["sparsity"]["measured"] == 0.5 and results["sparsity"]["zeros_verified"] > 0
    assert results["tune"]["peak_cuda_mib"] > 0 and results["ppl"]["final"] != results["ppl"]["pruned"]
    reloaded = load_pretrained(tmp_path / "run" / "model")
    for name in results["sparsity"]["per_module"]:
        assert is_2_4(reloaded.get_submodule(name).weight), name


@needs_cuda
def test_comp_scores_a_gpu_weight_against_its_statistics_on_the_cpu():
    torch.manual_seed(0)
    weight, x = torch.randn(16, 32), torch.randn(64, 32)
    gram = (x.T @ x).double()  # the statistics are accumulated on the CPU in float64
    torch.testing.assert_close(
        condition_scores(weight.cuda(), gram, 0.01), condition_scores(weight, gram, 0.01)
    )
    torch.testing.assert_close(
        condition_block_scores(weight.cuda(), gram, 0.01, 8), condition_block_scores(weight, gram, 0.01, 8)
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("pruner", ["comp", "flap", "llm_pruner"])
def test_structured_pruners_run_where_the_model_lives(tmp_path, text_file, pruner, device):
    overrides = [*structured_overrides(text_file, pruner=pruner, sparsity=0.25), f"device={device}"]
    results = run(compose_config(overrides, tmp_path), progress=False)
    assert results["device"] == device and results["sparsity"]["pattern"] == "structured"
    assert abs(results["sparsity"]["measured"] - 0.25) <= 0.02  # on the CPU: 0.25, 0.25, 0.240
