"""Experiment tracking: W&B (offline unless the user is logged in) beside Lightning's CSV metrics.

Every logger gets the config, the per-step metrics and the final metrics. A W&B run also gets
- the final metrics (and the headline results) as its **summary**, so runs compare in the runs table;
- the measured sparsity per decoder layer and per module type as **tables**, with a bar **plot** of the
  per-layer sparsity;
- ``group`` = the sweep (its folder's name) and ``job_type`` = what the run did (``prune``, ``tune``,
  ``prune-tune``, ``eval``), unless the config sets them;
and is **finished** at the end of the run (failed runs exit with code 1), so the jobs of a multirun are
separate W&B runs. An offline run prints the ``wandb sync`` command that uploads it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import netrc
import os
import secrets
import string
import sys
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, WandbLogger

from sppx.errors import require
from sppx.files import write_text_atomic

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline")
RUN_ID_FILE = "sppx-run-id"


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
    job_type: str | None = "auto",
    tags: list | None = None,
    stage: str | None = None,
    sweep: str | None = None,
    init_timeout: float = 30.0,
    resuming: bool = False,
    run_tags: list[str] | None = None,
    **kwargs,
) -> WandbLogger:
    """A Lightning ``WandbLogger``; ``mode=auto`` goes online only when logged in. ``stage`` and
    ``sweep`` come from the run (what it does, the multirun it belongs to) and fill ``job_type=auto``
    and ``group=null``; ``run_tags`` (the run's ``tags=[...]``) join ``logger.tags`` as the W&B run's
    tags. Online, the run is started here: when the server does not answer within ``init_timeout``
    seconds the run logs offline instead (``wandb sync`` uploads it later). The run's id is kept in
    ``<save_dir>/wandb/sppx-run-id``: a resumed run (``resuming``) continues the same W&B run instead of
    starting a new one."""
    require(mode in MODES, "logger.mode", mode, f"allowed: {', '.join(MODES)}")
    all_tags = merged_tags(tags, run_tags)
    offline = mode == "offline" or (mode == "auto" and not wandb_logged_in())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    import wandb

    id_file = Path(save_dir) / "wandb" / RUN_ID_FILE
    run_id = kwargs.pop("id", None) or (
        id_file.read_text().strip() if resuming and id_file.is_file() else None
    )

    def build(offline: bool, new_id: bool = False) -> WandbLogger:
        nonlocal run_id
        if not run_id or new_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text_atomic(id_file, run_id + "\n")
        settings = {"mode": "offline"} if offline else {"settings": wandb.Settings(init_timeout=init_timeout)}
        return WandbLogger(
            project=project,
            save_dir=save_dir,
            offline=offline,
            group=group if group is not None else sweep,
            job_type=stage if job_type in (None, "auto") else job_type,
            tags=all_tags,
            id=run_id,
            **settings,
            **kwargs,
        )

    logger = build(offline)
    # A failed online start keeps its id busy in this process: the offline run takes a new one.
    return logger if offline else started_online(logger, lambda: build(True, new_id=True))


def started_online(logger: WandbLogger, offline_logger) -> WandbLogger:
    """Start the online run now (within its init_timeout); when it does not start, log offline."""
    import wandb

    try:
        logger.experiment  # noqa: B018 (starts the run)
    except Exception as err:
        log.warning("W&B did not start online (%s); logging offline instead", str(err).splitlines()[0][:200])
        with contextlib.suppress(Exception):
            wandb.finish(exit_code=1)
        return offline_logger()
    return logger


def merged_tags(logger_tags: list | None, run_tags: list | None) -> list[str]:
    """``logger.tags`` then the run's ``tags``, in order, without repeats (W&B takes 1 to 64 characters)."""
    for key, given in (("logger.tags", logger_tags), ("tags", run_tags)):
        require(
            all(1 <= len(str(t)) <= 64 for t in given or []),
            key,
            given,
            "W&B takes tags of 1 to 64 characters",
        )
    return list(dict.fromkeys(str(t) for t in [*(logger_tags or []), *(run_tags or [])]))


def keep_csv_history(logger, before_step: int) -> None:
    """Lightning's CSV logger starts ``metrics.csv`` afresh in a folder that has one; a resumed run keeps
    the rows of the steps before its checkpoint, and the new rows are appended after them."""
    if not isinstance(logger, CSVLogger):
        return
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys = sorted(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < before_step]
    writer = logger.experiment  # creating it removes the old file
    with open(path, "w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = keys


def stage_of(prunes: bool, tunes: bool) -> str:
    """What a run does, in W&B's job_type words."""
    return {(True, True): "prune-tune", (True, False): "prune", (False, True): "tune"}.get(
        (prunes, tunes), "eval"
    )


def current_sweep() -> str | None:
    """The name of the multirun this job belongs to (its sweep folder), or None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def publish(logger, results: dict, final_metrics: dict) -> None:
    """What a W&B run gets at the end beyond the per-step metrics (see the module's docstring); a
    no-op for other loggers."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    run.summary.update({k: v for k, v in final_metrics.items() if v is not None})
    run.summary.update(
        {
            "status": results["status"],
            "sparsity/pattern": results["sparsity"]["pattern"],
            "params/total": results["params"]["total"],
            **{f"choice/{k}": v for k, v in results["choices"].items()},
        }
    )
    per_layer = wandb.Table(
        columns=["layer", "sparsity"],
        data=[[i, float(v)] for i, v in enumerate(results["sparsity"]["per_layer"])],
    )
    per_type = wandb.Table(
        columns=["module", "sparsity"],
        data=[[k, float(v)] for k, v in results["sparsity"]["per_type"].items()],
    )
    run.log(
        {
            "sparsity/per_layer": per_layer,
            "sparsity/per_type": per_type,
            "sparsity/per_layer_plot": wandb.plot.bar(
                per_layer, "layer", "sparsity", title="measured sparsity per decoder layer"
            ),
        }
    )


def finish_wandb(failed: bool = False) -> None:
    """End the active W&B run, if any (between the jobs of a multirun, and on failure with exit code 1);
    print how to upload it when it ran offline."""
    if "wandb" not in sys.modules:  # never imported: no run to finish
        return
    import wandb

    run = wandb.run
    if run is None:
        return
    offline = bool(getattr(run.settings, "_offline", False)) or run.settings.mode == "offline"
    folder = Path(run.dir).parent if run.dir else None
    wandb.finish(exit_code=1 if failed else 0)
    if offline and folder is not None:
        log.info("W&B ran offline; upload this run with: wandb sync %s", folder)
        print(f"wandb: offline run saved; upload it with: wandb sync {folder}", file=sys.stderr)
