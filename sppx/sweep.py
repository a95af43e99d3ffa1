"""What a sweep does when it ends: one table and the plots over all of its jobs, in the sweep folder."""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sppx.collect import collect, write_report

log = logging.getLogger(__name__)

MAX_DIRNAME = 180  # file systems allow 255 bytes per path component


def swept_keys(overrides: list[str]) -> set[str]:
    """The keys that a sweep's command-line overrides vary (``pruner=magnitude,wanda``, ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


@functools.cache
def sweep_keys_of(sweep_dir: str) -> frozenset[str]:
    """The keys a sweep varies, read from the ``multirun.yaml`` Hydra writes into its folder before any
    job starts (so every job process, local or not, can read it): its swept command-line overrides and
    a search sweeper's parameters. Empty when the file is not there."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return frozenset()
    config = OmegaConf.load(path)
    keys = swept_keys(list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []))
    keys |= {str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})}
    return frozenset(keys)


def job_dirname(overrides, sweep_dir: str | None = None, params=None) -> str:
    """A sweep job's folder name: its values of the swept keys (all its overrides when none are known),
    ``key=value`` joined by commas, as one path component (``/`` in values becomes ``_``), shortened with
    a hash of the whole when too long. ``params``: a search sweeper's parameters (Optuna's trials are
    named by them; that sweeper writes no multirun.yaml)."""
    items = [str(o) for o in overrides]
    keys = sweep_keys_of(str(sweep_dir)) if sweep_dir else frozenset()
    keys = keys | {str(k) for k in (params or {})}
    if keys:
        items = [o for o in items if o.lstrip("+~").split("=", 1)[0] in keys] or items
    name = ",".join(items).replace("/", "_") or "defaults"
    if len(name) > MAX_DIRNAME:
        name = f"{name[: MAX_DIRNAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


# Resolvable wherever sppx is imported: the sweep's own process and any job process a launcher starts.
OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): after a multirun, collect every job's results.json into
    summary.md / summary.csv / plots in the sweep directory and log how many jobs completed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        keys = swept_keys(list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []))
        keys |= {str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})}
        rows, results = collect(root, sorted(keys))
        if not rows:
            return
        space = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        optuna = "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        search = {str(k): str(v) for k, v in space.items()} if space and optuna else None
        write_report(rows, results, root, sorted(keys), search=search)
        failed = [r for r in rows if r["status"] != "complete"]
        log.info(
            "sweep: %d of %d jobs complete; table and plots in %s", len(rows) - len(failed), len(rows), root
        )
        for r in failed:
            log.warning("sweep: %s %s: %s", r["run"], r["status"], r["error"])
        if failed:  # the command fails when a job did: scripts and schedulers see it
            print(
                f"sppx: error: {len(failed)} of {len(rows)} jobs failed: {', '.join(r['run'] for r in failed)}",
                file=sys.stderr,
            )
            raise SystemExit(1)
