"""Continuing a run: which settings a checkpoint must share with the run that resumes from it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sppx.errors import ConfigError, first_line, require
from sppx.pipeline.planning import Plan

CHECKPOINT_DIR = "checkpoints"
# What decides a tuning run's trajectory: a checkpoint only resumes a run with the same values.
RESUME_SETTINGS = ("model", "data", "pruner", "pattern", "adapter", "teacher", "tune", "seed", "sparsity")
RESUME_TRAINER_SETTINGS = (
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "precision",
    "devices",
)


def run_settings(cfg: DictConfig) -> str:
    """The settings that decide the tuning trajectory, as canonical JSON (stored in checkpoints)."""
    settings = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in RESUME_SETTINGS
    }
    settings["tune"].pop("checkpoint_every", None)
    settings["trainer"] = {k: cfg.trainer.get(k) for k in RESUME_TRAINER_SETTINGS}
    return json.dumps(settings, sort_keys=True, default=str)


def first_difference(old, new, prefix: str = "") -> str:
    """The first setting (dotted key) where two nested dicts differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"


def checkpoint_path(p: Plan, value) -> Path:
    """The checkpoint file ``resume=value`` names (true: this run folder's own)."""
    if value is True:
        return p.output_dir / CHECKPOINT_DIR / "last.ckpt"
    path = Path(value).expanduser()
    for candidate in (path / CHECKPOINT_DIR / "last.ckpt", path / "last.ckpt"):
        if path.is_dir() and candidate.is_file():
            return candidate
    return path


def resume_checkpoint(p: Plan) -> tuple[Path | None, int]:
    """The checkpoint ``resume`` names (true: this run's own), checked against this run's settings."""
    value = p.cfg.get("resume")
    if value is False or value is None:
        return None, 0
    require(
        value is True or (isinstance(value, str) and value.strip() != ""),
        "resume",
        value,
        "must be true, false, or the path of a run folder or checkpoint",
    )
    require(
        p.tunes, "resume", value, "continues tuning, but this run does not tune (adapter=none or max_steps=0)"
    )
    path = checkpoint_path(p, value)
    require(
        path.is_file(),
        "resume",
        value,
        f"found no checkpoint at {path} (a run writes checkpoints/last.ckpt every tune.checkpoint_every "
        "steps; give its folder with hydra.run.dir=..., or resume=<that folder>)",
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            "resume", str(path), f"could not read the checkpoint: {first_line(err, None)}"
        ) from None
    saved = (state.get("sppx") or {}).get("settings")
    current = run_settings(p.cfg)
    if saved != current:
        why = (
            first_difference(json.loads(saved), json.loads(current))
            if saved
            else "it was not written by sppx's tuning"
        )
        raise ConfigError("resume", str(path), f"the checkpoint belongs to another run ({why})")
    return path, int(state.get("global_step", 0))


def describe_checkpoint(directory: Path) -> str:
    """Where the last good adapter checkpoint is and its step, in words."""
    path = directory / "last.ckpt"
    if not path.is_file():
        return "no checkpoint had been written (tune.checkpoint_every sets how often)"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return f"the last good checkpoint is {path} (after step {state.get('global_step')})"
