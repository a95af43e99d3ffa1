"""One policy for SIGINT and SIGTERM over a whole run (what Ctrl-C, ``timeout``, ``docker stop`` and a
cluster's preemption send).

While a run executes, both signals raise ``Interrupted`` where the run is, so every ``finally`` runs (no
temporary folders are left) and the run's record says ``interrupted``. While tuning, the first signal is
deferred to the end of the current optimizer step: the trainer writes ``checkpoints/last.ckpt`` there and
stops, so ``resume=true`` continues from that step. A second signal stops at once. The process then exits
with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell does.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run stopped for a signal. Like KeyboardInterrupt it is not an ``Exception``, so no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signum = signum
        self.step = step  # the optimizer steps done, when it stopped while tuning
        self.checkpoint = checkpoint  # written on the way out, when it stopped while tuning
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """Handlers for SIGINT and SIGTERM for the duration of a ``with`` block (a no-op outside the main
    thread, where Python cannot install handlers); the previous handlers come back on exit."""

    def __init__(self):
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, _frame) -> None:
        first = self.received is None
        self.received = signum
        if self.deferring and first:
            log.warning(
                "%s received: stopping after this optimizer step (a checkpoint is written first); "
                "send it again to stop at once",
                signal.Signals(signum).name,
            )
            return
        raise Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self.handle)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
            self.install()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextmanager
    def deferred(self):
        """Within this block the first signal only sets ``received`` (a ``StopOnSignal`` callback acts on
        it at the next step boundary)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


class StopOnSignal(pl.Callback):
    """Ends tuning at a step boundary once the guard has received a signal: at the end of that step it
    writes ``checkpoint`` (the adapter's state, as the periodic checkpoints do); when the next step (or
    a validation) would start, after the finished step's metrics are logged, it raises ``Interrupted``."""

    def __init__(self, guard: SignalGuard, checkpoint: Path):
        self.guard = guard
        self.checkpoint = Path(checkpoint)
        self.saved_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's own SIGTERM handler only acts at the end of an epoch (one epoch is the whole run
        # here); with one process ours replaces it. With several, Lightning's broadcast keeps the
        # processes in step, so it stays.
        if trainer.world_size == 1:
            self.guard.install()

    def save(self, trainer) -> None:
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.checkpoint)  # every process calls it; the first one writes
        self.saved_step = int(trainer.global_step)

    def stop(self) -> None:
        if self.saved_step is not None:
            raise Interrupted(self.guard.received, step=self.saved_step, checkpoint=self.checkpoint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.guard.received is not None and self.saved_step is None:
            self.save(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stop()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.stop()
