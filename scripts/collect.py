"""Collect the results of many runs into one table and a few plots.

    python scripts/collect.py outputs/multirun/2026-12-01_20-00-00          # a sweep
    python scripts/collect.py outputs/runs --out outputs/report               # every single run

Reads every results.json below OUTPUT_DIR (complete and failed runs), prints the table and writes
summary.md, summary.csv, ppl_vs_sparsity.png, recovery.png and layer_sparsity.png to --out
(default: OUTPUT_DIR itself). A sweep writes the same files into its own folder when it ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from sppx.collect import collect, markdown_table, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, help="a folder with results.json files below it")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: OUTPUT_DIR)")
    args = parser.parse_args(argv)
    if not args.output_dir.is_dir():
        print(f"collect: error: {args.output_dir} is not a folder", file=sys.stderr)
        return 2
    rows, results = collect(args.output_dir)
    if not rows:
        print(f"collect: error: no results.json below {args.output_dir}", file=sys.stderr)
        return 2
    written = write_report(rows, results, args.out or args.output_dir)
    console = Console(width=max(160, Console().width))
    console.print(Markdown(markdown_table(rows)))
    console.print("wrote " + ", ".join(str(p) for p in written), soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
