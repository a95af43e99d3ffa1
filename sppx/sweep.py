"""What a sweep does when it ends: one table and the plots over all of its jobs, in the sweep folder."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sppx.collect import collect, write_report

log = logging.getLogger(__name__)

MAX_DIRNAME = 180  # file systems allow 255 bytes per path component
_swept_keys: set[str] = set()  # the keys the running sweep varies (set when it starts)


def swept_keys(overrides: list[str]) -> set[str]:
    """The keys that a sweep's command-line overrides vary (``pruner=magnitude,wanda``, ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def job_dirname(overrides) -> str:
    """A sweep job's folder name: its values of the swept keys (all its overrides when none are known),
    ``key=value`` joined by commas, as one path component (``/`` in values becomes ``_``), shortened with
    a hash of the whole when too long."""
    items = [str(o) for o in overrides]
    if _swept_keys:
        items = [o for o in items if o.lstrip("+~").split("=", 1)[0] in _swept_keys] or items
    name = ",".join(items).replace("/", "_") or "defaults"
    if len(name) > MAX_DIRNAME:
        name = f"{name[: MAX_DIRNAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): when a multirun starts, note which keys it sweeps (the
    job folders are named from them); when it ends, collect every job's results.json into summary.md /
    summary.csv / plots in the sweep directory and log how many jobs completed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _swept_keys.clear()
        _swept_keys.update(swept_keys(config.hydra.overrides.task))
        searched = config.hydra.sweeper.get("params") or {}  # e.g. the Optuna sweeper's search space
        _swept_keys.update(str(k) for k in searched)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        rows, results = collect(root)
        if not rows:
            return
        write_report(rows, results, root)
        failed = [r for r in rows if r["status"] != "complete"]
        log.info(
            "sweep: %d of %d jobs complete; table and plots in %s", len(rows) - len(failed), len(rows), root
        )
        for r in failed:
            log.warning("sweep: %s %s: %s", r["run"], r["status"], r["error"])
