"""sppx against llm-compressor (the maintained peer tool), side by side on identical calibration windows.

The calibration windows are sampled once (sppx's calibration part, seeded as the project's runs do) and
written as token ids to ``<out>/work/calib.safetensors``. Every (tool, method, pattern) row is pruned in
its own fresh process by the same harness (scripts/peer_worker.py): the sppx worker is this script with
``--worker`` in sppx's virtualenv, the peer worker is peer_worker.py in ``--peer-python``'s (the peer's
pins differ from ours). Each loads the very same fp32 weights (sppx's embedded SmolLM2-135M folder),
sets ``--threads``, times the prune call alone (sppx: OWL's allocation, when asked, plus ``prune_model``;
the peer: ``oneshot``), samples the resident set size during it, and saves the pruned Linear weights
(deleted once their row is measured, unless ``--keep-weights``).
This process then puts each row's weights into the dense model and measures perplexity with sppx's
protocol (the same evaluation windows for every row), the sparsity, and the pattern: N:M groups along
the input dimension; for unstructured rows, whether every output row and every matrix holds exactly
the requested count (within one weight per row; floor(numel x target) per matrix), and the share of
weights on which the two masks agree.

Settings matched (peer code: llmcompressor 0.14.0.1):
- Calibration: the same ``--nsamples`` x ``--seqlen`` windows in the same order, ``--batch-size``
  windows per forward in both. The peer gets a DataLoader, which oneshot uses as it is
  (datasets/utils.py get_calibration_dataloader): no num_calibration_samples draw (default 512), no
  shuffle (shuffle_calibration_samples defaults to True), no truncating collator. Neither tool gets an
  attention mask. A hook on the embedding checks it (CSV ``calibration_*``, printed under the table):
  ``same xK`` = K passes over exactly our windows in order (sppx 1, 2 with OWL; the peer 2: its
  calibration and propagation passes through the first subgraph).
- Targets: q, k, v, o, gate, up, down of every block. The peer targets the decoder layer class; its
  modifier prunes every Linear inside (sgpt_base.py SparsityModifierBase.on_calibration_start), and the
  worker checks those are exactly the seven projections; lm_head and the (tied) embeddings are in no
  block (the worker counts new zeros outside the pruned Linears: 0).
- Sequential propagation: both prune block by block, measuring every Linear of a block on its dense
  weights at once (sppx true_sequential=false), and feed the next block the pruned block's outputs
  (pipelines/sequential/pipeline.py: propagate_error defaults to True; sppx sequential.run_blocks).
- Attention: the peer forces eager attention while calibrating (utils/helpers.py use_eager_attention);
  sppx calibrates with the model's default (sdpa), as ``run.py`` loads it: the same maths, a fused
  kernel that never holds the (batch, heads, seq, seq) scores. ``--sppx-attention eager`` gives both
  the same kernels (then the masks differ by the two transformers versions' rounding only). The
  evaluation here uses the model's default attention for every row alike.
- Matrix products: the peer's Linears run ``F.linear`` (MKL in torch's x86 wheels); sppx's calibration
  forwards take the kernel of its ``cpu_linear`` setting, by default (auto) oneDNN where MKL runs on a
  CPU that is not Intel's (about twice as fast there; the same fp32 arithmetic summed in another
  order). ``--sppx-linear torch`` gives both the peer's kernel; the table's header says which ran.
- Wanda: |W| x ||X_j||, compared within each output row; N:M along the input dimension in both.
- SparseGPT: damping 0.01 x mean(diag H) after dead inputs get H_jj = 1 (sppx percdamp, the peer's
  dampening_frac; sgpt_sparsify.py sparsify_weight), 128 columns per block (blocksize / block_size),
  dead inputs' weights zeroed, the same OBS column sweep and lazy block updates, in fp32.
- OWL: M = 5, lambda = 0.08 (sppx owl_m / owl_lambda, the peer's owl_m / owl_lmbda), target 70%.
- Precision: fp32 throughout by default. ``--precision bf16`` gives both bf16 matrix products, each
  tool its own way: sppx keeps the fp32 weights and runs the calibration forwards under bf16 autocast
  (``pruner.compute_dtype=bfloat16``: hidden states between blocks, statistics, weight updates and the
  saved weights stay fp32); the peer loads the model in bf16 (its documented route), so everything it
  computes and the weights it saves are bf16 (the evaluation reads them into the fp32 model).
- Pipeline and options are explicit: pipeline="sequential" (oneshot's default is "independent"),
  sequential_targets = the decoder layer class, dampening_frac=0.01 (the modifier's default; its
  docstring example says 0.001), block_size=128, ignore=[].

Differences that remain (each is the peer's code as shipped; none can be set from outside):
- OWL does not run in the peer: ``sparsity_profile="owl"`` fails in on_initialize with "Cannot invoke
  event before initializing" (sgpt_base.py _get_activations calls pipelines/basic run_calibration,
  which fires a lifecycle event while the session is still initializing). Its OWL rows are reported
  as failed. Had it run: its input norm is the sum over batches of each batch's L2 norm (scaled by
  1/128 whatever the sample count), not the L2 norm over all tokens, so with several batches its
  outlier ratios differ; it spans the dense model's blocks in one full forward (as sppx does); its
  mean over blocks is unweighted (sppx: weighted by prunable weights; equal here).
- SparseGPT unstructured mask: per block of 128 columns the peer prunes every score <= the value at
  index int(numel x p) of the sorted scores, i.e. int(numel x p) + 1 weights (more on ties)
  (sgpt_sparsify.py sparsify_weight); sppx prunes exactly floor(p x rows x 128) per block.
- Wanda unstructured count: the peer prunes int(cols x p) per row (wanda_sparsify.py sparsify_weight),
  e.g. 403 of 576 at 70% (matrix sparsity 0.6997); sppx prunes floor(rows x cols x p) per matrix, the
  remainder one more weight in evenly spaced rows (masks.per_row_mask): exactly 0.7.
- Tie breaking in N:M groups: the peer takes torch.topk(largest=False), whose order among equal scores
  is unspecified (wanda_sparsify.py, sgpt_sparsify.py); sppx prunes the lower index first (stable).
  Unstructured Wanda ties: both stable (lower index first).
- Statistics normalisation: the peer averages over windows (H = 2/n_windows sum x x^T; Wanda's
  sum of x^2 / n_windows, through torch.norm(...)**2), sppx over tokens (2/n_tokens; Wanda's plain
  sum of squares): a constant factor that damping and per-row ranking cancel, so only rounding
  differs. All accumulate in fp32; the peer's two and sppx's Hessian rescale the running sum per
  batch, sppx's Wanda norms are a plain sum.
- H^-1: the peer does cholesky, cholesky_inverse, cholesky(upper) (sgpt_sparsify.py); sppx one
  Cholesky of the reversed H and a triangular solve (sparsegpt.inverse_cholesky_upper): the same
  factor, other rounding. On a failed Cholesky the peer falls back to the identity (a warning), sppx
  retries with tenfold damping.
- Sharing: sppx builds one Hessian / norm vector per distinct input (q, k, v share; gate, up share)
  and sweeps SparseGPT's Linears that share one together (stacked rows, each its own counts), the
  peer one Hessian and one sweep per Linear (the same values, computed three and two times).
- Model code: the sppx env runs transformers 5.24, the peer's 5.17, and the peer runs the model as
  torch.fx-traced subgraphs. Rounding differences in the propagated activations flip near-tied
  scores: in the smoke runs the Wanda masks of blocks 0 and 1 agree exactly, later blocks less and
  less (the ``mask agree`` column is over all blocks).
- Memory: sppx's prune_model returns the keep-mask of every pruned Linear (one bit per weight,
  13 MiB for SmolLM2-135M's 106M); they are alive at the end of the timed call and counted in its
  peak. The peer keeps no masks. Peaks are RSS (5 ms samples): memory the allocator keeps after a
  free counts too, so they vary between runs of the same code (up to 1.7x here); ``--repeats`` keeps
  the lowest of each tool's runs.
- Time: the peer's includes torch.fx tracing of the model into per-block subgraphs, the session /
  recipe lifecycle, a full forward of each block for calibration (sppx stops each statistics pass at
  the last needed input) and the duplicated statistics above.

Writes peer.csv, peer.md and peer.png (perplexity, prune time and peak memory per row, both tools) under --out.

    python scripts/bench_peer.py --peer-python .venv-peer/bin/python --repeats 2  # all rows (make bench-peer)
    python scripts/bench_peer.py --peer-python .venv-peer/bin/python --repeats 2 --precision bf16
    python scripts/bench_peer.py --methods wanda --patterns 2:4 --nsamples 4 --eval-windows 4  # smoke
    python scripts/bench_peer.py --tools sppx --methods sparsegpt --patterns 50%
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from peer_worker import BLOCKSIZE, OWL_LAMBDA, OWL_M, PERCDAMP, PROJECTIONS, parse_pattern, run_worker
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from safetensors.torch import load_file, save_file

from sppx.cpu_linear import chosen_kernel, linear_kernel
from sppx.data import TokenizedCorpus, WikiText, calibration_windows, consecutive_windows, windows_digest
from sppx.evaluate import perplexity
from sppx.models import EmbeddedModel, default_cache_dir
from sppx.pruning import SparseGPTPruner, SparsityPattern, WandaPruner, prunable_linears, prune_model
from sppx.pruning.owl import layer_sparsities

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["wanda", "sparsegpt", "wanda+owl", "sparsegpt+owl"]
TOOLS = ["sppx", "peer"]
MiB = 2**20


# --------------------------------------------------------------------------- the sppx worker
def sppx_prepare(model, ids: torch.Tensor, args):
    """sppx's pruner for the row; the returned call runs OWL's allocation (when asked) and prune_model."""
    pattern = SparsityPattern("nm", args.n, args.m) if args.m else SparsityPattern()
    options = dict(
        batch_size=args.batch_size,
        allocation="owl" if args.owl else "uniform",
        compute_dtype=args.compute_dtype,
        owl_m=float(OWL_M),
        owl_lambda=OWL_LAMBDA,
    )
    if args.method == "sparsegpt":
        pruner = SparseGPTPruner(**options, blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    else:
        pruner = WandaPruner(**options)
    pruner.check_pattern(pattern, args.sparsity)

    def prune() -> dict:
        with linear_kernel(args.cpu_linear):
            layers = layer_sparsities(model, pruner, args.sparsity, ids, progress=False)
            prune_model(model, pruner, layers, pattern, ids, progress=False)
            return {"layer_sparsities": [float(v) for v in layers], "cpu_linear": chosen_kernel()}

    return prune


# --------------------------------------------------------------------------- rows and workers
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--patterns", nargs="+", default=["50%", "2:4", "70%"], help="e.g. 50%% 2:4 0.7")
    parser.add_argument(
        "--owl-patterns", nargs="+", default=["70%"], help="unstructured, for the +owl methods"
    )
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (both)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    parser.add_argument(
        "--sppx-attention",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="sppx's attention kernel (sdpa: the model's default, as run.py; eager: the peer's)",
    )
    parser.add_argument(
        "--sppx-linear",
        choices=["auto", "onednn", "torch"],
        default="auto",
        help="sppx's cpu_linear (auto: as run.py; torch: the peer's kernel, F.linear through MKL)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: both tools calibrate with bf16 matrix products, each its own way (sppx: "
        "pruner.compute_dtype=bfloat16 on the fp32 weights; the peer: the model loaded in bf16)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every row per tool, alternating tools; the table keeps each one's fastest time and "
        "lowest peak (the pruned weights of all runs must be equal)",
    )
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/peer"))
    parser.add_argument("--peer-python", type=Path, default=Path(".venv-peer/bin/python"))
    parser.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep every worker's pruned weights in <out>/work (about 400 MiB per run; by default each "
        "row's are deleted once it is measured)",
    )
    args = parser.parse_args()
    try:
        for text in [*args.patterns, *args.owl_patterns]:
            parse_pattern(text)
    except ValueError as err:
        sys.exit(f"bench_peer: error: --patterns: {err} (allowed: N:M, 60%, 0.6)")
    if args.repeats < 1:
        sys.exit(f"bench_peer: error: --repeats {args.repeats}: must be >= 1")
    if any(":" in text for text in args.owl_patterns):
        sys.exit("bench_peer: error: --owl-patterns: OWL needs unstructured patterns (N:M fixes every layer)")
    if "peer" in args.tools and not args.peer_python.exists():
        sys.exit(
            f"bench_peer: error: --peer-python {args.peer_python} does not exist; "
            "`make bench-peer` creates .venv-peer with llm-compressor"
        )
    return args


def row_list(args) -> list[tuple[str, str]]:
    """(method, pattern) rows: the plain methods at --patterns, the +owl ones at --owl-patterns."""
    return [
        (method, text)
        for method in args.methods
        for text in (args.owl_patterns if method.endswith("+owl") else args.patterns)
    ]


def row_name(tool: str, method: str, pattern: str) -> str:
    return f"{tool}-{method.replace('+', '_')}-{pattern.replace(':', 'of').replace('%', 'pct')}"


def run_worker_process(
    tool, method, pattern, args, model_dir: Path, work: Path, console, run: int = 0
) -> dict:
    """Prune one row in a fresh process; its JSON record (with ``error`` when it failed)."""
    out = work / (row_name(tool, method, pattern) + (f"-run{run}" if run else ""))
    for suffix in (".json", ".safetensors"):
        Path(f"{out}{suffix}").unlink(missing_ok=True)
    python, script = (
        (sys.executable, [str(Path(__file__).resolve()), "--worker"])
        if tool == "sppx"
        else (str(args.peer_python), [str(ROOT / "scripts" / "peer_worker.py")])
    )
    base, _, owl = method.partition("+")
    command = [python, *script, "--model-dir", str(model_dir), "--tokens", str(work / "calib.safetensors")]
    command += ["--method", base, "--pattern", pattern, "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size), "--out", str(out), *(["--owl"] if owl else [])]
    command += ["--attention", args.sppx_attention if tool == "sppx" else "eager"]
    if tool == "sppx":
        command += ["--cpu-linear", args.sppx_linear]
    if args.precision == "bf16":
        command += ["--compute-dtype", "bfloat16"] if tool == "sppx" else ["--load-dtype", "bfloat16"]
    # The same environment for both: thread pools capped, offline (the model is a local folder).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    Path(f"{out}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    try:
        record = json.loads(Path(f"{out}.json").read_text())
    except (OSError, ValueError):
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        record = {"error": f"exit status {done.returncode}, no record: {tail[0]}"}
    record["weights"] = f"{out}.safetensors"
    label = f"{tool:>4} {method:>13} {pattern:>4}"
    if "error" in record:
        console.print(f"[red]{label} failed[/red] (log {out}.log): {escape(record['error'])}")
    else:
        console.print(
            f"{label}: prune {record['prune_s']:7.1f}s  +{record['peak_increase_mib']:.0f} MiB  "
            f"calibration {record['calibration_seen']}  ({time.perf_counter() - started:.0f}s in all)"
        )
    return record


# --------------------------------------------------------------------------- evaluation
def block_of(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def pattern_checks(weights: dict[str, torch.Tensor], pattern: str, layers: list[float]) -> dict:
    """Measured sparsity; N:M: groups of M along the input dimension with fewer than N zeros;
    unstructured: the share of rows within one weight of cols x target, and of matrices with exactly
    floor(numel x target) zeros (each block's own target: OWL's allocation)."""
    n, m, _ = parse_pattern(pattern)
    zeros = total = bad_groups = rows_exact = rows = matrices_exact = 0
    for name, w in weights.items():
        target = layers[block_of(name)]
        zero = w == 0
        zeros += int(zero.sum())
        total += w.numel()
        if m:
            bad_groups += int((zero.view(w.shape[0], -1, m).sum(-1) < n).sum())
            continue
        rows_exact += int(((zero.sum(1) - w.shape[1] * target).abs() < 1).sum())
        rows += w.shape[0]
        matrices_exact += int(zero.sum()) == math.floor(w.numel() * target + 1e-9)
    found = {"sparsity": zeros / total}
    if m:
        found.update(
            nm_bad_groups=bad_groups, check=f"{n}:{m} " + ("ok" if not bad_groups else f"{bad_groups} bad")
        )
    else:
        found.update(rows_exact=rows_exact / rows, matrices_exact=matrices_exact / len(weights))
        found["check"] = f"rows {found['rows_exact']:.0%}, mats {found['matrices_exact']:.0%}"
    return found


@torch.no_grad()
def evaluate(model, record: dict, expected: set[str], pattern: str, evals: torch.Tensor) -> dict:
    """Perplexity with the row's weights in the model, and the pattern checks."""
    weights = load_file(record["weights"])
    if set(weights) != expected:
        raise ValueError(f"{record['weights']}: not the {len(expected)} decoder Linear weights")
    model.load_state_dict(weights, strict=False)
    found = pattern_checks(weights, pattern, record["layer_sparsities"])
    found["ppl"] = perplexity(model, evals, 4, progress=False)["ppl"]
    return found


def mask_agreement(records: dict[str, dict]) -> float | None:
    """The share of weights both tools prune or both keep (None unless both rows ran)."""
    if any("error" in records[tool] for tool in TOOLS):
        return None
    a, b = (load_file(records[tool]["weights"]) for tool in TOOLS)
    same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in a)
    return same / sum(w.numel() for w in a.values())


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fastest_run(runs: list[dict]) -> dict:
    """One record for ``--repeats`` runs of a row: the first, with the lowest prune time and peak of all
    (both only vary upwards: other load, allocator state). Every run must give the same weights."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    record = dict(runs[0])
    if len(runs) > 1:
        digests = {file_digest(r["weights"]) for r in runs}
        if len(digests) > 1:
            return {"error": f"{len(runs)} runs gave {len(digests)} different pruned models"}
        record["prune_s_runs"] = [round(r["prune_s"], 2) for r in runs]
        record["peak_mib_runs"] = [round(r["peak_increase_mib"]) for r in runs]
        record["prune_s"] = min(r["prune_s"] for r in runs)
        record["peak_increase_mib"] = min(r["peak_increase_mib"] for r in runs)
    return record


def drop_weights(method: str, pattern: str, work: Path) -> None:
    """Delete a measured row's pruned weights (every tool, every run): a full sweep would leave GBs."""
    for tool in TOOLS:
        for path in work.glob(f"{row_name(tool, method, pattern)}*.safetensors"):
            path.unlink()


def measure_row(method, pattern, args, setup, console) -> dict[str, dict]:
    """Both tools' numbers for one row (``error`` for a tool that failed or was not asked for); with
    ``--repeats``, the tools take turns so that a slow spell of the machine hits both."""
    model, model_dir, work, evals, expected = setup
    runs: dict[str, list[dict]] = {tool: [] for tool in args.tools}
    for run in range(args.repeats):
        for tool in args.tools:
            runs[tool].append(run_worker_process(tool, method, pattern, args, model_dir, work, console, run))
    records = {tool: fastest_run(runs[tool]) if tool in runs else {"error": "not run"} for tool in TOOLS}
    for record in records.values():
        if "error" not in record:
            record.update(evaluate(model, record, expected, pattern, evals))
    return records


# --------------------------------------------------------------------------- report
FIELDS = {  # per-tool CSV field -> key of the worker record / evaluation
    "ppl": "ppl",
    "prune_s": "prune_s",
    "prune_s_runs": "prune_s_runs",
    "peak_mib": "peak_increase_mib",
    "peak_mib_runs": "peak_mib_runs",
    "sparsity": "sparsity",
    "check": "check",
    "rows_exact": "rows_exact",
    "matrices_exact": "matrices_exact",
    "nm_bad_groups": "nm_bad_groups",
    "calibration": "calibration_seen",
    "rss_before_mib": "rss_before_mib",
    "untargeted_new_zeros": "untargeted_new_zeros",
    "cpu_linear": "cpu_linear",
    "error": "error",
}


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def combine(method: str, pattern: str, records: dict[str, dict], dense_ppl: float) -> dict:
    """One output row: both tools' numbers, the sppx / peer ratios and the masks' agreement."""
    row: dict = {"method": method, "pattern": pattern, "dense_ppl": dense_ppl}
    row["mask_agreement"] = mask_agreement(records)
    for field, key in FIELDS.items():
        for tool in TOOLS:
            row[f"{field}_{tool}"] = records[tool].get(key)
    for name, field in (("ppl_ratio", "ppl"), ("time_ratio", "prune_s"), ("mem_ratio", "peak_mib")):
        row[name] = ratio(row[f"{field}_sppx"], row[f"{field}_peer"])
    return row


def sppx_kernels(rows: list[dict]) -> str:
    """The fp32 product kernel(s) sppx's workers used."""
    return "/".join(sorted({row["cpu_linear_sppx"] for row in rows if row.get("cpu_linear_sppx")})) or "-"


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = [  # header, field, format
    ("method", "method", ""),
    ("pattern", "pattern", ""),
    ("ppl sppx", "ppl_sppx", ".2f"),
    ("ppl peer", "ppl_peer", ".2f"),
    ("ppl ratio", "ppl_ratio", ".3f"),
    ("prune s sppx", "prune_s_sppx", ".1f"),
    ("prune s peer", "prune_s_peer", ".1f"),
    ("time ratio", "time_ratio", ".2f"),
    ("peak MiB sppx", "peak_mib_sppx", ".0f"),
    ("peak MiB peer", "peak_mib_peer", ".0f"),
    ("mem ratio", "mem_ratio", ".2f"),
    ("sparsity sppx", "sparsity_sppx", ".4f"),
    ("sparsity peer", "sparsity_peer", ".4f"),
    ("mask agree", "mask_agreement", ".4f"),
    ("check sppx", "check_sppx", ""),
    ("check peer", "check_peer", ""),
]


def report(rows: list[dict], args, info: str, console) -> None:
    """The rich table, peer.md and peer.csv."""
    table = Table(title=f"sppx vs llm-compressor: {info}")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("method", "pattern") else "right")
    md = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for r in rows:
        cells = [cell(r[field], fmt) for _, field, fmt in COLUMNS]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
        for tool in TOOLS:
            if r[f"error_{tool}"] and r[f"error_{tool}"] != "not run":
                notes.append(f"{tool} {r['method']} {r['pattern']} failed: {r[f'error_{tool}']}")
    console.print(table)
    for note in notes:
        console.print(f"[red]{escape(note)}[/red]")
    seen = sorted(
        {f"{tool} {r[f'calibration_{tool}']}" for r in rows for tool in TOOLS if r[f"calibration_{tool}"]}
    )
    console.print("calibration windows seen by the embedding: " + ", ".join(seen))
    (args.out / "peer.md").write_text(
        f"{info}\n\n"
        + "\n".join(md)
        + "\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + f"\ncalibration windows seen by the embedding: {', '.join(seen)}\n"
    )
    with open(args.out / "peer.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def draw_bars(ax, rows: list[dict], field: str) -> None:
    """Side-by-side bars of ``field`` for both tools; a failed row says so at the foot of its slot."""
    for offset, tool, color in ((-0.2, "sppx", "C0"), (0.2, "peer", "C1")):
        values = [r[f"{field}_{tool}"] for r in rows]
        shown = [(i + offset, v) for i, v in enumerate(values) if v is not None]
        if shown:
            label = "sppx" if tool == "sppx" else "llm-compressor"
            ax.bar(*zip(*shown, strict=True), width=0.4, color=color, label=label)
        for i, v in enumerate(values):
            if v is None and rows[i][f"error_{tool}"] != "not run":
                # x in data units, y in axes units: valid on the log-scale panel too
                ax.text(
                    i + offset,
                    0.03,
                    "failed",
                    transform=ax.get_xaxis_transform(),
                    rotation=90,
                    fontsize=8,
                    color=color,
                    ha="center",
                    va="bottom",
                )


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\n{r['pattern']}" for r in rows]
    fig, (ax_ppl, ax_time, ax_mem) = plt.subplots(3, 1, figsize=(max(8, 1.3 * len(rows) + 2), 10))
    draw_bars(ax_ppl, rows, "ppl")
    draw_bars(ax_time, rows, "prune_s")
    draw_bars(ax_mem, rows, "peak_mib")
    ax_ppl.axhline(rows[0]["dense_ppl"], color="gray", ls=":", label=f"dense ({rows[0]['dense_ppl']:.1f})")
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity (log scale)")
    ax_time.set_ylabel("prune time (s)")
    ax_mem.set_ylabel("peak resident memory added (MiB)")
    for ax in (ax_ppl, ax_time, ax_mem):
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)  # room for a failed row's slot, which has no bar
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 130), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def prepare_data(args, console):
    """The dense model, its folder, the calibration windows (written for the workers), the evaluation."""
    source = EmbeddedModel()
    model, tokenizer = source.load()  # converts the embedded GGUF once, if the cache is missing
    tokens = TokenizedCorpus.build(WikiText(seqlen=args.seqlen), tokenizer, default_cache_dir())
    calib = calibration_windows(tokens.streams["calibration"], args.nsamples, args.seqlen, args.seed)
    evals = consecutive_windows(tokens.streams["evaluation"], args.seqlen, args.eval_windows)
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    # safetensors, never pickle: nothing in the workers runs code from a data file.
    save_file({"input_ids": calib.to(torch.long).contiguous()}, str(work / "calib.safetensors"))
    console.print(
        f"{source.name} from {source.cache_path}; calibration {tuple(calib.shape)} "
        f"(digest {windows_digest(calib)}), evaluation {tuple(evals.shape)}; {args.threads} threads per "
        f"worker, batch {args.batch_size}"
    )
    return model, source.cache_path, work, evals


def main() -> None:
    args = parse_args()
    console = Console(width=220)
    args.out.mkdir(parents=True, exist_ok=True)
    model, model_dir, work, evals = prepare_data(args, console)
    expected = {f"{name}.weight" for name in prunable_linears(model, list(PROJECTIONS))}
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_ppl = perplexity(model, evals, 4, progress=False)["ppl"]
    console.print(f"dense ppl {dense_ppl:.2f}")
    setup = (model, model_dir, work, evals, expected)
    rows = []
    for method, pattern in row_list(args):
        records = measure_row(method, pattern, args, setup, console)
        model.load_state_dict(dense_state)
        rows.append(combine(method, pattern, records, dense_ppl))
        if not args.keep_weights:
            drop_weights(method, pattern, work)
    info = (
        f"SmolLM2-135M, calibration {args.nsamples}x{args.seqlen} (batch {args.batch_size}), evaluation "
        f"{evals.shape[0]}x{args.seqlen}, dense ppl {dense_ppl:.2f}, {args.threads} threads per worker, "
        f"attention sppx {args.sppx_attention} / peer eager, fp32 products sppx {sppx_kernels(rows)} / peer torch"
        + (
            ", bf16 products (sppx autocast on fp32 weights, the peer's model in bf16)"
            if args.precision == "bf16"
            else ""
        )
        + (f", best of {args.repeats} runs" if args.repeats > 1 else "")
    )
    report(rows, args, info, console)
    plot(rows, args.out / "peer.png", info)
    console.print(f"wrote {args.out}/peer.csv, peer.md, peer.png (workers' records and logs in {work})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        raise SystemExit(run_worker(sppx_prepare, "sppx", sys.argv[2:]))
    main()
