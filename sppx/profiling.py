"""Measuring a stage: wall time per named phase (Stopwatch), and peak memory (PeakMemory: process RSS
sampled in a background thread, and the CUDA allocator's peak when a GPU is in use)."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from contextlib import contextmanager

import torch


class Stopwatch:
    """Wall time per phase; a phase entered twice accumulates."""

    def __init__(self, log: logging.Logger | None = None, quiet: tuple[str, ...] = ()):
        self.times: dict[str, float] = {}
        self.log, self.quiet = log, quiet  # phases are logged when they start and end, except quiet ones
        self.running: list[str] = []  # the phases entered and not yet left, outermost first
        self.raised_in: str | None = None  # the innermost phase an exception (or signal) left

    @property
    def current(self) -> str | None:
        """The innermost phase running now (None between phases)."""
        return self.running[-1] if self.running else None

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self.running.append(phase)
        loud = self.log is not None and phase not in self.quiet
        if loud:
            self.log.info("%s: started", phase)
        try:
            yield
        except BaseException:
            self.raised_in = self.raised_in or phase
            raise
        finally:
            self.running.pop()
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start
            if loud:
                self.log.info(
                    "%s: %s in %.1fs",
                    phase,
                    "stopped" if self.raised_in else "done",
                    time.perf_counter() - start,
                )


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _glibc(function: str):
    """The C library function ``function`` of glibc, or None where the C library is not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD = 32 * 2**20  # the ceiling glibc's own adaptive threshold reaches on 64-bit


@contextmanager
def heap_reused():
    """Inside: memory the C allocator gets back stays in its heap for the next allocation; on exit it
    is handed back to the system. For a loop that allocates and frees the same large temporaries over
    and over (the forward passes over calibration batches): by default glibc unmaps a freed block
    above its mmap threshold and trims the free top of its heap above its trim threshold (both adapt,
    up to 32 / 64 MiB), so the next batch's temporaries come on fresh pages, a page fault per 4 KiB
    (millions in a prune of SmolLM2-135M, seconds of its time).

    Blocks up to 32 MiB come from the heap (larger ones from mmap, as before), and the heap is not
    trimmed until the exit, where the thresholds stay fixed at glibc's adaptive ceilings (32 / 64 MiB).
    Yields whether the C library took the settings (False where it is not glibc)."""
    mallopt = _glibc("mallopt")
    applied = mallopt is not None
    if applied:
        applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
        applied &= bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # a C int; in effect, never
    try:
        yield applied
    finally:
        if mallopt is not None:
            mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by the C allocator back to the system (glibc ``malloc_trim``),
    so the resident size reflects what is alive after a stage with many large temporaries (pruning)."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.rss_start``, ``peak.rss_peak`` and
    ``peak.rss_increase`` (bytes), and ``peak.cuda_peak`` (bytes allocated, 0 without CUDA)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.rss_start = self.rss_peak = self.cuda_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.rss_start = self.rss_peak = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.rss_peak = max(self.rss_peak, rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def rss_increase(self) -> int:
        return self.rss_peak - self.rss_start
