"""Shared fixtures: tiny random Llama models (fixed seed), composed configs, a small text corpus."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub, even when the network is up

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sppx.models import TinyLlama

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

SAMPLE_TEXT = """The river rises in the northern hills and flows south through a wide valley of farms and
small towns before it reaches the sea at the old harbour.

In the spring the snow melts on the hills and the river runs high; in late summer it is slow and shallow
and children can walk across the stony ford below the mill.

The mill was built of grey stone more than two hundred years ago and ground the grain of the whole valley
until the railway brought cheaper flour from the cities of the coast.

Today the mill is a small museum, and visitors can watch the great wheel turn on the first Sunday of every
month while a guide explains how the stones were dressed and set.
"""


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny():
    """(model, tokenizer): 2 blocks, hidden 64, 4 heads / 2 KV heads, intermediate 128, seed 0."""
    return TinyLlama(seed=0).load()


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join([SAMPLE_TEXT] * 12))
    return path


def parameter_storages(model) -> dict[int, int]:
    """``{storage address: bytes}`` of the distinct storages behind the model's parameters."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def compose_config(overrides: list[str], output_dir: Path, cache_dir: Path | None = None) -> DictConfig:
    """The run config as ``run.py`` would see it, for the given command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *overrides,
                f"paths.output_dir={output_dir}",
                f"paths.cache_dir={cache_dir or output_dir / 'cache'}",
            ],
        )


def tiny_run_overrides(text_file: Path, **extra) -> list[str]:
    """A fast complete pipeline on the tiny model and the sample text."""
    values = {
        "model": "tiny-llama",
        "data": "text",
        "data.paths": f"[{text_file}]",
        "data.seqlen": 32,
        "data.nsamples": 8,
        "data.batch_size": 4,
        "data.val_windows": 4,
        "eval.max_windows": 8,
        "trainer.max_steps": 6,
        "trainer.val_check_interval": 3,
        "trainer.enable_progress_bar": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def structured_overrides(text_file, neuron_multiple: bool = True, **extra) -> list[str]:
    """A tiny structured run: 4 layers, LoRA recovery (shortgpt has no neuron_multiple)."""
    values = {"pattern": "structured", "model.num_hidden_layers": 4, "adapter": "lora", **extra}
    if neuron_multiple:
        values["pruner.neuron_multiple"] = 8
    return tiny_run_overrides(text_file, **values)


def run_py(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` from the project root, its output captured (``env``: the process's whole
    environment, when given)."""
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def sweep_args(tmp_path: Path, text_file: Path, name: str = "sweep") -> list[str]:
    """A fast tiny-model multirun into ``tmp_path / name`` (jobs share one cache), without an export."""
    return [
        "-m",
        *tiny_run_overrides(text_file, **{"trainer.max_steps": 2}),
        "export.enabled=false",
        f"hydra.sweep.dir={tmp_path / name}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
