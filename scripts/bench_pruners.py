"""One-shot pruners measured against each other, side by side in one process.

For each pruner (magnitude, Wanda, Wanda+OWL, SparseGPT, SparseGPT+OWL by default) and each pattern
(50%, 4:8, 2:4, 60%, 70%, 75% by default): the pruned perplexity (evaluation part of the default text,
consecutive windows; no tuning), the measured sparsity, the prune time and its ratio to one plain
forward pass of the dense model over the same calibration windows (median of the forward passes
timed in this process), the time per phase, and the peak memory increase while pruning.

Writes pruners.csv, pruners.md and pruners.png (ppl vs sparsity, one line per pruner; N:M patterns
as markers) under the output directory.

    python scripts/bench_pruners.py                                   # SmolLM2-135M, everything
    python scripts/bench_pruners.py --pruners wanda sparsegpt --patterns 50% 2:4
    python scripts/bench_pruners.py --model tiny-llama --eval-windows 4  # a smoke test
    python scripts/bench_pruners.py --profile                          # where Wanda/SparseGPT spend time
    python scripts/bench_pruners.py --pruners wanda wanda+bf16 --patterns 50% 2:4  # fp32 vs bf16 products
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sppx.anatomy import decoder_layers, prunable_linears
from sppx.data import TokenizedCorpus, WikiText, calibration_windows, consecutive_windows
from sppx.evaluate import perplexity
from sppx.models import EmbeddedModel, TinyLlama, default_cache_dir
from sppx.profiling import PeakMemory, Stopwatch
from sppx.pruning import MagnitudePruner, SparseGPTPruner, SparsityPattern, WandaPruner, prune_model
from sppx.pruning.owl import layer_sparsities

PRUNERS = {
    "magnitude": lambda bs: MagnitudePruner(batch_size=bs),
    "magnitude+owl": lambda bs: MagnitudePruner(batch_size=bs, allocation="owl"),
    "wanda": lambda bs: WandaPruner(batch_size=bs),
    "wanda+variant": lambda bs: WandaPruner(batch_size=bs, use_variant=True),
    "wanda+owl": lambda bs: WandaPruner(batch_size=bs, allocation="owl"),
    "wanda+bf16": lambda bs: WandaPruner(batch_size=bs, compute_dtype="bfloat16"),
    "sparsegpt": lambda bs: SparseGPTPruner(batch_size=bs),
    "sparsegpt+bf16": lambda bs: SparseGPTPruner(batch_size=bs, compute_dtype="bfloat16"),
    "sparsegpt+owl": lambda bs: SparseGPTPruner(batch_size=bs, allocation="owl"),
}
DEFAULT_PRUNERS = ["magnitude", "wanda", "wanda+owl", "sparsegpt", "sparsegpt+owl"]
DEFAULT_PATTERNS = ["50%", "4:8", "2:4", "60%", "70%", "75%"]
MiB = 2**20
PROFILED_BLOCKS = 4


def parse_pattern(text: str) -> tuple[SparsityPattern, float]:
    """``2:4`` -> N:M; ``60%`` or ``0.6`` -> unstructured at that sparsity."""
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        pattern = SparsityPattern("nm", n, m)
        return pattern, pattern.target(0.0)
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    return SparsityPattern(), value


def timed_forward(model, windows: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def measured_sparsity(model, targets) -> float:
    linears = prunable_linears(model, targets).values()
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears)
    return zeros / sum(lin.weight.numel() for lin in linears)


def prune_once(model, label, pattern, sparsity, calib, batch_size) -> dict:
    """Prune ``model`` in place; return time, phases, peak memory and per-layer sparsities."""
    pruner = PRUNERS[label](batch_size)
    watch = Stopwatch()
    with PeakMemory() as peak:
        start = time.perf_counter()
        with watch("OWL outliers"):
            layers = layer_sparsities(model, pruner, sparsity, calib, progress=False)
        prune_model(model, pruner, layers, pattern, calib, progress=False, watch=watch)
        seconds = time.perf_counter() - start
    if pruner.allocation == "uniform":
        watch.times.pop("OWL outliers")
    return {
        "seconds": seconds,
        "phases": watch.times,
        "rss_increase": peak.rss_increase,
        "layers": layers,
        "targets": pruner.targets,
    }


def profile_pruner(model, dense_state, label, calib, batch_size, out_dir: Path, console) -> None:
    from torch.profiler import ProfilerActivity, profile

    model.load_state_dict(dense_state)
    pruner = PRUNERS[label](batch_size)
    # The first blocks only: SparseGPT's column sweep is ~100k small ops per block, and the profiler
    # keeps every event in memory.
    layers = decoder_layers(model)
    model.model.layers = layers[:PROFILED_BLOCKS]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prune_model(model, pruner, 0.5, SparsityPattern(), calib, progress=False)
    finally:
        model.model.layers = layers
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (out_dir / f"profile-{label}.txt").write_text(table)
    console.print(
        f"[bold]torch profiler, {label} at 50%, first {PROFILED_BLOCKS} blocks "
        "(top operators by self CPU time)[/bold]"
    )
    console.print(table, markup=False, highlight=False)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, label in enumerate(dict.fromkeys(r["pruner"] for r in rows)):
        color = f"C{index}"
        lines = sorted(
            (r for r in rows if r["pruner"] == label and r["pattern"] == "unstructured"),
            key=lambda r: r["sparsity"],
        )
        if lines:
            ax.plot([r["sparsity"] for r in lines], [r["ppl"] for r in lines], "o-", color=color, label=label)
        for r in rows:
            if r["pruner"] == label and r["pattern"] != "unstructured":
                ax.plot(r["sparsity"], r["ppl"], "s", color=color, markerfacecolor="none")
                ax.annotate(
                    r["pattern"],
                    (r["sparsity"], r["ppl"]),
                    fontsize=7,
                    xytext=(4, 0),
                    textcoords="offset points",
                    color=color,
                )
    dense = rows[0]["dense_ppl"]
    ax.axhline(dense, color="gray", ls=":", label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("measured sparsity of the pruned Linears")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2-135m", "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--pruners", nargs="+", choices=list(PRUNERS), default=DEFAULT_PRUNERS)
    parser.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS, help="e.g. 50%% 2:4 0.7")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile Wanda and SparseGPT at 50%%")
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    try:
        patterns = [(text, *parse_pattern(text)) for text in args.patterns]
    except Exception as err:  # any parse failure is a usage error
        sys.exit(f"bench_pruners: error: --patterns: {err} (allowed: N:M, 60%, 0.6)")

    console = Console(width=150)
    out_dir = args.output_dir or Path("outputs/bench") / f"pruners-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    source = EmbeddedModel() if args.model == "smollm2-135m" else TinyLlama()
    model, tokenizer = source.load()
    tokens = TokenizedCorpus.build(WikiText(seqlen=args.seqlen), tokenizer, default_cache_dir())
    calib = calibration_windows(tokens.streams["calibration"], args.nsamples, args.seqlen, args.seed)
    evals = consecutive_windows(tokens.streams["evaluation"], args.seqlen, args.eval_windows)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    block_activations = args.nsamples * args.seqlen * model.config.hidden_size * 4
    console.print(
        f"{source.name}: {params / 1e6:.1f}M parameters ({params * 4 / MiB:.0f} MiB fp32), "
        f"{len(decoder_layers(model))} blocks; calibration {tuple(calib.shape)}, evaluation "
        f"{tuple(evals.shape)}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    timed_forward(model, calib, args.batch_size)  # warm-up: first touches of weights and allocator
    forwards = [timed_forward(model, calib, args.batch_size) for _ in range(3)]
    dense_ppl = perplexity(model, evals, 4, progress=False)["ppl"]
    console.print(
        f"dense ppl {dense_ppl:.2f}; plain forward over the calibration windows: "
        + ", ".join(f"{t:.2f}s" for t in forwards)
    )

    rows = []
    for label in args.pruners:
        for text, pattern, sparsity in patterns:
            if "owl" in label and pattern.is_nm:
                continue  # N:M fixes every layer's sparsity: nothing to allocate
            model.load_state_dict(dense_state)
            run = prune_once(model, label, pattern, sparsity, calib, args.batch_size)
            ppl = perplexity(model, evals, 4, progress=False)["ppl"]
            layers = run["layers"]
            row = {
                "pruner": label,
                "pattern": pattern.label,
                "requested": text,
                "sparsity": measured_sparsity(model, run["targets"]),
                "ppl": ppl,
                "dense_ppl": dense_ppl,
                "prune_s": run["seconds"],
                "phases": "; ".join(f"{k} {v:.1f}s" for k, v in run["phases"].items()),
                "rss_increase_mib": run["rss_increase"] / MiB,
                "layer_min": min(layers),
                "layer_max": max(layers),
            }
            rows.append(row)
            console.print(
                f"{label:>14} {text:>5}: ppl {ppl:10.2f}  sparsity {row['sparsity']:.4f}  "
                f"prune {run['seconds']:6.1f}s  (+{row['rss_increase_mib']:.0f} MiB)  {row['phases']}"
            )

    forwards += [timed_forward(model, calib, args.batch_size) for _ in range(2)]
    forward_s = statistics.median(forwards)
    for row in rows:
        row["forward_s"] = forward_s
        row["ratio"] = row["prune_s"] / forward_s

    table = Table(title=f"One-shot pruners on {source.name} (no tuning); plain forward {forward_s:.2f}s")
    columns = ["pruner", "pattern", "sparsity", "ppl", "prune s", "x forward", "+MiB", "layer sparsity"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("pruner", "pattern") else "right")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            r["pruner"],
            r["requested"],
            f"{r['sparsity']:.4f}",
            f"{r['ppl']:.2f}",
            f"{r['prune_s']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['rss_increase_mib']:.0f}",
            f"{r['layer_min']:.3f}-{r['layer_max']:.3f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    console.print(
        f"forward passes: {', '.join(f'{t:.2f}' for t in forwards)} s (median {forward_s:.2f}); "
        f"model {params * 4 / MiB:.0f} MiB; one block's activations for the calibration set "
        f"{block_activations / MiB:.1f} MiB"
    )

    with open(out_dir / "pruners.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_head = (
        f"{source.name}, calibration {args.nsamples}x{args.seqlen}, evaluation {evals.shape[0]}x{args.seqlen}, "
        f"dense ppl {dense_ppl:.2f}, plain forward {forward_s:.2f}s\n\n"
    )
    (out_dir / "pruners.md").write_text(md_head + "\n".join(md) + "\n")
    plot(rows, out_dir / "pruners.png", f"{source.name}: one-shot pruning, no tuning")

    if args.profile:
        for label in ("wanda", "sparsegpt"):
            profile_pruner(model, dense_state, label, calib, args.batch_size, out_dir, console)
    console.print(f"wrote {out_dir}/pruners.csv, pruners.md, pruners.png")


if __name__ == "__main__":
    main()
