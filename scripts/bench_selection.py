"""Mask selection measured side by side: sppx's k-th smallest (masks.kth_smallest) against torch.kthvalue.

Scores are |W| of every pruned Linear of the model (the selection does not care what scores mean).
For each selection the pruners make (per output row at 50% and 70%: Wanda, magnitude per row; per
matrix: magnitude, SparseGPT's 128-column blocks; groups of four: 2:4), both are timed on every matrix,
in alternating order, best of ``--repeats``, and their values checked equal.

    python scripts/bench_selection.py                        # SmolLM2-135M
    python scripts/bench_selection.py --model tiny-llama      # a smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from sppx.anatomy import PROJECTIONS, prunable_linears
from sppx.models import EmbeddedModel, TinyLlama
from sppx.pruning.masks import kth_smallest


def selections(weight: torch.Tensor) -> dict[str, tuple[torch.Tensor, int, int]]:
    """{label: (scores, k, dim)} of the selections the pruners make on ``weight``."""
    scores = weight.detach().abs().float()
    rows, cols = scores.shape
    return {
        "per row 50%": (scores, cols // 2, 1),
        "per row 70%": (scores, int(cols * 0.7), 1),
        "per matrix 50%": (scores.flatten(), scores.numel() // 2, 0),
        "2:4 groups": (scores.reshape(rows, cols // 4, 4), 2, 2),
    }


def best_times(fns, repeats: int) -> list[float]:
    """The fastest of ``repeats`` runs of each of ``fns``, run in turn (one of each per round)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2-135m", "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = (EmbeddedModel() if args.model == "smollm2-135m" else TinyLlama()).load()[0]
    weights = [linear.weight for linear in prunable_linears(model, list(PROJECTIONS)).values()]
    work = [selections(w) for w in weights]

    table = Table(
        title=f"{args.model}: {len(weights)} matrices, {args.threads} threads, best of {args.repeats}"
    )
    for column in ("selection", "kthvalue s", "sppx s", "sppx / kthvalue"):
        table.add_column(column, justify="left" if column == "selection" else "right")
    for label in work[0]:
        cases = [w[label] for w in work]
        for scores, k, dim in cases:
            expected = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
            assert torch.equal(kth_smallest(scores, k, dim), expected), label
        reference, ours = best_times(
            [
                lambda: [torch.kthvalue(s, k, dim=d, keepdim=True) for s, k, d in cases],  # noqa: B023
                lambda: [kth_smallest(s, k, d) for s, k, d in cases],  # noqa: B023
            ],
            args.repeats,
        )
        table.add_row(label, f"{reference:.3f}", f"{ours:.3f}", f"{ours / reference:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
