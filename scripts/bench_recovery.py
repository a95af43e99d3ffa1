"""Recovery compared: adapters (and teachers) after Wanda pruning, each adapter at its own best lr.

Every configuration is a complete ``run.py`` job in its own process: prune -> tune -> merge -> evaluate.
Per configuration: perplexity after pruning, after the merge (evaluation part) and on the validation
part, the sparsity after the merge (LoRA's merge fills the zeros in), trainable parameters, the median
time of one training step and the peak resident memory while tuning. One extra job measures the dense
model on the same windows, so every row also reports the share of the (pruned - dense) gap it closed.

``--lr-sweep`` compares adapters fairly: per pattern and adapter it runs a log grid of learning rates
(``--lr-grid``, defaults in LR_GRIDS), extends the grid while the best validation perplexity sits at
its edge (``--max-extend`` points), picks the lr with the lowest validation perplexity and reports the
evaluation-part perplexity of that pick. SPP's update is relative to W (a weight moves by about
s |A| |b| of itself) while LoRA's is absolute, so one shared lr is never a fair comparison.

Writes recovery.csv / recovery.md (every run), lr_sweep.csv / lr_sweep.md (the picks) and
recovery.png (validation ppl against lr per adapter, and the share of the gap each pick closed) under
--out. A configuration whose results.json already exists under --out is read, not run again (--rerun).

    python scripts/bench_recovery.py --lr-sweep --teachers none                 # 30 steps, 3 patterns
    python scripts/bench_recovery.py --lr-sweep --teachers none --steps 200 \\
        --lr-grid spp=3e-2,1e-1 masked_lora=3e-3,1e-2 lora=3e-3,1e-2             # a longer budget
    python scripts/bench_recovery.py --patterns 75% --adapters spp masked_lora --teachers none dense
    python scripts/bench_recovery.py --model tiny-llama --steps 4 --lr-sweep     # a smoke test
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from sppx.collect import wide_range
from sppx.lr_search import GridSearch, search
from sppx.results import read_results

ROOT = Path(__file__).resolve().parents[1]
# Adapter variants: a name -> its run.py overrides. The *_fused variants have no adapter dropout, so
# the forward is one matmul with the merged weight.
ADAPTERS = {
    "spp": ["adapter=spp"],
    "spp_fused": ["adapter=spp", "adapter.dropout=0.0"],
    "spp_dropout": ["adapter=spp", "adapter.dropout=0.05"],
    "spp_grouped": ["adapter=spp", "adapter.grouped=true"],
    "masked_lora": ["adapter=masked_lora"],
    "masked_lora_fused": ["adapter=masked_lora", "adapter.dropout=0.0"],
    "masked_lora_dropout": ["adapter=masked_lora", "adapter.dropout=0.05"],
    "lora": ["adapter=lora"],
    "lora_no_dropout": ["adapter=lora", "adapter.dropout=0.0"],
    "lora_dropout": ["adapter=lora", "adapter.dropout=0.05"],
}
DEFAULT_ADAPTERS = ["spp", "masked_lora", "lora"]
TEACHERS = ["none", "dense", "numerous"]
PATTERNS = ["50%", "2:4", "75%"]
# Log grids (about half a decade apart) the lr sweep starts from, per adapter family.
LR_GRIDS = {
    "spp": [1e-2, 3e-2, 1e-1, 3e-1],
    "masked_lora": [1e-3, 3e-3, 1e-2, 3e-2],
    "lora": [1e-3, 3e-3, 1e-2, 3e-2],
}
DENSE = "dense-reference"


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


def family(adapter: str) -> str:
    """The conf/adapter option a variant uses (``spp_fused`` -> ``spp``)."""
    return ADAPTERS[adapter][0].split("=", 1)[1]


def default_lr(adapter: str) -> float:
    """The adapter's own lr, as its config file sets it."""
    return float(OmegaConf.load(ROOT / "conf" / "adapter" / f"{family(adapter)}.yaml").lr)


@dataclass(frozen=True)
class Config:
    pattern: str
    adapter: str
    teacher: str
    steps: int
    lr: float

    @property
    def name(self) -> str:
        tag = self.pattern.replace(":", "of").replace("%", "pct")
        return f"{tag}-{self.adapter}-{self.teacher}-{self.steps}steps-lr{self.lr:g}"

    def overrides(self, args) -> list[str]:
        return [
            "pruner=wanda",
            *pattern_overrides(self.pattern),
            *ADAPTERS[self.adapter],
            f"teacher={self.teacher}",
            f"tune.lr={self.lr:g}",
            f"trainer.max_steps={self.steps}",
            "trainer.limit_val_batches=0",  # the validation ppl is measured once, after the merge
            "eval.dense=false",
        ]


def run_job(name: str, overrides: list[str], args, console: Console) -> dict | None:
    """results.json of the job ``name`` under --out, running ``run.py`` first if it has none."""
    run_dir = args.out / name
    r = None if args.rerun else read_results(run_dir)  # a failed run's record: run again
    if r is not None or args.no_run:
        return r
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        f"model={args.model}",
        *overrides,
        f"eval.max_windows={args.eval_windows}",
        f"data.val_windows={args.val_windows}",
        "export.enabled=false",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *args.extra,
    ]
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    console.print(f"[bold]{name}[/bold]: {' '.join(command[2:])}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    r = read_results(run_dir, complete_only=False)
    if done.returncode != 0 or r is None or r.get("status") != "complete":
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        console.print(f"[red]{name} failed[/red]: {tail[0]}")
    return r


def row_of(config: Config, r: dict | None, dense: float | None) -> dict:
    """One table row; a failed (e.g. diverged) run has no perplexities and ``status`` says why."""
    row = {"pattern": config.pattern, "adapter": config.adapter, "teacher": config.teacher}
    row.update(steps=config.steps, lr=config.lr, status=(r or {}).get("status", "missing"))
    if r is None or row["status"] != "complete":
        row["error"] = (r or {}).get("error")
        return row
    pruned, final = r["ppl"]["pruned"], r["ppl"]["final"]
    row.update(
        ppl_pruned=pruned,
        ppl_final=final,
        ppl_validation=r["ppl"]["validation"],
        gap_closed=(pruned - final) / (pruned - dense) if dense is not None and pruned > dense else None,
        sparsity_after_merge=r["sparsity"]["measured"],
        trainable_params=r["params"]["trainable"],
        step_time_s=r["tune"]["step_time_s"],
        peak_rss_mib=r["tune"]["peak_rss_mib"],
        dropout=r["config"]["adapter"].get("dropout"),
    )
    return row


def run_many(configs: list[Config], args, console: Console) -> dict[Config, dict | None]:
    """Results of every configuration, ``--jobs`` at a time."""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {c: pool.submit(run_job, c.name, c.overrides(args), args, console) for c in configs}
        return {c: f.result() for c, f in futures.items()}


def validation_ppl(r: dict | None) -> float | None:
    """The validation perplexity of a complete run (None for a failed one)."""
    return r["ppl"]["validation"] if r is not None and r.get("status") == "complete" else None


def lr_sweep(pairs: list[tuple[str, str]], grids: dict[str, list[float]], args, console) -> dict:
    """Per (pattern, adapter): its grid search run to the end (every point's results kept)."""
    searches = {
        pair: GridSearch(grids.get(pair[1]) or grids[family(pair[1])], args.max_extend) for pair in pairs
    }
    results: dict[Config, dict | None] = {}

    def evaluate(due):
        configs = {Config(p, a, "none", args.steps, lr): (p, a) for (p, a), lr in due}
        results.update(run_many(list(configs), args, console))
        return {(configs[c], c.lr): validation_ppl(results[c]) for c in configs}

    search(searches, evaluate)
    return {
        pair: {
            "search": s,
            "results": {c: r for c, r in results.items() if (c.pattern, c.adapter) == pair},
            "best": Config(*pair, "none", args.steps, s.best),
        }
        for pair, s in searches.items()
    }


def dense_ppl(args, console: Console) -> tuple[float | None, float | None]:
    """The dense model's perplexity on the evaluation and on the validation windows."""
    r = run_job(DENSE, ["pruner=none", "adapter=none"], args, console)
    ok = r is not None and r.get("status") == "complete"
    return (r["ppl"]["final"], r["ppl"]["validation"]) if ok else (None, None)


COLUMNS = [
    ("pattern", "pattern"),
    ("adapter", "adapter"),
    ("teacher", "teacher"),
    ("steps", "steps"),
    ("lr", "lr"),
    ("ppl_pruned", "ppl pruned"),
    ("ppl_validation", "ppl val"),
    ("ppl_final", "ppl merged"),
    ("gap_closed", "gap closed"),
    ("sparsity_after_merge", "sparsity merged"),
    ("trainable_params", "trainable"),
    ("step_time_s", "s/step"),
    ("peak_rss_mib", "peak MiB"),
    ("status", "status"),
]


def fmt(key: str, value) -> str:
    if value is None:
        return "n/a"
    if key in ("ppl_pruned", "ppl_final", "ppl_validation"):
        return f"{value:.1f}" if value < 1e4 else f"{value:.3g}"
    if key == "gap_closed":
        return f"{100 * value:.0f}%"
    if key == "sparsity_after_merge":
        return f"{value:.4f}"
    if key == "trainable_params":
        return f"{value:,}"
    if key == "lr":
        return f"{value:g}"
    if key == "peak_rss_mib":
        return f"{value:.0f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict], columns, stem: Path, title: str, console: Console) -> None:
    """``stem``.csv and ``stem``.md, and the table on the console."""
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(fmt(k, r.get(k)) for k, _ in columns))
    console.print(table)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], picks: list[dict], path: Path, title: str, dense: float | None) -> None:
    """Left: validation ppl against lr, one line per adapter, a panel per pattern. Right: the share
    of the (pruned - dense) gap each adapter's pick closed, per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    adapters = list(dict.fromkeys(r["adapter"] for r in rows))
    fig, axes = plt.subplots(1, len(patterns) + 1, figsize=(4.2 * (len(patterns) + 1), 3.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns, strict=False):
        for adapter in adapters:
            sub = sorted(
                (
                    r
                    for r in rows
                    if (r["pattern"], r["adapter"]) == (pattern, adapter) and r.get("ppl_validation")
                ),
                key=lambda r: r["lr"],
            )
            if sub:
                ax.plot([r["lr"] for r in sub], [r["ppl_validation"] for r in sub], "o-", label=adapter)
        if dense is not None:
            ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
        ax.set_xscale("log")
        drawn = [v for line in ax.get_lines() for v in line.get_ydata()]
        if wide_range(drawn):  # a diverged lr next to the good ones: a log axis keeps both readable
            ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation perplexity after merge" + (" (log)" if wide_range(drawn) else ""))
        ax.set_title(f"Wanda {pattern}")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    width = 0.8 / max(1, len(adapters))
    for k, adapter in enumerate(adapters):
        values = [
            next((p["gap_closed"] for p in picks if (p["pattern"], p["adapter"]) == (pat, adapter)), None)
            for pat in patterns
        ]
        xs = [i + k * width for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [100 * v for v in values if v is not None], width, label=adapter)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([i + width * (len(adapters) - 1) / 2 for i in range(len(patterns))], patterns)
    closed = [100 * p["gap_closed"] for p in picks if p.get("gap_closed") is not None]
    ax.set_ylim(min(0, *closed) if closed else 0, max(100, *closed) * 1.05 if closed else 100)
    ax.set_ylabel("% of the (pruned - dense) ppl gap closed")
    ax.set_title("each adapter at its best lr")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(adapters), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_grids(items: list[str]) -> dict[str, list[float]]:
    grids = dict(LR_GRIDS)
    for item in items:
        name, _, values = item.partition("=")
        if name not in ADAPTERS and name not in LR_GRIDS:
            sys.exit(f"--lr-grid {item}: unknown adapter {name!r}; allowed: {', '.join(ADAPTERS)}")
        grids[name] = sorted(float(v) for v in values.split(","))
    return grids


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--adapters", nargs="+", default=DEFAULT_ADAPTERS, choices=list(ADAPTERS))
    parser.add_argument("--teachers", nargs="+", default=TEACHERS, choices=TEACHERS)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    parser.add_argument("--lr-sweep", action="store_true", help="each adapter at its best lr on validation")
    parser.add_argument("--lr-grid", nargs="*", default=[], metavar="ADAPTER=LR,LR,...")
    parser.add_argument("--max-extend", type=int, default=2, help="grid points added beyond an edge")
    parser.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (test ppl)")
    parser.add_argument("--val-windows", type=int, default=64, help="validation windows (lr choice)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once")
    parser.add_argument("--threads", type=int, default=0, help="threads per job (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_recovery")
    parser.add_argument("--rerun", action="store_true", help="run configurations that already have results")
    parser.add_argument("--no-run", action="store_true", help="only read results already under --out")
    parser.add_argument("extra", nargs="*", help="more run.py overrides for every configuration")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    console = Console(width=200)
    args.out.mkdir(parents=True, exist_ok=True)
    dense, dense_validation = dense_ppl(args, console)
    rows, picks = [], []
    if args.lr_sweep:
        pairs = [(p, a) for p in args.patterns for a in args.adapters]
        state = lr_sweep(pairs, parse_grids(args.lr_grid), args, console)
        for (_, _), s in state.items():
            rows += [row_of(c, r, dense) for c, r in sorted(s["results"].items(), key=lambda kv: kv[0].lr)]
            pick = row_of(s["best"], s["results"][s["best"]], dense)
            picks.append({**pick, "grid": " ".join(f"{lr:g}" for lr in s["search"].grid)})
    teachers = [t for t in args.teachers if not (args.lr_sweep and t == "none")]
    configs = [
        Config(p, a, t, args.steps, picked_lr(picks, p, a) or default_lr(a))
        for p in args.patterns
        for a in args.adapters
        for t in teachers
    ]
    rows += [row_of(c, r, dense) for c, r in run_many(configs, args, console).items()]
    if not any(r["status"] == "complete" for r in rows):
        sys.exit("no configuration completed")
    title = f"{args.model}: Wanda, {args.steps} steps; dense ppl {dense:.2f}" if dense else args.model
    write_table(rows, COLUMNS, args.out / "recovery", f"Recovery after {title}", console)
    if picks:
        pick_columns = [c for c in COLUMNS if c[0] != "teacher"] + [("grid", "lr grid")]
        write_table(picks, pick_columns, args.out / "lr_sweep", f"Best lr on validation, {title}", console)
    plot(rows, picks, args.out / "recovery.png", title, dense_validation)
    console.print(f"wrote {args.out}/recovery.csv, recovery.md, lr_sweep.md, recovery.png")


def picked_lr(picks: list[dict], pattern: str, adapter: str) -> float | None:
    """The lr the sweep picked for this pattern and adapter (teachers then tune at it)."""
    return next((p["lr"] for p in picks if (p["pattern"], p["adapter"]) == (pattern, adapter)), None)


if __name__ == "__main__":
    main()
