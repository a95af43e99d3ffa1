"""Results of many runs (a sweep, a folder of runs) as one table and a few plots.

``collect(root)`` reads every ``results.json`` below ``root`` (complete and failed runs alike) and
returns one row per run; ``write_report(rows, results, out_dir)`` writes ``summary.md``, ``summary.csv``
and the plots:

- ``ppl_vs_sparsity.png``: final perplexity against measured sparsity, one line per pruner and pattern
  kind (dashed: right after pruning);
- ``recovery.png``: perplexity after pruning and after recovery, per run, grouped by adapter and teacher;
- ``layer_sparsity.png``: the measured sparsity of every decoder layer of every run (a heat map).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from sppx.results import RESULTS_FILE, read_results

COLUMNS = [
    ("run", "run"),
    ("status", "status"),
    ("model", "model"),
    ("pruner", "pruner"),
    ("pattern", "pattern"),
    ("adapter", "adapter"),
    ("teacher", "teacher"),
    ("target", "target"),
    ("sparsity", "sparsity"),
    ("ppl_dense", "ppl dense"),
    ("ppl_pruned", "ppl pruned"),
    ("ppl_final", "ppl final"),
    ("ppl_validation", "val ppl"),
    ("acc_mean", "acc mean"),
    ("params", "params"),
    ("trainable", "trainable"),
    ("step_s", "s/step"),
    ("total_s", "total s"),
    ("error", "error"),
]


def _get(tree, *keys):
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def find_results(root: Path) -> list[tuple[Path, dict]]:
    """``(run dir, results)`` of every results.json below ``root``, in path order (failed runs too)."""
    found = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        results = read_results(path, complete_only=False)
        if results is not None:
            found.append((path.parent, results))
    return found


def row_of(run_dir: Path, results: dict, root: Path) -> dict:
    choices = results.get("choices") or {}
    zs = results.get("zeroshot") or {}
    return {
        "run": str(run_dir.relative_to(root)) if run_dir != root else ".",
        "status": results.get("status", "complete"),
        **{group: choices.get(group) for group in ("model", "pruner", "pattern", "adapter", "teacher")},
        "target": _get(results, "sparsity", "target"),
        "sparsity": _get(results, "sparsity", "measured"),
        "ppl_dense": _get(results, "ppl", "dense"),
        "ppl_pruned": _get(results, "ppl", "pruned"),
        "ppl_final": _get(results, "ppl", "final"),
        "ppl_validation": _get(results, "ppl", "validation"),
        "acc_mean": _get(zs, "mean_acc", "final"),
        "params": _get(results, "params", "total"),
        "trainable": _get(results, "params", "trainable"),
        "step_s": _get(results, "tune", "step_time_s"),
        "total_s": _get(results, "time_s", "total"),
        "error": results.get("error"),
    }


def setting_of(results: dict, key: str):
    """A run's value of a setting named as on the command line: a config group's choice (``pruner``)
    or a dotted config key (``tune.lr``)."""
    if "." not in key and key in (results.get("choices") or {}):
        return results["choices"][key]
    value = results.get("config") or {}
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value if not isinstance(value, (dict, list)) else str(value)


def collect(root: Path, params: list[str] = ()) -> tuple[list[dict], list[dict]]:
    """(rows, the results they came from) for every run below ``root``; ``params``: settings (swept or
    searched) that get a column each."""
    root = Path(root)
    found = find_results(root)
    rows = []
    for run_dir, results in found:
        row = row_of(run_dir, results, root)
        row.update({key: setting_of(results, key) for key in params if key not in row})
        rows.append(row)
    return rows, [r for _, r in found]


def columns(params: list[str] = ()) -> list[tuple[str, str]]:
    """The table's columns: the run, its swept or searched settings, then the fixed ones."""
    fixed = {k for k, _ in COLUMNS}
    return [COLUMNS[0], *((k, k) for k in params if k not in fixed), *COLUMNS[1:]]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], params: list[str] = ()) -> str:
    """The rows as a Markdown table (columns that are empty in every row are left out)."""
    keys = [(k, h) for k, h in columns(params) if any(r.get(k) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(h for _, h in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k, _ in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, params: list[str] = ()) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[k for k, _ in columns(params)], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(label: str, width: int = 48) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def _usable(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


def _pattern_kind(pattern) -> str:
    return "structured" if pattern == "structured" else "unstructured" if pattern == "unstructured" else "N:M"


def plot_ppl_vs_sparsity(rows: list[dict], path: Path) -> bool:
    """Final (solid) and pruned (dashed) perplexity against measured sparsity, a line per pruner and
    pattern kind. False (nothing written) when no complete run has the numbers."""
    lines: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "complete" and r["sparsity"] is not None and _usable(r["ppl_final"]):
            lines.setdefault(f"{r['pruner']} ({_pattern_kind(r['pattern'])})", []).append(r)
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in points]
        ax.plot(xs, [r["ppl_final"] for r in points], marker="o", color=f"C{i}", label=f"{label} final")
        pruned = [(r["sparsity"], r["ppl_pruned"]) for r in points if _usable(r["ppl_pruned"])]
        if pruned:
            ax.plot(*zip(*pruned, strict=True), marker="x", ls="--", color=f"C{i}", alpha=0.6)
    dense = [r["ppl_dense"] for r in rows if _usable(r["ppl_dense"])]
    if dense:
        ax.axhline(min(dense), color="black", lw=0.8, ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("measured sparsity")
    ax.set_ylabel("perplexity (log; dashed: after pruning)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_recovery(rows: list[dict], path: Path) -> bool:
    """Bars of perplexity after pruning and after recovery for every complete run, grouped (and
    coloured) by adapter / teacher."""
    runs = [r for r in rows if r["status"] == "complete" and _usable(r["ppl_pruned"], r["ppl_final"])]
    if not runs:
        return False
    runs.sort(key=lambda r: (str(r["adapter"]), str(r["teacher"]), r["run"]))

    def group_of(r: dict) -> str:
        return f"{r['adapter']} / {r['teacher']}"

    groups = sorted({group_of(r) for r in runs})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(runs) + 2), 4.5))
    xs = range(len(runs))
    ax.bar(
        [x - 0.2 for x in xs], [r["ppl_pruned"] for r in runs], width=0.4, color="lightgray", label="pruned"
    )
    for x, r in zip(xs, runs, strict=True):
        colour = f"C{groups.index(group_of(r))}"
        ax.bar(x + 0.2, r["ppl_final"], width=0.4, color=colour)
    for i, g in enumerate(groups):
        ax.bar([], [], color=f"C{i}", label=f"recovered: {g}")
    ax.set_xticks(list(xs), [_short(r["run"]) for r in runs], rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_layer_sparsity(rows: list[dict], results: list[dict], path: Path) -> bool:
    """A heat map of the measured per-layer sparsity, one row per complete run."""
    data = [
        (row["run"], r["sparsity"]["per_layer"])
        for row, r in zip(rows, results, strict=True)
        if row["status"] == "complete" and _get(r, "sparsity", "per_layer")
    ]
    if not data:
        return False
    width = max(len(v) for _, v in data)
    grid = [v + [float("nan")] * (width - len(v)) for _, v in data]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * width + 3), max(2.5, 0.3 * len(data) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(data)), [_short(name) for name, _ in data], fontsize=6)
    ax.set_xlabel("decoder layer")
    fig.colorbar(image, ax=ax, label="measured sparsity")
    _save(fig, path)
    return True


def write_report(rows: list[dict], results: list[dict], out_dir: Path, params: list[str] = ()) -> list[Path]:
    """summary.md, summary.csv and the plots into ``out_dir``; returns the files written. ``params``:
    the swept or searched settings, a column each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = sum(r["status"] == "complete" for r in rows)
    header = f"{len(rows)} runs: {done} complete, {len(rows) - done} failed or interrupted.\n\n"
    (out_dir / "summary.md").write_text(header + markdown_table(rows, params) + "\n")
    write_csv(rows, out_dir / "summary.csv", params)
    written = [out_dir / "summary.md", out_dir / "summary.csv"]
    for name, made in (
        ("ppl_vs_sparsity.png", lambda p: plot_ppl_vs_sparsity(rows, p)),
        ("recovery.png", lambda p: plot_recovery(rows, p)),
        ("layer_sparsity.png", lambda p: plot_layer_sparsity(rows, results, p)),
    ):
        if made(out_dir / name):
            written.append(out_dir / name)
    return written
