"""A run owns its folder: one run at a time (a lock held for the run's lifetime), and a folder that holds
a finished or interrupted run is not written over unless the command says so (``resume=true`` continues
it, ``overwrite=true`` starts it over). Hydra's record of the command (``.hydra/``) is written only once
the run is accepted, so a rejected command leaves nothing behind."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sppx.errors import ConfigError
from sppx.files import write_text_atomic
from sppx.results import RESULTS_FILE

LOCK_FILE = ".sppx.lock"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
# What a run writes into its folder; overwrite=true removes these before the new run starts.
RUN_OUTPUTS = (RESULTS_FILE, "model", "adapter", "checkpoints", "csv", "wandb", "plots")


def previous_run(folder: Path) -> str | None:
    """What the folder holds, in words, when it holds a run that must not be written over silently: a
    complete or interrupted run, or a checkpoint (a run killed without a record)."""
    record = Path(folder) / RESULTS_FILE
    status = None
    if record.is_file():
        try:
            status = json.loads(record.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
    if status in ("complete", "interrupted"):
        return f"a {status} run"
    if (Path(folder) / CHECKPOINT).is_file():
        return "a run's checkpoint"
    return None


def check_folder(folder: Path, resume, overwrite: bool) -> None:
    """Refuse (one line) a folder holding another run, unless resume or overwrite is set."""
    held = previous_run(folder)
    if held and not overwrite and resume in (False, None):
        raise ConfigError(
            "hydra.run.dir",
            str(folder),
            f"holds {held}; add resume=true to continue it or overwrite=true to start it over "
            "(or give the run a new folder)",
        )


def holder(folder: Path) -> str:
    try:
        return (Path(folder) / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def owned(folder: Path, cfg: DictConfig, overwrite: bool):
    """Hold ``folder`` for a run: lock it (another run in it fails in one line naming the holder's pid),
    check it again under the lock, clear the old outputs when ``overwrite``, write Hydra's record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "hydra.run.dir", str(folder), f"is in use by another run (pid {holder(folder)})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        resume = cfg.get("resume")
        check_folder(folder, resume, overwrite)
        if overwrite and resume in (False, None):
            for name in RUN_OUTPUTS:
                path = folder / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        write_hydra_record(folder, cfg)
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_hydra_record(folder: Path, cfg: DictConfig) -> None:
    """``.hydra/config.yaml`` (the run's config, resolved), ``hydra.yaml`` and ``overrides.yaml`` where
    Hydra writes them (its own writing is turned off so that a rejected command leaves nothing)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = folder / ".hydra"
    write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(record / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))
