"""2:4 sparse tensor cores against dense matrix products, side by side on one CUDA GPU.

For every Linear shape of a model family (SmolLM2-135M, Llama-2-7B, Llama-2-70B), a random weight is
pruned 2:4 by magnitude and ``y = x W^T`` is timed for ``tokens`` rows of ``x`` (1: one decode step,
2048: a prefill) three ways: dense (cuBLAS, the pruned weight with its zeros), and through torch's
semi-structured sparse format with each of its two kernels (CUTLASS and cuSPARSELt). Each timing is
the median over ``--repeats`` rounds of CUDA-event-timed batches of ``--inner`` products, the three
variants taking turns within a round; outputs are checked against the dense ones. Printed: time per
product and sparse / dense time (below 1.0: the sparse kernel is faster).

    python scripts/bench_semi_structured.py                     # every family, fp16 and bf16
    python scripts/bench_semi_structured.py --families llama-2-7b --dtypes bfloat16 --tokens 1 2048
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from sppx.pruning import MagnitudePruner, SparsityPattern

# (out_features, in_features) of each distinct Linear shape in a decoder block
SHAPES = {
    "smollm2-135m": {
        "q_proj/o_proj": (576, 576),
        "k_proj/v_proj": (192, 576),
        "gate/up": (1536, 576),
        "down_proj": (576, 1536),
    },
    "llama-2-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up": (11008, 4096), "down_proj": (4096, 11008)},
    "llama-2-70b": {
        "q_proj/o_proj": (8192, 8192),
        "k_proj/v_proj": (1024, 8192),
        "gate/up": (28672, 8192),
        "down_proj": (8192, 28672),
    },
}
KERNELS = ("dense", "cutlass", "cusparselt")


def pruned_linear(out_features: int, in_features: int, dtype: torch.dtype) -> nn.Linear:
    """A random bias-free CUDA Linear pruned 2:4 by magnitude, in ``dtype``."""
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda")
    MagnitudePruner().prune(linear, None, 0.5, SparsityPattern("nm", 2, 4))
    return linear.to(dtype).requires_grad_(False)


def semi_structured_weight(weight: torch.Tensor, kernel: str) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = kernel == "cutlass"
    try:
        return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def batch_ms(fn, inner: int) -> float:
    """Milliseconds per call of ``fn`` over ``inner`` back-to-back calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


@torch.inference_mode()
def time_shape(shape: tuple[int, int], tokens: int, dtype: torch.dtype, repeats: int, inner: int) -> dict:
    """{kernel: median ms per product} for one weight shape, plus the largest output difference."""
    linear = pruned_linear(*shape, dtype)
    weight = linear.weight
    x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
    calls = {"dense": lambda: torch.nn.functional.linear(x, weight)}
    reference = calls["dense"]()
    error, failures = {"dense": 0.0}, {}
    for kernel in KERNELS[1:]:
        try:  # a kernel this build, this GPU or this shape lacks fails at conversion or at the first product
            sparse = semi_structured_weight(weight, kernel)
            calls[kernel] = lambda w=sparse: torch.nn.functional.linear(x, w)
            error[kernel] = ((calls[kernel]() - reference).abs().max() / reference.abs().max()).item()
        except (RuntimeError, ValueError) as err:
            calls.pop(kernel, None)
            failures[kernel] = str(err).splitlines()[0][:120]
    for fn in calls.values():  # warm-up: kernel selection, caches
        batch_ms(fn, 3)
    samples = {kernel: [] for kernel in calls}
    for round_ in range(repeats):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for kernel in order:
            samples[kernel].append(batch_ms(calls[kernel], inner))
    return {
        "ms": {kernel: statistics.median(s) for kernel, s in samples.items()},
        "rel_error": error,
        "failures": failures,
    }


def measure_row(
    family: str, dtype_name: str, label: str, shape: tuple[int, int], tokens: int, repeats: int, inner: int
) -> dict:
    """One CSV row: the dense time, and each sparse kernel's time, ratio and error (or why it failed)."""
    result = time_shape(shape, tokens, getattr(torch, dtype_name), repeats, inner)
    ms = result["ms"]
    row = {
        "family": family,
        "dtype": dtype_name,
        "linear": label,
        "out": shape[0],
        "in": shape[1],
        "tokens": tokens,
        "dense_ms": round(ms["dense"], 5),
    }
    for kernel in KERNELS[1:]:
        ran = kernel in ms
        row[f"{kernel}_ms"] = round(ms[kernel], 5) if ran else None
        row[f"{kernel}_x"] = round(ms[kernel] / ms["dense"], 3) if ran else None
        row[f"{kernel}_rel_error"] = (
            f"{result['rel_error'][kernel]:.1e}" if ran else result["failures"][kernel]
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16", "bfloat16"]
    )
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/semi-structured"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_semi_structured: torch sees no CUDA GPU (2:4 sparse kernels are CUDA-only)")
    torch.manual_seed(0)
    console = Console(width=140)
    console.print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "semi_structured.csv", "w", newline="") as csv_file:  # rows written as measured
        writer = None
        for family, dtype_name in itertools.product(args.families, args.dtypes):
            for (label, shape), tokens in itertools.product(SHAPES[family].items(), args.tokens):
                row = measure_row(family, dtype_name, label, shape, tokens, args.repeats, args.inner)
                rows.append(row)
                if writer is None:
                    writer = csv.DictWriter(csv_file, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                csv_file.flush()
    table = Table(title="2:4 semi-structured / dense time per product (below 1: sparse is faster)")
    for column in (
        "family",
        "dtype",
        "linear",
        "out x in",
        "tokens",
        "dense ms",
        "cutlass x",
        "cuSPARSELt x",
    ):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["family"],
            r["dtype"],
            r["linear"],
            f"{r['out']}x{r['in']}",
            str(r["tokens"]),
            f"{r['dense_ms']:.4f}",
            str(r["cutlass_x"]),
            str(r["cusparselt_x"]),
        )
    console.print(table)
    failed = {(k, r[f"{k}_rel_error"]) for r in rows for k in KERNELS[1:] if r[f"{k}_ms"] is None}
    for kernel, message in sorted(failed):
        console.print(f"{kernel} did not run: {message}")
    console.print(f"CSV: {args.out / 'semi_structured.csv'}")


if __name__ == "__main__":
    main()
