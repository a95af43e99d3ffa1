"""results.json: the complete record a finished run writes, the metrics every logger gets, and the
record of a run that failed or was interrupted."""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sppx.errors import first_line
from sppx.export import parameter_counts, sparsity_report, structured_report
from sppx.files import write_json_atomic
from sppx.interrupts import Interrupted
from sppx.pipeline.planning import GROUPS, Plan
from sppx.pipeline.resume import CHECKPOINT_DIR
from sppx.pipeline.stages import Stage
from sppx.pipeline.state import RunState
from sppx.provenance import sppx_provenance
from sppx.results import RESULTS_FILE
from sppx.tracking import finish_wandb, publish
from sppx.zeroshot import mean_accuracy

log = logging.getLogger("sppx.pipeline")

TIMED = ("load", "prune", "tune", "merge", "eval", "zero-shot", "speed", "export", "total")


class Report(Stage):
    """Measure the final sparsity and put every stage's sections together as results.json's record."""

    name = "report"

    def run(self, state: RunState) -> None:
        p, model = state.plan, state.model
        report = sparsity_report(model, p.pruner.targets)
        if state.structure is not None:  # removed, not zeroed: measure against the dense shapes
            report.update(
                structured_report(
                    model, state.structure.dense_shapes, state.structure.layers_kept, p.pruner.targets
                )
            )
        before = state.sections.get("before_merge", report["measured"])
        if p.merge_fills_zeros and before - report["measured"] > 0:
            log.warning(
                "adapter %s merged densely: sparsity %.4f -> %.4f", p.adapter.name, before, report["measured"]
            )
        state.results = complete_results(state, report, before)


def complete_results(state: RunState, report: dict, before_merge: float) -> dict:
    """results.json of a complete run (the export stage adds where the model went)."""
    p, sections, ppl = state.plan, state.sections, state.ppl
    counts = parameter_counts(state.model)
    calibration = sections.get("calibration")
    return {
        "status": "complete",
        "command": p.command,
        "device": str(p.device),
        "tags": list(p.tags),
        "sppx": sppx_provenance(),
        "ppl": {
            "dense": ppl_value(ppl.get("dense")),
            "pruned": ppl_value(ppl.get("pruned")),
            "final": ppl_value(ppl.get("final")),
            "seqlen": int(state.eval_windows.shape[1]),
            "windows": int(state.eval_windows.shape[0]),
            "validation": ppl_value(ppl.get("validation")),  # the final model on the validation windows
        },
        "zeroshot": zero_shot_report(p, state.zero_shot) if p.eval.zero_shot else None,
        "speed": sections.get("speed"),
        "sparsity": sparsity_section(p, report, before_merge, sections.get("zeros_verified", 0)),
        "prune": sections.get("prune")
        or {"allocation": p.pruner.allocation, "layer_targets": None, "phases_s": {}},
        "params": {
            "total": counts["total"],
            "nonzero": counts["nonzero"],
            "trainable": sections.get("trainable", 0),
        },
        "tune": sections.get("tune", {}),
        "teacher": state.structure.teacher if state.structure else p.teacher.report(),
        "time_s": {},
        "choices": {
            "model": p.model.name,
            "data": p.corpus.name,
            "pruner": p.pruner.name,
            "pattern": p.pattern.label,
            "adapter": p.adapter.name,
            "teacher": p.teacher.name,
        },
        "data": {
            "tokens": sections["tokens"],
            "calibration_windows": calibration["windows"] if calibration else 0,
            "calibration": calibration,
        },
        "model_dir": None,
        "config": OmegaConf.to_container(p.cfg, resolve=True),
    }


def sparsity_section(p: Plan, report: dict, before_merge: float, zeros_verified: int) -> dict:
    return {
        "target": p.target_sparsity,
        "measured": report["measured"],
        "pattern": p.pattern.label,
        "requested": p.sparsity,
        "zeros_verified": zeros_verified,
        "zeros_verified_on_disk": 0,
        "before_merge": before_merge,
        "lost_in_merge": before_merge - report["measured"] if p.merge_fills_zeros else 0.0,
        "per_type": report["per_type"],
        "per_layer": report["per_layer"],
        "per_module": report["per_module"],
    }


def ppl_value(entry: dict | None) -> float | None:
    return None if entry is None else entry["ppl"]


def zero_shot_report(p: Plan, zero_shot: dict[str, dict]) -> dict:
    means = {stage: mean_accuracy(tasks) for stage, tasks in zero_shot.items()}
    retained = (
        means["final"] / means["dense"] if means.get("final") is not None and means.get("dense") else None
    )
    return {
        "tasks": {name: {"source": p.tasks.sources[name]} for name in p.tasks.tasks},
        "skipped": dict(p.tasks.skipped),
        "limit": p.eval.task_limit,
        "stages": zero_shot,
        "mean_acc": means,
        "retained": retained,  # mean acc of the final model / the dense one's
    }


def final_metrics(results: dict) -> dict:
    """The run's final numbers under the metric names every logger gets."""
    metrics = {
        "test/ppl": results["ppl"]["final"],
        "test/ppl_dense": results["ppl"]["dense"],
        "test/ppl_pruned": results["ppl"]["pruned"],
        "val/ppl_final": results["ppl"]["validation"],
        "prune/sparsity": results["sparsity"]["measured"],
        "prune/time_s": results["time_s"]["prune"],
        "model/params_nonzero": results["params"]["nonzero"],
        "model/params_trainable": results["params"]["trainable"],
    }
    zs = results.get("zeroshot") or {}
    for stage, tasks in (zs.get("stages") or {}).items():
        suffix = "" if stage == "final" else f"_{stage}"
        for task, task_metrics in tasks.items():
            if "acc" in task_metrics:
                metrics[f"test/acc_{task}{suffix}"] = task_metrics["acc"]
        metrics[f"test/acc_mean{suffix}"] = zs["mean_acc"].get(stage)
    final_speed = (results.get("speed") or {}).get("final")
    if final_speed:
        metrics.update(
            {
                "test/prefill_tps": final_speed["prefill_tps"],
                "test/decode_tps": final_speed["decode_tps"],
                "test/prefill_x_dense": final_speed["prefill_x"],
                "test/decode_x_dense": final_speed["decode_x"],
            }
        )
    return metrics


def finish(state: RunState) -> dict:
    """Time the stages, send the final metrics to the logger, write results.json."""
    results, watch, logger = state.results, state.watch, state.logger
    watch.times["total"] = time.perf_counter() - state.started
    results["time_s"] = {k: round(watch.times.get(k, 0.0), 3) for k in TIMED}
    metrics = final_metrics(results)
    logger.log_metrics({k: v for k, v in metrics.items() if v is not None})
    publish(logger, results, metrics)
    logger.save()
    logger.finalize("success")
    finish_wandb()
    write_json_atomic(state.plan.output_dir / RESULTS_FILE, results)
    return results


# --------------------------------------------------------------------------- failed or interrupted runs
def launch_choices() -> dict:
    """The option chosen in each config group, as Hydra composed the run (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    chosen = HydraConfig.get().runtime.choices
    return {group: chosen.get(group) for group in GROUPS if chosen.get(group) is not None}


def resume_command(command: str | None, output_dir: Path, checkpoint: Path | None) -> str | None:
    """The command that continues an interrupted run in its own folder: from its checkpoint when it has
    one (``resume=true``), else from the start (``overwrite=true``)."""
    if command is None:
        return None
    own = ("resume=", "overwrite=", "hydra.run.dir=", "+resume=", "+overwrite=")
    args = [a for a in shlex.split(command)[2:] if not a.startswith(own)]
    tail = "resume=true" if checkpoint is not None else "overwrite=true"
    return shlex.join(["python", "run.py", *args, f"hydra.run.dir={Path(output_dir).resolve()}", tail])


def record_failure(
    output_dir: Path, cfg: DictConfig, command: str | None, err: BaseException, stage: str | None = None
) -> None:
    """Write ``results.json`` saying the run failed (or was interrupted, and how to resume it), with the
    error's first line and the stage it stopped in."""
    interrupted = isinstance(err, (KeyboardInterrupt, Interrupted))
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # a config that does not even resolve
        config = OmegaConf.to_container(cfg, resolve=False)
    try:
        write_json_atomic(
            Path(output_dir) / RESULTS_FILE,
            {
                "status": "interrupted" if interrupted else "failed",
                "error": first_line(err, None),
                "error_type": type(err).__name__,
                "stage": stage,
                "interrupted": interruption(err, output_dir, command) if interrupted else None,
                "command": command,
                "choices": launch_choices(),
                "config": config,
            },
        )
    except OSError as write_err:  # keep the original error the one that is raised
        log.error("could not record the failure in %s: %s", Path(output_dir) / RESULTS_FILE, write_err)


def interruption(err: BaseException, output_dir: Path, command: str | None) -> dict:
    """What an interrupted run's record says: the signal, the step and checkpoint it stopped at, and the
    command that resumes it (also attached to the exception, for the one-line message)."""
    step = getattr(err, "step", None)
    checkpoint = getattr(err, "checkpoint", None)
    if checkpoint is None and (Path(output_dir) / CHECKPOINT_DIR / "last.ckpt").is_file():
        checkpoint = Path(output_dir) / CHECKPOINT_DIR / "last.ckpt"
    how = resume_command(command, output_dir, checkpoint)
    if isinstance(err, Interrupted):
        err.resume = how
    return {
        "signal": err.signal_name if isinstance(err, Interrupted) else "SIGINT",
        "step": step,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "resume": how,
    }
