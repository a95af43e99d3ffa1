"""fp32 matrix products on the CPU: torch's ``F.linear`` against oneDNN, side by side (sppx's cpu_linear).

For every Linear shape of a model family (SmolLM2-135M, Llama-2-7B; the shapes of
scripts/bench_semi_structured.py) and ``--tokens`` rows of input (2048: one calibration batch of 8
windows of 256 tokens), ``y = x W^T`` is timed both ways, the two kernels taking turns within each
round; the table gives the median time per product over ``--repeats`` rounds, GFLOP/s and oneDNN /
torch time (below 1.0: oneDNN is faster), with the largest difference between the two outputs relative
to the largest output. The header says what ``cpu_linear=auto`` picks on this machine and why.

    python scripts/bench_cpu_linear.py                          # both families, 2048 tokens, 2 threads
    python scripts/bench_cpu_linear.py --families llama-2-7b --tokens 256 2048 --threads 4
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_semi_structured import SHAPES
from rich.console import Console
from rich.table import Table

from sppx.cpu_linear import chosen_kernel, cpu_vendor, linear_kernel, onednn_linear, onednn_works

FAMILIES = ("smollm2-135m", "llama-2-7b")


def seconds(product, x: torch.Tensor, weight: torch.Tensor, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        product(x, weight)
    return (time.perf_counter() - start) / inner


@torch.inference_mode()
def time_shape(shape: tuple[int, int], tokens: int, repeats: int) -> dict:
    """Median seconds per product of each kernel, and the outputs' largest relative difference."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator)
    x = torch.randn(tokens, shape[1], generator=generator)
    products = {"torch": F.linear, "onednn": onednn_linear}
    flops = 2 * tokens * shape[0] * shape[1]
    inner = max(1, int(2e9 // flops))  # products per timing: about 2 GFLOP, at least one
    for product in products.values():
        product(x, weight)  # warm up (oneDNN builds its primitive once per shape)
    times: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(repeats):
        for name, product in products.items():
            times[name].append(seconds(product, x, weight, inner))
    reference = F.linear(x, weight)
    diff = float((onednn_linear(x, weight) - reference).abs().max() / reference.abs().max())
    row = {name: statistics.median(values) for name, values in times.items()}
    row.update(flops=flops, rel_diff=diff)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is kept")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/cpu_linear.csv"))
    args = parser.parse_args()
    if not onednn_works():
        raise SystemExit("bench_cpu_linear: this torch has no working oneDNN Linear (torch.ops.mkldnn)")
    if min(args.tokens) < 1 or args.threads < 1 or args.repeats < 1:
        raise SystemExit("bench_cpu_linear: error: --tokens, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    with linear_kernel("auto"):
        auto = chosen_kernel()
    mkl = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    title = (
        f"fp32 products, {args.threads} threads, CPU vendor {cpu_vendor() or 'unknown'}, torch {torch.__version__}"
        f" ({mkl}): cpu_linear=auto uses {auto}"
    )
    table = Table(title=title)
    columns = ["family", "linear", "tokens", "torch ms", "onednn ms", "torch GFLOP/s", "onednn GFLOP/s"]
    for header in [*columns, "onednn / torch", "max rel diff"]:
        table.add_column(header, justify="left" if header in ("family", "linear") else "right")
    rows = []
    for family in args.families:
        for name, shape in SHAPES[family].items():
            for tokens in args.tokens:
                r = time_shape(shape, tokens, args.repeats)
                rows.append({"family": family, "linear": name, "tokens": tokens, **r})
                table.add_row(
                    family,
                    name,
                    str(tokens),
                    f"{r['torch'] * 1e3:.2f}",
                    f"{r['onednn'] * 1e3:.2f}",
                    f"{r['flops'] / r['torch'] / 1e9:.0f}",
                    f"{r['flops'] / r['onednn'] / 1e9:.0f}",
                    f"{r['onednn'] / r['torch']:.2f}",
                    f"{r['rel_diff']:.1e}",
                )
    Console(width=max(Console().width, 140)).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
