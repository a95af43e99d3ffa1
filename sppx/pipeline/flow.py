"""A run is its stages, in this order; ``execute`` runs the enabled ones on one run state."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from sppx.errors import ConfigError
from sppx.interrupts import SignalGuard
from sppx.pipeline.planning import Plan, build_plan, check_teacher, check_top_level, command_line
from sppx.pipeline.report import Report, final_metrics, finish, record_failure
from sppx.pipeline.resume import resume_checkpoint
from sppx.pipeline.stages import Export, Load, Measure, Merge, Prune, Speed, Tune
from sppx.pipeline.state import RunState
from sppx.profiling import Stopwatch
from sppx.progress import quiet_library_bars
from sppx.run_folder import check_folder, owned, previous_run
from sppx.tracking import finish_wandb
from sppx.zeroshot import load_tasks

log = logging.getLogger("sppx.pipeline")

STAGES = (
    Load(),  # logger, model, tokenizer, corpus
    Measure("dense"),
    Prune(),  # one-shot masks or structured removal
    Measure("pruned"),
    Tune(),  # the adapter's parameters (Lightning)
    Merge(),  # adapter folded in, every pruned zero checked
    Measure("final"),  # and the validation windows
    Speed(),
    Report(),  # results.json's sections put together
    Export(),  # safetensors + model card, zeros re-checked on disk
)


def plan(cfg: DictConfig, overrides: list[str] | None = None) -> Plan:
    """Resolve and check the whole config (and the model's shapes) before any weights are read;
    ``overrides`` (the command line's) are recorded so the outputs can say how to reproduce them."""
    check_top_level(cfg)
    p = build_plan(cfg, overrides)
    check_teacher(p)
    for stage in STAGES:
        if stage.enabled(p):
            stage.check(p)
    p.resume_from, p.resume_step = resume_checkpoint(p)
    check_folder(p.output_dir, cfg.get("resume"), cfg.get("overwrite", False))
    if p.eval.zero_shot:  # last: the slowest check (it loads every task's dataset)
        p.tasks = load_tasks(p.eval.tasks, p.eval.tasks_optional, p.cache_dir)
    return p


def execute(p: Plan, progress: bool = True) -> dict | None:
    """Run the plan's enabled stages. A run that fails (or is interrupted) leaves a ``results.json``
    whose status says so, with the error's first line, and never a complete-looking ``model/``."""
    watch = Stopwatch(log, quiet=("eval",))  # stages are logged as they start and end
    quiet_library_bars()
    with SignalGuard() as guard:
        # Data-parallel tuning starts this once per process; the extra processes prune the same model
        # (deterministically) and join the tuning; measuring and writing are the first one's.
        state = RunState(p, watch, guard, progress, leader=process_rank() == 0, recovery_teacher=p.teacher)
        try:
            for stage in STAGES:
                if stage.enabled(p) and (state.leader or stage.all_processes):
                    stage.run(state)
            return finish(state) if state.leader else None
        except BaseException as err:
            if state.leader:
                record_failure(
                    p.output_dir, p.cfg, p.command, err, watch.raised_in or watch.current or "setup"
                )
                finish_wandb(failed=True)
            raise


def process_rank() -> int:
    """This process's global rank: 0 unless it is one of the extra processes of data-parallel tuning
    (Lightning starts them with RANK / LOCAL_RANK / SLURM_PROCID set)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def run(
    cfg: DictConfig,
    progress: bool = True,
    overrides: list[str] | None = None,
    record_bad_input: bool = False,
) -> dict | None:
    """Plan (all checks) then execute; returns the results written to ``results.json``. ``overrides``:
    the command line's, recorded as the command that reproduces the run. Bad input writes nothing,
    unless ``record_bad_input`` (a sweep's job: its results.json then says it failed, and why)."""
    try:
        p = plan(cfg, overrides)
    except ConfigError as err:
        folder = Path(cfg.paths.output_dir)
        if record_bad_input and previous_run(folder) is None:
            record_failure(folder, cfg, command_line(overrides), err)
        raise
    if process_rank() != 0:  # an extra process of data-parallel tuning: the first one holds the folder
        return execute(p, progress=progress)
    with owned(p.output_dir, p.cfg, cfg.get("overwrite", False)):
        return execute(p, progress=progress)


def objective(results: dict) -> float:
    """What a hyper-parameter search optimises: the final metric ``optimized_metric`` names (default
    ``val/ppl_final``, the final model's perplexity on the validation part)."""
    name = (results.get("config") or {}).get("optimized_metric") or "val/ppl_final"
    value = final_metrics(results).get(name)
    return float("nan") if value is None else float(value)
