"""SIGINT (Ctrl-C) and SIGTERM (what SLURM and `kill` send): stop at a safe point, keep the work, say how to resume.

Inside the training loop a signal only sets a flag; the next safe point (the end of the current training step, or the
end of the epoch once validation and the epoch's callbacks have finished) saves `checkpoints/last.ckpt` and raises
RunInterrupted, which train() records in metrics.json (status "interrupted", the metrics so far, the resume command)
before the process exits with 128 + the signal number. Outside the loop (data preparation, testing) there is nothing
to save, so the signal raises at once. A second signal, one second or more after the first, also stops at once: the
checkpoint of the last finished epoch is already on disk, and its writes are atomic.

Under DDP every rank reaches the same safe points, so the ranks decide together (core.distributed.agree_any, one
small all-reduce per step) and all save and stop at the same step; a rank never waits in a collective the others
have left. Lightning's own SIGTERM handler is replaced while training runs: it broadcasts from inside the signal
handler, which pairs with the wrong collective when the signal reaches one rank only.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)
# Ctrl-C reaches every process of the terminal's group, and a SIGTERM to the launching process is forwarded to the
# DDP children: a signal this close to the first one is the same request, not a second one
REPEAT_WINDOW_S = 1.0


class RunInterrupted(BaseException):
    """A run stopped by SIGINT/SIGTERM. A BaseException like KeyboardInterrupt, so a sweep stops too
    (pipeline/sweep_jobs.py records failing jobs, i.e. Exceptions, and goes on), but not a KeyboardInterrupt, which
    Lightning would turn into a bare SystemExit(1)."""

    def __init__(self, signum: int, checkpoint: str | None = None, step: int | None = None,
                 epochs_completed: int | None = None):
        self.signum = int(signum)
        self.checkpoint, self.step, self.epochs_completed = checkpoint, step, epochs_completed
        super().__init__(self.describe())

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def describe(self) -> str:
        text = f"interrupted by {self.signal_name}"
        if self.checkpoint:
            text += f"; {self.checkpoint} saved at step {self.step}"
            if self.epochs_completed is not None:
                text += f" ({self.epochs_completed} epoch(s) completed)"
        return text


class Interrupts:
    """The process's signal state (one per process: module-level INTERRUPTS)."""

    def __init__(self):
        self.signum: int | None = None
        self.first_at = 0.0
        self.deferred = False  # inside the training loop: wait for the next safe point
        self.children: list[Any] = []  # DDP child processes started by this process (Lightning's launcher)
        self._previous: dict[int, Any] = {}

    # ----- installation ---------------------------------------------------------------------------------------
    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only; a no-op elsewhere, e.g. in notebooks' worker threads)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in HANDLED:
            current = signal.getsignal(sig)
            if current is not self.handle:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self.handle)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        self.reset()

    def reset(self) -> None:
        self.signum, self.first_at, self.deferred, self.children = None, 0.0, False, []

    # ----- the handler ----------------------------------------------------------------------------------------
    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is not None and now - self.first_at < REPEAT_WINDOW_S:
            return  # the same request reaching this process twice (process group, forwarded)
        first = self.signum is None
        if first:
            self.signum, self.first_at = signum, now
            if signum == signal.SIGTERM:
                self._forward(signum)
        if self.deferred and first:
            log.warning("Received %s: stopping after the current training step and saving checkpoints/last.ckpt "
                        "(send it again to stop at once)", signal.Signals(signum).name)
            return
        raise RunInterrupted(self.signum or signum)

    def _forward(self, signum: int) -> None:
        # `kill <pid>` reaches the launching process only; its DDP children must stop at the same step
        for proc in self.children:
            try:
                if proc.poll() is None:
                    proc.send_signal(signum)
            except OSError:
                pass

    @property
    def pending(self) -> bool:
        return self.signum is not None

    # ----- the training loop ----------------------------------------------------------------------------------
    def arm(self, trainer) -> None:
        """Called when the training loop starts: defer signals to safe points, and replace Lightning's SIGTERM
        handler (installed just before, see the module docstring)."""
        self.deferred = True
        launcher = getattr(trainer.strategy, "launcher", None)
        self.children = list(getattr(launcher, "procs", None) or [])
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                signal.signal(sig, self.handle)

    def disarm(self) -> None:
        self.deferred = False


INTERRUPTS = Interrupts()
