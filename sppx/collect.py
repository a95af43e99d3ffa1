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
import logging
import math
from pathlib import Path

from sppx.results import RESULTS_FILE, read_results

log = logging.getLogger(__name__)

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
        # Not columns: what makes runs comparable in a figure.
        "data": choices.get("data"),
        "windows": _get(results, "ppl", "windows"),
        "seqlen": _get(results, "ppl", "seqlen"),
        "steps": _get(results, "tune", "steps") or 0,
        "kind": _pattern_kind(choices.get("pattern")),
        "lr": _get(results, "config", "tune", "lr") if _get(results, "tune", "steps") else None,
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
        row["finished"] = (run_dir / RESULTS_FILE).stat().st_mtime
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


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def _usable(*values) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


def _pattern_kind(pattern) -> str:
    return "structured" if pattern == "structured" else "unstructured" if pattern == "unstructured" else "N:M"


def wide_range(values: list[float]) -> bool:
    """A log axis only when the values span more than ~1.5 decades."""
    values = [v for v in values if _usable(v)]
    return bool(values) and max(values) / min(values) > 10**1.5


def run_label(row: dict, params: list[str] = ()) -> str:
    """What tells a run apart in a figure: its swept values (the job folder's name in a sweep)."""
    if params:
        shown = [f"{k}={_cell(row.get(k))}" for k in params if row.get(k) not in (None, "")]
        if shown:
            return ", ".join(shown)
    return Path(row["run"]).name


# The settings that make two runs comparable: a line or a bar group never mixes values of these.
PROTOCOL = ("model", "data", "windows", "seqlen")
SETUP = ("pruner", "kind", "adapter", "teacher", "steps", "lr")


def _part(name: str, value) -> str:
    return f"{value} steps" if name == "steps" else f"lr {value:g}" if name == "lr" and value else str(value)


def _protocol_title(rows: list[dict], what: str) -> str:
    """``what`` with the model, data and perplexity protocol, when all rows share them."""
    shared = {k: {r.get(k) for r in rows} for k in (*PROTOCOL, "steps")}
    parts = [what]
    if len(shared["model"]) == 1 and len(shared["data"]) == 1:
        parts.append(f"{next(iter(shared['model']))} on {next(iter(shared['data']))}")
    if len(shared["windows"]) == 1 and len(shared["seqlen"]) == 1:
        parts.append(f"ppl on {next(iter(shared['windows']))} x {next(iter(shared['seqlen']))} tokens")
    if len(shared["steps"]) == 1 and next(iter(shared["steps"])):
        parts.append(f"{next(iter(shared['steps']))} tuning steps")
    return " | ".join(parts)


def _varying(groups: list[tuple], names: tuple[str, ...]) -> list[int]:
    """Indices of the key parts that differ between groups (what a legend label must say)."""
    return [i for i in range(len(names)) if len({g[i] for g in groups}) > 1] or [0]


def _draw_references(ax, runs: list[dict], rows: list[dict]) -> list[float]:
    """Perplexity right after pruning (once per pruner and pattern kind) and the dense model of each
    protocol; returns the values drawn."""
    values: list[float] = []
    pruned: dict[tuple, dict[float, float]] = {}
    for r in runs:
        tuned = r.get("adapter") != "none"  # without tuning the final line is the pruned one already
        if tuned and _usable(r["ppl_pruned"]) and r.get("pruner") != "none" and r.get("kind") != "structured":
            key = (*(r.get(k) for k in PROTOCOL), r.get("pruner"), r.get("kind"))
            pruned.setdefault(key, {})[round(r.get("target") or r["sparsity"], 6)] = r["ppl_pruned"]
    for j, (key, points) in enumerate(sorted(pruned.items(), key=lambda kv: str(kv[0]))):
        xs = sorted(points)
        ax.plot(
            xs,
            [points[x] for x in xs],
            marker="x",
            ls=["--", ":", "-."][j % 3],
            color=str(0.2 + 0.2 * (j % 3)),
            alpha=0.8,
            label=f"{key[-2]} ({key[-1]}): after pruning",
        )
        values += list(points.values())
    dense: dict[tuple, float] = {}
    for r in rows:
        if r["status"] == "complete" and _usable(r["ppl_dense"]):
            dense.setdefault(tuple(r.get(k) for k in PROTOCOL), r["ppl_dense"])
    for j, (key, value) in enumerate(sorted(dense.items(), key=lambda kv: str(kv[0]))):
        where = f" ({key[0]}, {key[2]} x {key[3]})" if len(dense) > 1 else ""
        ax.axhline(value, color="black", lw=0.9, ls=[":", "-."][j % 2], label=f"dense{where}: {value:.2f}")
        values.append(value)
    return values


def plot_ppl_vs_sparsity(rows: list[dict], path: Path) -> bool:
    """Final perplexity (circles, solid lines) against measured sparsity; a line joins only runs that
    share everything but the sparsity (model, data, protocol, pruner, pattern kind, adapter, teacher,
    budget, lr), and runs that share a sparsity but differ otherwise are markers only. Perplexity right
    after pruning (crosses, dashed) once per pruner and pattern kind; the dense model of each protocol is
    a labelled reference line. The legend sits beside the axes. False when no complete run has numbers."""
    runs = [
        r
        for r in rows
        if r["status"] == "complete"
        and r["sparsity"] is not None
        and _usable(r["ppl_final"])
        and not (r.get("pruner") == "none" and r.get("adapter") == "none")  # the dense model: a line below
    ]
    if not runs:
        return False
    names = (*PROTOCOL, *SETUP)
    lines: dict[tuple, list[dict]] = {}
    for r in runs:
        lines.setdefault(tuple(r.get(k) for k in names), []).append(r)
    shown = _varying(list(lines), names)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    values = []
    for i, (key, points) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
        points.sort(key=lambda r: r["sparsity"])
        label = ", ".join(_part(names[j], key[j]) for j in shown if key[j] is not None) or "runs"
        xs, finals = [r["sparsity"] for r in points], [r["ppl_final"] for r in points]
        joined = len(set(xs)) == len(xs)
        ax.plot(xs, finals, marker="o", ls="-" if joined else "none", color=f"C{i % 10}", label=label)
        values += finals
    values += _draw_references(ax, runs, rows)
    if wide_range(values):
        ax.set_yscale("log")
    ax.set_xlabel("measured sparsity (after the merge)")
    ax.set_ylabel("perplexity" + (" (log scale)" if wide_range(values) else ""))
    ax.set_title(_protocol_title(runs, "Perplexity vs sparsity"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    _save(fig, path)
    return True


def plot_recovery(rows: list[dict], path: Path, params: list[str] = ()) -> bool:
    """Per complete run, perplexity after pruning and after recovery as horizontal bars from zero on a
    linear axis, labelled by the run's swept values, with the dense model as a labelled line. When the
    values span more than ~1.5 decades the share of the (pruned - dense) gap that recovery closed is
    drawn instead (bars from zero, in %), since bars on a log axis misstate sizes."""
    runs = [
        r
        for r in rows
        if r["status"] == "complete"
        and r.get("adapter") != "none"
        and _usable(r["ppl_pruned"], r["ppl_final"])
    ]
    if not runs:
        return False
    runs.sort(key=lambda r: (str(r.get("adapter")), str(r.get("teacher")), r["run"]))
    labels = [run_label(r, params) for r in runs]
    dense = [r["ppl_dense"] for r in runs if _usable(r["ppl_dense"])]
    one_dense = len({round(d, 6) for d in dense}) == 1
    gap_view = wide_range([*(r["ppl_pruned"] for r in runs), *(r["ppl_final"] for r in runs)]) and all(
        _usable(r["ppl_dense"]) and r["ppl_pruned"] > r["ppl_dense"] for r in runs
    )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.45 * len(runs) + 1.5)))
    ys = list(range(len(runs)))
    if gap_view:
        shares = [100 * (r["ppl_pruned"] - r["ppl_final"]) / (r["ppl_pruned"] - r["ppl_dense"]) for r in runs]
        ax.barh(ys, shares, color=[f"C{i % 10}" for i in ys], height=0.6)
        for y, v in zip(ys, shares, strict=True):
            ax.text(v, y, f" {v:.0f}%", va="center", fontsize=8)
        ax.axvline(100, color="black", lw=0.9, ls=":", label="dense model (100%)")
        ax.set_xlabel("share of the (pruned - dense) perplexity gap closed by recovery (%)")
    else:
        ax.barh(
            [y + 0.2 for y in ys],
            [r["ppl_pruned"] for r in runs],
            height=0.4,
            color="lightgray",
            label="after pruning",
        )
        ax.barh(
            [y - 0.2 for y in ys],
            [r["ppl_final"] for r in runs],
            height=0.4,
            color="C0",
            label="after recovery",
        )
        if dense and one_dense:
            ax.axvline(dense[0], color="black", lw=0.9, ls=":", label=f"dense: {dense[0]:.2f}")
        ax.set_xlabel("perplexity")
        ax.set_xlim(left=0)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(_protocol_title(runs, "Recovery"), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)
    return True


def plot_layer_sparsity(rows: list[dict], results: list[dict], path: Path, params: list[str] = ()) -> bool:
    """A heat map of the measured per-layer sparsity, one row per complete run, integer layer ticks."""
    data = [
        (run_label(row, params), r["sparsity"]["per_layer"])
        for row, r in zip(rows, results, strict=True)
        if row["status"] == "complete" and _get(r, "sparsity", "per_layer")
    ]
    if not data:
        return False
    width = max(len(v) for _, v in data)
    grid = [v + [float("nan")] * (width - len(v)) for _, v in data]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * width + 3), max(2.5, 0.35 * len(data) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(data)), [name for name, _ in data], fontsize=8)
    step = max(1, width // 16)
    ax.set_xticks(range(0, width, step), [str(i) for i in range(0, width, step)], fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_title("Measured sparsity per decoder layer", fontsize=10)
    fig.colorbar(image, ax=ax, label="measured sparsity")
    _save(fig, path)
    return True


def plot_search_history(rows: list[dict], path: Path) -> bool:
    """A search's objective (validation perplexity) per trial in the order they finished, with the best
    so far."""
    trials = sorted(
        (r for r in rows if _usable(r.get("ppl_validation"))), key=lambda r: r.get("finished") or 0
    )
    if len(trials) < 2:
        return False
    values = [r["ppl_validation"] for r in trials]
    best = [min(values[: i + 1]) for i in range(len(values))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(values) + 1))
    ax.plot(xs, values, "o", color="C0", label="trial")
    ax.step(xs, best, where="post", color="C1", label="best so far")
    if wide_range(values):
        ax.set_yscale("log")
    ax.set_xticks(xs if len(xs) <= 20 else xs[:: max(1, len(xs) // 10)])
    ax.set_xlabel("trial (in the order they finished)")
    ax.set_ylabel("validation perplexity (the objective)")
    ax.set_title(_protocol_title(trials, "Search history"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def param_importances(rows: list[dict], space: dict[str, str]) -> dict[str, float]:
    """How much each searched parameter explains the objective (validation perplexity) over the
    trials: optuna's mean-decrease-in-impurity evaluator on a study rebuilt from the finished trials and
    the search space (``hydra.sweeper.params``). Empty when there are too few trials."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    parser = OverridesParser.create()
    dists = {
        k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
        for k, v in space.items()
    }
    study = optuna.create_study(direction="minimize")
    for r in rows:
        params = {k: r.get(k) for k in dists}
        if _usable(r.get("ppl_validation")) and all(v is not None for v in params.values()):
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=dists, value=r["ppl_validation"])
            )
    if len(study.trials) < 3:
        return {}
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def plot_param_importances(rows: list[dict], space: dict[str, str], path: Path) -> bool:
    """A bar per searched parameter: its share of the objective's variation (sums to 1)."""
    try:
        importances = param_importances(rows, space)
    except Exception as err:  # optuna and its plugin are optional extras of a search
        log.warning("parameter importances not computed: %s", str(err).splitlines()[0] if str(err) else err)
        return False
    if not importances:
        return False
    plt = _pyplot()
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, [importances[n] for n in names], color="C0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("importance for the validation perplexity (mean decrease in impurity, sums to 1)")
    ax.set_title(f"Search: parameter importances over {len(rows)} trials", fontsize=10)
    _save(fig, path)
    return True


def write_report(
    rows: list[dict], results: list[dict], out_dir: Path, params: list[str] = (), search: dict | None = None
) -> list[Path]:
    """summary.md, summary.csv and the plots into ``out_dir``; returns the files written. ``params``:
    the swept or searched settings, a column each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = sum(r["status"] == "complete" for r in rows)
    header = f"{len(rows)} runs: {done} complete, {len(rows) - done} failed or interrupted.\n\n"
    (out_dir / "summary.md").write_text(header + markdown_table(rows, params) + "\n")
    write_csv(rows, out_dir / "summary.csv", params)
    written = [out_dir / "summary.md", out_dir / "summary.csv"]
    plots = [
        ("ppl_vs_sparsity.png", lambda p: plot_ppl_vs_sparsity(rows, p)),
        ("recovery.png", lambda p: plot_recovery(rows, p, params)),
        ("layer_sparsity.png", lambda p: plot_layer_sparsity(rows, results, p, params)),
    ]
    if search:  # the search space (hydra.sweeper.params) of an Optuna search
        plots.append(("search_history.png", lambda p: plot_search_history(rows, p)))
        plots.append(("param_importances.png", lambda p: plot_param_importances(rows, search, p)))
    for name, made in plots:
        if made(out_dir / name):
            written.append(out_dir / name)
    return written
