"""The human summary printed at the end of a run."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(results: dict) -> Table:
    ch, ppl, sp, t = results["choices"], results["ppl"], results["sparsity"], results["time_s"]
    table = Table(
        title=escape(
            f"sppx: {ch['model']} | {ch['pruner']} {sp['pattern']} | adapter {ch['adapter']} | "
            f"teacher {ch['teacher']} | data {ch['data']}"
        )
    )
    table.add_column("model")
    table.add_column(f"ppl (seqlen {ppl['seqlen']}, {ppl['windows']} windows)", justify="right")
    table.add_column("stage time (s)", justify="right")
    table.add_row("dense", _fmt(ppl["dense"]), "load " + _fmt(t["load"], ".1f"))
    table.add_row("pruned", _fmt(ppl["pruned"]), "prune " + _fmt(t["prune"], ".1f"))
    table.add_row("final", _fmt(ppl["final"]), "tune+merge " + _fmt(t["tune"] + t["merge"], ".1f"))
    table.caption = run_caption(results) + method_caption(results)
    return table


def run_caption(results: dict) -> str:
    """Sparsity, parameters, times, what the merge lost, OWL's block sparsities and the tuning steps."""
    sp, t, params = results["sparsity"], results["time_s"], results["params"]
    caption = (
        f"sparsity target {sp['target']:.3f}, measured {sp['measured']:.4f} | "
        f"{params['nonzero']:,} of {params['total']:,} params nonzero, {params['trainable']:,} trained | "
        f"eval {t['eval']:.1f}s, total {t['total']:.1f}s"
    )
    if sp.get("lost_in_merge"):
        caption += f" | the merge lost {sp['lost_in_merge']:.4f} sparsity (from {sp['before_merge']:.4f})"
    layers = results.get("prune", {}).get("layer_targets")
    if layers and results["prune"].get("allocation") != "uniform":
        caption += f" | {results['prune']['allocation']} block sparsities {min(layers):.3f}-{max(layers):.3f}"
    tune = results.get("tune") or {}
    if tune.get("step_time_s"):
        caption += (
            f" | {tune['steps']} steps, {tune['step_time_s']:.2f} s/step, peak {tune['peak_rss_mib']:.0f} MiB"
        )
    return caption


def method_caption(results: dict) -> str:
    """The structure kept, zero-shot accuracy, speed and the teachers' schedule, where the run has them."""
    caption = ""
    structure = (results.get("prune") or {}).get("structure")
    if structure:
        caption += (
            f" | kept per layer: {structure['heads_per_layer']} heads ({structure['kv_heads_per_layer']} K/V), "
            f"{structure['neurons_per_layer']} neurons; {structure['layers']} layers"
        )
    zs = results.get("zeroshot") or {}
    if zs.get("stages"):
        means = ", ".join(f"{stage} {_fmt(acc, '.4f')}" for stage, acc in zs["mean_acc"].items())
        caption += f" | zero-shot mean acc over {len(zs['tasks'])} tasks: {means}"
        if zs.get("skipped"):
            caption += f" (skipped: {', '.join(zs['skipped'])})"
    final_speed = (results.get("speed") or {}).get("final")
    if final_speed:
        caption += (
            f" | decode {final_speed['decode_tps']:.1f} tok/s ({final_speed['decode_x']:.2f}x dense), "
            f"prefill {final_speed['prefill_tps']:.0f} tok/s ({final_speed['prefill_x']:.2f}x)"
        )
    teacher = results.get("teacher") or {}
    if teacher.get("strategy") == "numerous":
        snapshots = (
            f"{teacher['snapshots_used']} snapshots taught"
            if "snapshots_used" in teacher
            else f"{teacher['snapshots_taken']} snapshots taken"  # NutePrune's mask learning
        )
        caption += (
            f" | {len(teacher['schedule'])} (student, teacher) stages, {snapshots} (schedule in results.json)"
        )
    return caption


def print_summary(results: dict, output_dir) -> None:
    """The summary on the console, and the same text in the run's log file."""
    console = Console(record=True)
    console.print(summary_table(results))
    where = f"results: {output_dir}/results.json"
    if results["model_dir"]:
        where += f" | model: {results['model_dir']}"
    console.print(where, markup=False, soft_wrap=True)
    to_log_files("summary:\n" + console.export_text())


def to_log_files(text: str) -> None:
    """Write ``text`` to the file handlers of the logging setup only (the console has it already)."""
    record = logging.makeLogRecord(
        {"name": "sppx", "levelno": logging.INFO, "levelname": "INFO", "msg": text}
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
