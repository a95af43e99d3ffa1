"""Experiment tracking helpers (W&B offline unless the user is logged in)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from pytorch_lightning.loggers import WandbLogger

from sppx.errors import require

MODES = ("auto", "online", "offline")


def wandb_logged_in() -> bool:
    """True when an API key is available (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return auth.authenticators(host) is not None


def wandb_logger(
    project: str = "sppx",
    mode: str = "auto",
    save_dir: str = ".",
    group: str | None = None,
    job_type: str | None = None,
    tags: list | None = None,
    **kwargs,
) -> WandbLogger:
    """A Lightning ``WandbLogger``; ``mode=auto`` goes online only when logged in."""
    require(mode in MODES, "logger.mode", mode, f"allowed: {', '.join(MODES)}")
    offline = mode == "offline" or (mode == "auto" and not wandb_logged_in())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        offline=offline,
        group=group,
        job_type=job_type,
        tags=list(tags or []),
        **kwargs,
    )
