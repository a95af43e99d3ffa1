"""Structured pruning compared: methods that remove layers, heads and neurons, so the model gets smaller.

Every configuration is a complete ``run.py`` job in its own process (its peak memory is its own):
structured prune -> LoRA recovery -> merge -> evaluate -> export. Per configuration: perplexity after
pruning and after the recovery, the measured fraction of decoder projection parameters removed, the
parameter count, the kept structure, the prune time and its peak resident memory. One reference run
(``lora-reference``: no pruning, the same LoRA recovery) gives the memory NutePrune's mask learning is
compared with (its prune peak over the reference's tuning peak).

Speed is measured here, in this process (--threads), for the dense model and every exported model,
all loaded alike (weights copied out of the file map) and timed side by side in interleaved rounds
(sppx.speed: drift cancels): prefill tokens/s (one forward of --prefill-tokens tokens, no cache) and
decode tokens/s (greedy generation of --decode-tokens tokens from a 16-token prompt, KV cache on),
medians of --repeats after one warm-up round, with ratios to dense. The LoRA reference has the dense
shapes, so its ratios show the timing noise.

Every method runs on two unit sets (--unit-sets): ``own``, the units its paper prunes (its
conf/pruner/<method>.yaml: COMP layers + neurons, ShortGPT layers, the others heads + neurons), and
``same``, one set for every method (--units, default neurons only, which every method but ShortGPT
supports). A method that cannot prune the same set (ShortGPT: layers only; NutePrune: no layers) gets a
"skipped" row; where a method's own set is the same set it runs once. The ``units`` column says which
set a row used. --layer-range sets pruner.layer_range for every method that has one (default: each
method's own, i.e. LLM-Pruner's reference range and every layer for the others).

Writes structured.csv, structured.md and structured.png (ppl vs parameters, before and after recovery;
solid lines: own units, dashed: the same units) under --out. A configuration whose results.json already
exists under --out is read, not run again (--rerun); --no-run only reads, --no-speed skips the timing.

    python scripts/bench_structured.py                                  # SmolLM2-135M, every method
    python scripts/bench_structured.py --methods comp llm_pruner --sparsities 0.2 0.3
    python scripts/bench_structured.py --units heads neurons --unit-sets same
    python scripts/bench_structured.py --no-run --repeats 9             # re-time the exported models
    python scripts/bench_structured.py --model tiny-llama --steps 2 --methods comp shortgpt --sparsities 0.25
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sppx.results import read_results

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["comp", "llm_pruner", "flap", "shortgpt", "magnitude_structured", "nuteprune"]
LABELS = {
    "comp": "COMP",
    "llm_pruner": "LLM-Pruner",
    "flap": "FLAP",
    "shortgpt": "ShortGPT",
    "magnitude_structured": "magnitude",
    "nuteprune": "NutePrune",
}
REFERENCE = "lora-reference"
TINY = "tiny-llama"
UNITS = ["layers", "heads", "neurons"]
UNIT_SETS = ["own", "same"]


# --------------------------------------------------------------------------- configurations
def tiny_corpus(path: Path) -> Path:
    """A deterministic made-up English text, big enough for every split of a tiny smoke run."""
    rng = random.Random(0)
    subjects = ["the miller", "a farmer", "the river", "an old guide", "the children", "a traveller"]
    verbs = ["walks past", "looks at", "remembers", "crosses", "follows", "talks about"]
    objects = ["the stone bridge", "the grey mill", "a wide valley", "the harbour", "the northern hills"]
    tails = ["in the spring", "before dawn", "every Sunday", "after the rain", "at the end of summer"]
    docs = []
    for _ in range(60):
        sentences = [
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} "
            f"{rng.choice(tails)}."
            for _ in range(rng.randint(4, 8))
        ]
        docs.append(" ".join(sentences))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n")
    return path


def model_overrides(args) -> list[str]:
    """What every configuration shares: the model and, for the tiny model, a small data set."""
    if args.model != TINY:
        return [f"model={args.model}"]
    corpus = tiny_corpus(args.out / "tiny_corpus.txt")
    return [
        f"model={TINY}",
        "model.num_hidden_layers=4",
        "data=text",
        f"data.paths=[{corpus}]",
        "data.seqlen=32",
        "data.nsamples=8",
        "data.batch_size=4",
        "data.val_windows=4",
        "adapter.r=4",
        f"paths.cache_dir={args.out / 'cache'}",
    ]


def pruner_config(method: str) -> dict:
    """conf/pruner/<method>.yaml as a dict (empty when the file does not exist)."""
    from omegaconf import OmegaConf

    path = ROOT / "conf" / "pruner" / f"{method}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def own_units(method: str) -> list[str]:
    """The units a method prunes by default (its paper's), in canonical order."""
    units = pruner_config(method).get("units") or []
    return [u for u in UNITS if u in units]


def supports(method: str, units: list[str]) -> bool:
    """Whether the method can prune exactly these units."""
    if method == "shortgpt":
        return units == ["layers"]
    if method == "nuteprune":
        return "layers" not in units
    return True


def method_overrides(method: str, sparsity: float, args, units: list[str] | None = None) -> list[str]:
    words = [f"pruner={method}", "pattern=structured", f"sparsity={sparsity}"]
    keys = set(pruner_config(method))
    if units is not None:
        words.append(f"pruner.units=[{','.join(units)}]")
    if args.layer_range is not None and "layer_range" in keys:
        words.append(f"pruner.layer_range={args.layer_range}")
    if method == "nuteprune":
        words.append("teacher=numerous")
        if args.model == TINY:  # fast gates and coarse snapshots, so that a snapshot teaches in 12 steps
            words += ["pruner.steps=12", "pruner.mask_lr=2", "pruner.lambda_lr=100"]
            words += ["teacher.snapshot_every=0.02", "teacher.teacher_gap=0.02"]
        if args.nuteprune_steps:
            words.append(f"pruner.steps={args.nuteprune_steps}")
    if args.model == TINY and "neuron_multiple" in keys:
        words.append("pruner.neuron_multiple=8")
    return words


def configurations(args) -> list[dict]:
    """Every method x sparsity x unit set, then the LoRA reference. Each: ``name``, ``method``,
    ``sparsity``, ``unit_set`` (own, same, or "own = same"), ``units`` and ``overrides``; a method that
    cannot prune the same set gets ``skip`` (why) instead of overrides."""
    shared = model_overrides(args)
    same = [u for u in UNITS if u in args.units]
    configs = []
    for m in args.methods:
        own = own_units(m)
        for s in args.sparsities:
            if "own" in args.unit_sets:
                label = "own = same" if own == same and "same" in args.unit_sets else "own"
                overrides = [*shared, *method_overrides(m, s, args)]
                configs.append(
                    dict(
                        name=f"{m}-{s:g}",
                        method=m,
                        sparsity=s,
                        unit_set=label,
                        units=own,
                        overrides=overrides,
                    )
                )
            if "same" not in args.unit_sets or (own == same and "own" in args.unit_sets):
                continue
            name = f"{m}-{s:g}-{'+'.join(same)}"
            row = dict(name=name, method=m, sparsity=s, unit_set="same", units=same)
            if supports(m, same):
                row["overrides"] = [*shared, *method_overrides(m, s, args, same)]
            else:
                row["skip"] = f"{LABELS[m]} cannot prune {'+'.join(same)}"
            configs.append(row)
    reference = [*shared, "pruner=none", "teacher=none"]
    configs.append(
        dict(name=REFERENCE, method=REFERENCE, sparsity=None, unit_set="", units=[], overrides=reference)
    )
    return configs


def failure_reason(done: subprocess.CompletedProcess) -> str:
    """One line: the last line naming an error (sppx's or a traceback's), else Hydra's first line."""
    lines = [
        line.strip()
        for line in (done.stderr or done.stdout).splitlines()
        if line.strip() and "HYDRA_FULL_ERROR" not in line
    ]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {done.returncode}"])[-1 if errors else 0]


def launch(name: str, overrides: list[str], args, console: Console) -> tuple[dict | None, str | None]:
    """``(results, None)`` from <out>/runs/<name>/results.json (run first when needed), or ``(None, why)``."""
    run_dir = args.out / "runs" / name
    results_path = run_dir / "results.json"
    done_before = None if args.rerun else read_results(results_path)  # a failed run's record: run again
    if done_before is not None:
        return done_before, None
    if args.no_run:
        return None, "not run (--no-run)"
    command = [
        sys.executable,
        str(ROOT / "run.py"),
        *overrides,
        "adapter=lora",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        f"eval.max_windows={args.eval_windows}",
        "export.enabled=true",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={run_dir}",
        *args.extra,
    ]
    console.print(f"[bold]{name}[/bold]: {escape(shlex.join(command[2:]))}")
    results_path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (run_dir / "bench.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    results = read_results(results_path)
    if done.returncode == 0 and results is not None:
        console.print(f"  done in {time.perf_counter() - started:.0f} s")
        return results, None
    why = failure_reason(done)
    console.print(f"[red]{name} failed[/red] (log: {run_dir / 'bench.log'}): {escape(why)}")
    return None, why


# --------------------------------------------------------------------------- rows
def dig(tree, *keys):
    """``tree[k1][k2]...``, or None where a level is missing (failed or older runs)."""
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def widths(values) -> str | None:
    """Per-layer widths (one number, or a per-layer list) as one number when uniform, else ``min-max``."""
    if values is None or isinstance(values, int | float):
        return None if values is None else str(values)
    if not values:
        return None
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def make_row(config: dict, results: dict | None, why: str | None) -> dict:
    r = results or {}
    structure = dig(r, "prune", "structure") or {}
    params = dig(r, "params", "total")
    model_dir = r.get("model_dir")
    if model_dir and not Path(model_dir).is_absolute():
        model_dir = str(ROOT / model_dir)
    method = config["method"]
    return {
        "name": config["name"],
        "method": method,
        "sparsity": config["sparsity"],
        "unit_set": config["unit_set"],
        "units": "+".join(config["units"]),
        "status": "ok" if results else ("skipped" if config.get("skip") else "failed"),
        "error": why,
        "measured": dig(r, "sparsity", "measured"),
        "params_m": params / 1e6 if params is not None else None,
        "ppl_dense": dig(r, "ppl", "dense"),
        "ppl_pruned": dig(r, "ppl", "pruned"),
        "ppl_final": dig(r, "ppl", "final"),
        "decode_tps": None,
        "decode_speedup": None,
        "prefill_tps": None,
        "prefill_speedup": None,
        "prune_peak_mib": dig(r, "prune", "peak_rss_mib"),
        "prune_peak_increase_mib": dig(r, "prune", "peak_rss_increase_mib"),
        "prune_time_s": None if method == REFERENCE else dig(r, "time_s", "prune"),
        "tune_peak_mib": dig(r, "tune", "peak_rss_mib"),
        "layers": structure.get("layers"),
        "layers_removed": " ".join(map(str, structure.get("layers_removed") or [])),
        "heads": widths(structure.get("heads_per_layer")),
        "kv_heads": widths(structure.get("kv_heads_per_layer")),
        "neurons": widths(structure.get("neurons_per_layer")),
        "model_dir": model_dir,
    }


# --------------------------------------------------------------------------- speed
def load_dense(args):
    """The dense model through the class conf/model/<model>.yaml names, with this bench's model.* overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    words = [w for w in [*model_overrides(args), *args.extra] if w.startswith("model.")]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([w[len("model.") :] for w in words]))
    if "cache_dir" in cfg:  # ${paths.cache_dir} in the yaml: the runs' cache, else the default one
        given = [w.split("=", 1)[1] for w in args.extra if w.startswith("paths.cache_dir=")]
        cfg.cache_dir = given[-1] if given else None
    model, _ = instantiate(cfg).load()
    return model


def measure_speeds(rows: list[dict], args, console: Console) -> dict:
    """``{name: Speed}`` for "dense" and every row with an exported model, all loaded alike (weights
    copied out of the file map) and timed side by side in interleaved rounds."""
    import torch
    import transformers

    from sppx.models import load_pretrained
    from sppx.speed import compare_speeds

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    models = {"dense": load_dense(args)}
    for row in rows:
        if row["model_dir"] and Path(row["model_dir"]).is_dir():
            models[row["name"]] = load_pretrained(row["model_dir"])
    return compare_speeds(
        models,
        prefill_tokens=args.prefill_tokens,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        on_round=lambda i, n: console.print(f"speed round {i}/{n} ({len(models)} models)"),
    )


def add_speeds(rows: list[dict], speeds: dict) -> None:
    dense = speeds["dense"]
    for row in rows:
        if row["name"] in speeds:
            speed = speeds[row["name"]]
            ratios = speed.ratios(dense)
            row.update(
                prefill_tps=speed.prefill_tps,
                decode_tps=speed.decode_tps,
                prefill_speedup=ratios["prefill_x"],
                decode_speedup=ratios["decode_x"],
            )


# --------------------------------------------------------------------------- reporting
COLUMNS = [
    ("method", "method"),
    ("units", "units"),
    ("sparsity", "target"),
    ("measured", "measured"),
    ("params_m", "params (M)"),
    ("ppl_pruned", "ppl pruned"),
    ("ppl_final", "ppl recovered"),
    ("decode_tps", "decode tok/s"),
    ("decode_speedup", "x dense"),
    ("prefill_tps", "prefill tok/s"),
    ("prefill_speedup", "x dense "),
    ("prune_peak_mib", "prune peak MiB"),
    ("prune_time_s", "prune s"),
    ("structure", "layers / heads / kv / neurons"),
]
CSV_FIELDS = [
    "name",
    "method",
    "unit_set",
    "units",
    "sparsity",
    "status",
    "measured",
    "params_m",
    "ppl_dense",
    "ppl_pruned",
    "ppl_final",
    "decode_tps",
    "decode_speedup",
    "prefill_tps",
    "prefill_speedup",
    "prune_peak_mib",
    "prune_peak_increase_mib",
    "prune_time_s",
    "tune_peak_mib",
    "layers",
    "layers_removed",
    "heads",
    "kv_heads",
    "neurons",
    "model_dir",
    "error",
]


def cell(row: dict, key: str) -> str:
    if key == "units":
        return f"{row['unit_set']}: {row['units']}" if row["unit_set"] else ""
    if key == "structure":
        if row["status"] != "ok":
            return f"{row['status']}: {(row['error'] or '')[:60]}"
        parts = [row["layers"], row["heads"], row["kv_heads"], row["neurons"]]
        return " / ".join("?" if p is None else str(p) for p in parts) if row["layers"] else ""
    value = row[key]
    if value is None:
        return "-" if key == "sparsity" else "n/a"
    if key in ("ppl_pruned", "ppl_final"):
        return f"{value:.2f}" if value < 100 else f"{value:.1f}"
    if key in ("decode_speedup", "prefill_speedup"):
        return f"{value:.2f}x"
    if key in ("decode_tps", "prefill_tps", "prune_peak_mib"):
        return f"{value:.0f}"
    if key in ("measured", "params_m"):
        return f"{value:.3f}"
    if key == "sparsity":
        return f"{value:g}"
    if key == "method":
        return LABELS.get(value, value)
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def headlines(rows: list[dict]) -> list[str]:
    """A few comparisons at sparsity 0.2 (else the lowest sparsity run)."""
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] is not None})
    if not sparsities:
        return []
    at = 0.2 if 0.2 in sparsities else sparsities[0]
    index = {(r["method"], r["sparsity"]): r for r in rows if r["status"] == "ok" and r["unit_set"] != "same"}
    comp, ref = index.get(("comp", at)), index.get((REFERENCE, None))
    lines = same_units_lines(rows, sparsities)
    if comp:
        for other in ("llm_pruner", "shortgpt"):
            if (o := index.get((other, at))) and comp["ppl_pruned"] and o["ppl_pruned"]:
                lines.append(
                    f"at {at:g}: COMP ppl after pruning {comp['ppl_pruned']:.2f} vs {LABELS[other]} "
                    f"{o['ppl_pruned']:.2f} ({comp['ppl_pruned'] / o['ppl_pruned']:.2f}x); recovered "
                    f"{cell(comp, 'ppl_final')} vs {cell(o, 'ppl_final')}"
                )
        if comp["decode_speedup"] is not None:
            lines.append(
                f"at {at:g}: COMP decodes {comp['decode_speedup']:.2f}x and prefills "
                f"{comp['prefill_speedup']:.2f}x as fast as dense ({comp['params_m']:.2f}M parameters)"
            )
        llmp = index.get(("llm_pruner", at))
        mem = ratio(comp["prune_peak_increase_mib"], llmp and llmp["prune_peak_increase_mib"])
        if mem is not None:
            lines.append(
                f"at {at:g}: COMP prune peak RSS increase {comp['prune_peak_increase_mib']:.0f} MiB = "
                f"{mem:.2f}x LLM-Pruner's ({llmp['prune_peak_increase_mib']:.0f} MiB)"
            )
    if ref and ref["decode_speedup"] is not None:  # same shapes as dense: what timing noise looks like
        lines.append(
            f"timing control: the LoRA reference (dense shapes) decodes {ref['decode_speedup']:.2f}x and "
            f"prefills {ref['prefill_speedup']:.2f}x as fast as dense"
        )
    for s in sparsities:
        nute = index.get(("nuteprune", s))
        mem = ratio(nute and nute["prune_peak_mib"], ref and ref["tune_peak_mib"])
        if mem is not None:
            lines.append(
                f"at {s:g}: NutePrune mask-learning peak RSS {nute['prune_peak_mib']:.0f} MiB = {mem:.2f}x "
                f"the LoRA reference's tuning peak ({ref['tune_peak_mib']:.0f} MiB)"
            )
    return lines


def same_units_lines(rows: list[dict], sparsities: list[float]) -> list[str]:
    """Per sparsity, the methods ranked by perplexity after pruning on the same units."""
    lines = []
    for s in sparsities:
        same = [r for r in rows if r["status"] == "ok" and r["sparsity"] == s and "same" in r["unit_set"]]
        same = sorted((r for r in same if r["ppl_pruned"] is not None), key=lambda r: r["ppl_pruned"])
        if len(same) > 1:
            ranked = ", ".join(f"{LABELS[r['method']]} {cell(r, 'ppl_pruned')}" for r in same)
            lines.append(f"at {s:g}, the same units ({same[0]['units']}): ppl after pruning {ranked}")
    return lines


def plot(rows: list[dict], dense: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = [("ppl_pruned", "after pruning (no recovery)"), ("ppl_final", "after LoRA recovery")]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ref = next((r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"), None)

    def usable(x, y) -> bool:
        return x is not None and y is not None and math.isfinite(y) and y > 0

    for ax, (key, heading) in zip(axes, panels, strict=True):
        for i, method in enumerate(methods):
            for unit_set, style in (("own", "-"), ("same", "--")):
                points = sorted(
                    (r["params_m"], r[key], r["sparsity"])
                    for r in rows
                    if r["method"] == method
                    and (r["unit_set"] == unit_set or (unit_set == "own" and r["unit_set"] == "own = same"))
                    and usable(r["params_m"], r[key])
                )
                if not points:
                    continue
                xs, ys, _ = zip(*points, strict=True)
                label = f"{LABELS[method]} ({unit_set} units: {next(r['units'] for r in rows if r['method'] == method and unit_set in r['unit_set'])})"
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=label)
                for x, y, s in points:
                    ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if usable(dense["params_m"], dense["ppl"]):
            ax.scatter(
                [dense["params_m"]], [dense["ppl"]], marker="*", s=220, color="black", zorder=5, label="dense"
            )
        if key == "ppl_final" and ref and usable(ref["params_m"], ref["ppl_final"]):
            ax.scatter(
                [ref["params_m"]],
                [ref["ppl_final"]],
                marker="*",
                s=220,
                facecolors="none",
                edgecolors="black",
                zorder=5,
                label="dense + LoRA",
            )
        ax.set_yscale("log")
        ax.set_title(heading)
        ax.set_xlabel("parameters (M)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("perplexity (log)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option (tiny-llama: smoke)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument(
        "--unit-sets",
        nargs="+",
        default=UNIT_SETS,
        choices=UNIT_SETS,
        help="own: each method's units; same: --units",
    )
    parser.add_argument(
        "--units",
        nargs="+",
        default=["neurons"],
        choices=UNITS,
        help="the unit set every method prunes in 'same'",
    )
    parser.add_argument(
        "--layer-range", default=None, help="pruner.layer_range for every method that has one"
    )
    parser.add_argument("--steps", type=int, default=8, help="LoRA recovery steps per configuration")
    parser.add_argument(
        "--nuteprune-steps",
        type=int,
        default=None,
        help="mask-learning steps (default: the pruner config's; tiny: 12)",
    )
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the speed part")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_structured")
    parser.add_argument("--rerun", action="store_true", help="run again where results.json exists")
    parser.add_argument("--no-run", action="store_true", help="run nothing: read the results there are")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    parser.add_argument("extra", nargs="*", help="more run.py overrides for every configuration")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def run_all(args, console: Console) -> list[dict]:
    """One row per configuration: run (or read, or skip) each."""
    rows = []
    for config in configurations(args):
        if config.get("skip"):
            console.print(f"[bold]{config['name']}[/bold]: skipped ({config['skip']})")
            rows.append(make_row(config, None, config["skip"]))
            continue
        results, why = launch(config["name"], config["overrides"], args, console)
        rows.append(make_row(config, results, why))
    return rows


def write_reports(rows: list[dict], dense: dict, args, console: Console, command: str) -> None:
    """The table on the console, structured.csv, structured.md and structured.png under --out."""
    headers = [h for _, h in COLUMNS]
    cells = [[cell(r, k) for k, _ in COLUMNS] for r in rows]
    table = Table(*headers, title=f"Structured pruning on {args.model}: LoRA recovery {args.steps} steps")
    for column in table.columns:
        column.justify = "right"
    for line in cells:
        table.add_row(*line)
    console.print(table)
    news = headlines(rows)
    for line in news:
        console.print(f"[bold]*[/bold] {escape(line)}")

    with open(args.out / "structured.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def num(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"Dense {args.model}: ppl {num(dense['ppl'], '.2f')}, {num(dense['params_m'], '.3f')}M parameters, "
        f"decode {num(dense['decode'], '.1f')} tok/s, prefill {num(dense['prefill'], '.1f')} tok/s "
        f"({args.threads} threads). LoRA recovery {args.steps} steps, {args.eval_windows} evaluation windows.",
        "",
        f"Units: `own` = each method's own (published) units, `same` = {'+'.join(args.units)} for every method "
        f"that can prune them; layer range: {args.layer_range or 'each method its own'}.",
        "",
        f"Command: `{command}`",
        "",
        *(f"| {' | '.join(line)} |" for line in [headers, ["---"] * len(headers), *cells]),
    ]
    if news:
        lines += ["", *(f"- {line}" for line in news)]
    (args.out / "structured.md").write_text("\n".join(lines) + "\n")
    plot(
        rows, dense, args.out / "structured.png", f"{args.model}: structured pruning, {args.steps} LoRA steps"
    )
    console.print(f"wrote {args.out / 'structured.csv'}, structured.md, structured.png")


def main() -> None:
    args = parse_args()
    console = Console()
    if not console.is_terminal:  # a log file: room for every column
        console = Console(width=220)
    command = shlex.join(["python", "scripts/bench_structured.py", *sys.argv[1:]])
    rows = run_all(args, console)
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        sys.exit("no configuration completed")

    ref = next((r for r in done if r["method"] == REFERENCE), None)
    dense = {
        "ppl": next((r["ppl_dense"] for r in done if r["ppl_dense"] is not None), None),
        "params_m": ref["params_m"] if ref else None,  # no pruning: the merged model has the dense shapes
        "prefill": None,
        "decode": None,
    }
    if not args.no_speed:
        speeds = measure_speeds(rows, args, console)
        add_speeds(rows, speeds)
        dense["prefill"], dense["decode"] = speeds["dense"].prefill_tps, speeds["dense"].decode_tps
        samples = {n: {"prefill": s.prefill_samples, "decode": s.decode_samples} for n, s in speeds.items()}
        (args.out / "speed_samples.json").write_text(json.dumps(samples, indent=1))
    write_reports(rows, dense, args, console, command)


if __name__ == "__main__":
    main()
