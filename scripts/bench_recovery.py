"""Recovery compared: adapter x teacher after Wanda pruning, with one step budget and one data set.

Every configuration is a complete ``run.py`` job in its own process (so peak memory is its own):
prune -> tune -> merge -> evaluate. Per configuration: perplexity after pruning and after the merge,
the sparsity after the merge (LoRA's merge fills the zeros in), trainable parameters, the median time
of one training step and the peak resident memory while tuning. Ratios against LoRA (step time,
memory) and against ``teacher=none`` (memory) are computed from rows of this same run.

Writes recovery.csv, recovery.md and recovery.png (final perplexity bars per pattern) under --out.
A configuration whose results.json already exists under --out is read, not run again (--rerun).

    python scripts/bench_recovery.py                                   # the default grid, SmolLM2-135M
    python scripts/bench_recovery.py --patterns 75% --adapters spp masked_lora --teachers none dense
    python scripts/bench_recovery.py --model tiny-llama --steps 4      # a smoke test
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sppx.results import read_results

ROOT = Path(__file__).resolve().parents[1]
# Adapter variants: a name -> its run.py overrides. spp_fused is SPP without adapter dropout, where
# its forward is one matmul with the merged weight (the reference recipe uses dropout 0.05).
ADAPTERS = {
    "spp": ["adapter=spp"],
    "spp_fused": ["adapter=spp", "adapter.dropout=0.0"],
    "spp_grouped": ["adapter=spp", "adapter.grouped=true"],
    "masked_lora": ["adapter=masked_lora"],
    "lora": ["adapter=lora"],
}
DEFAULT_ADAPTERS = ["spp", "masked_lora", "lora"]
TEACHERS = ["none", "dense", "numerous"]
PATTERNS = ["50%", "2:4", "75%"]


def pattern_overrides(text: str) -> list[str]:
    """``2:4`` -> an N:M pattern; ``75%`` or ``0.75`` -> unstructured at that sparsity."""
    if ":" in text:
        n, m = text.split(":")
        return (
            [f"pattern={n}:{m}"]
            if text in ("2:4", "4:8")
            else ["pattern=nm", f"pattern.n={n}", f"pattern.m={m}"]
        )
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    return ["pattern=unstructured", f"sparsity={value}"]


def run_config(out: Path, pattern: str, adapter: str, teacher: str, args, console: Console) -> dict | None:
    name = f"{pattern.replace(':', 'of').replace('%', 'pct')}-{adapter}-{teacher}"
    run_dir = out / name
    results_path = run_dir / "results.json"
    r = None if args.rerun else read_results(results_path)  # a failed run's record: run again
    if r is None and args.no_run:
        return None
    if r is None:
        command = [
            sys.executable,
            str(ROOT / "run.py"),
            f"model={args.model}",
            "pruner=wanda",
            *pattern_overrides(pattern),
            *ADAPTERS[adapter],
            f"teacher={teacher}",
            f"trainer.max_steps={args.steps}",
            f"trainer.val_check_interval={args.steps}",
            f"eval.max_windows={args.eval_windows}",
            "eval.dense=false",
            "export=false",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
            *args.extra,
        ]
        console.print(f"[bold]{name}[/bold]: {' '.join(command[2:])}")
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        r = read_results(results_path)
        if done.returncode != 0 or r is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            console.print(f"[red]{name} failed[/red]: {tail[0]}")
            return None
    return {
        "pattern": pattern,
        "adapter": adapter,
        "teacher": teacher,
        "ppl_pruned": r["ppl"]["pruned"],
        "ppl_final": r["ppl"]["final"],
        "sparsity_after_merge": r["sparsity"]["measured"],
        "trainable_params": r["params"]["trainable"],
        "step_time_s": r["tune"]["step_time_s"],
        "peak_rss_mib": r["tune"]["peak_rss_mib"],
        "steps": r["tune"]["steps"],
    }


def add_ratios(rows: list[dict]) -> None:
    """step time and memory vs LoRA (same pattern and teacher); memory vs teacher=none (same adapter)."""
    index = {(r["pattern"], r["adapter"], r["teacher"]): r for r in rows}
    for r in rows:
        lora = index.get((r["pattern"], "lora", r["teacher"]))
        none = index.get((r["pattern"], r["adapter"], "none"))
        r["time_vs_lora"] = round(r["step_time_s"] / lora["step_time_s"], 3) if lora else None
        r["memory_vs_lora"] = round(r["peak_rss_mib"] / lora["peak_rss_mib"], 3) if lora else None
        r["memory_vs_no_teacher"] = round(r["peak_rss_mib"] / none["peak_rss_mib"], 3) if none else None


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    fig, axes = plt.subplots(1, len(patterns), figsize=(5 * len(patterns), 4.2), squeeze=False)
    colours = {"none": "#4c72b0", "dense": "#dd8452", "numerous": "#55a868"}  # by teacher
    for ax, pattern in zip(axes[0], patterns, strict=True):
        sub = [r for r in rows if r["pattern"] == pattern]
        labels = [f"{r['adapter']} / {r['teacher']}" for r in sub]
        ax.bar(range(len(sub)), [r["ppl_final"] for r in sub], color=[colours[r["teacher"]] for r in sub])
        pruned = sub[0]["ppl_pruned"]
        ax.axhline(
            pruned, color="grey", linestyle="--", linewidth=1, label=f"pruned, no tuning ({pruned:.1f})"
        )
        ax.set_xticks(range(len(sub)), labels, fontsize=7, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(r["ppl_final"] for r in sub) / 1.5)
        ax.set_title(f"Wanda {pattern}")
        ax.set_ylabel("perplexity after merge")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


COLUMNS = [
    ("pattern", "pattern"),
    ("adapter", "adapter"),
    ("teacher", "teacher"),
    ("ppl_pruned", "ppl pruned"),
    ("ppl_final", "ppl merged"),
    ("sparsity_after_merge", "sparsity merged"),
    ("trainable_params", "trainable"),
    ("step_time_s", "s/step"),
    ("time_vs_lora", "time / LoRA"),
    ("peak_rss_mib", "peak MiB"),
    ("memory_vs_lora", "mem / LoRA"),
    ("memory_vs_no_teacher", "mem / no teacher"),
]


def fmt(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key in ("ppl_pruned", "ppl_final"):
        return f"{value:.1f}"
    if key == "sparsity_after_merge":
        return f"{value:.4f}"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "peak_rss_mib":
        return f"{value:.0f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--adapters", nargs="+", default=DEFAULT_ADAPTERS, choices=list(ADAPTERS))
    parser.add_argument("--teachers", nargs="+", default=TEACHERS, choices=TEACHERS)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_recovery")
    parser.add_argument("--rerun", action="store_true", help="run configurations that already have results")
    parser.add_argument("--no-run", action="store_true", help="only read results already under --out")
    parser.add_argument("extra", nargs="*", help="more run.py overrides for every configuration")
    args = parser.parse_args()
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for pattern in args.patterns:
        for adapter in args.adapters:
            for teacher in args.teachers:
                row = run_config(args.out, pattern, adapter, teacher, args, console)
                if row is not None:
                    rows.append(row)
    if not rows:
        sys.exit("no configuration completed")
    add_ratios(rows)

    table = Table(title=f"Recovery after Wanda on {args.model}: {args.steps} steps each")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(fmt(k, r[k]) for k, _ in COLUMNS))
    console.print(table)

    with open(args.out / "recovery.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k, _ in COLUMNS] + ["steps"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    (args.out / "recovery.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "recovery.png", f"{args.model}, {args.steps} steps, same data for every bar")
    console.print(f"wrote {args.out / 'recovery.csv'}, recovery.md, recovery.png")


if __name__ == "__main__":
    main()
