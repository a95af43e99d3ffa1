"""Progress of long work, on one stream (stdout, where the logs and Lightning's bar go).

In a terminal: tqdm bars. In a batch job (stdout is not a terminal) a carriage-return bar is unreadable
in the log file, so progress is logged instead, one line at most every ``LINE_EVERY_S`` seconds and one
at the end (the tuning loop gets the same from ``LogProgress``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

import pytorch_lightning as pl
from tqdm.auto import tqdm

log = logging.getLogger("sppx")

LINE_EVERY_S = 30.0


def interactive() -> bool:
    return sys.stdout.isatty()


def bar(
    iterable: Iterable, desc: str, disable: bool = False, unit: str = "it", total: int | None = None, **kw
):
    """``tqdm(iterable)`` on stdout in a terminal; periodic log lines otherwise."""
    if disable:
        return iterable
    if interactive():
        return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stdout, **kw)
    return _lines(iterable, desc, unit, total)


def _lines(iterable: Iterable, desc: str, unit: str, total: int | None) -> Iterator:
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_EVERY_S and (total is None or done < total):
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s, %.0fs", desc, done, of, unit, now - start)
    log.info("%s: %d %s in %.1fs", desc, done, unit, time.perf_counter() - start)


def quiet_library_bars() -> None:
    """transformers' own bars (loading, writing shards) go to stderr: off when there is no terminal."""
    if not interactive():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class LogProgress(pl.Callback):
    """The tuning loop's progress as log lines (for runs whose output is not a terminal): step, loss and
    lr at most every ``LINE_EVERY_S`` seconds, and the last step."""

    def __init__(self, every_s: float = LINE_EVERY_S):
        self.every_s = every_s
        self.start = self.last = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        step, total = int(trainer.global_step), int(trainer.max_steps)
        if now - self.last < self.every_s and step != total:
            return
        self.last = now
        metrics = trainer.callback_metrics
        values = ", ".join(
            f"{k.split('/')[-1]} {float(metrics[k]):.4g}" for k in ("train/loss", "train/lr") if k in metrics
        )
        log.info("tune: step %d/%d%s, %.0fs", step, total, f" ({values})" if values else "", now - self.start)
