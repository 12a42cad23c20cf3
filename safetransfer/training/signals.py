"""Stop requests: the signals SLURM, submitit and Ctrl-C send, turned into a flag the training
loop checks at each step boundary, and the Preempted exception raised once the seed's
checkpoint is written."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


#: the signals SLURM and submitit send before a job is preempted or reaches its time limit
#: (SLURM: SIGTERM, or the --signal of the job; submitit: USR2 by default, USR1 in older setups)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)  # SIGINT: Ctrl-C


class Preempted(Exception):
    """The job was asked to stop (SIGTERM / SIGINT / SIGUSR1 / SIGUSR2); a checkpoint was written first."""

    #: how a job continues when nothing more is known of how it was started
    RERUN = "rerun the same command (same output directory) to continue"

    def __init__(self, signum: int, iteration: int, path: Path | None):
        self.signum, self.iteration, self.path = signum, iteration, path
        super().__init__(self.text(self.RERUN))

    def text(self, how_to_continue: str) -> str:
        """The one line, ending in how to continue (a multirun names its sweep folder)."""
        where = f"checkpoint written to {self.path}" if self.path else "no checkpoint (runtime.checkpoint_every=0)"
        stopped = f"stopped by {signal.Signals(self.signum).name} after iteration {self.iteration}"
        return f"{stopped}: {where}; {how_to_continue}"

    def __reduce__(self):  # crosses process boundaries (runtime.concurrent_seeds)
        return Preempted, (self.signum, self.iteration, self.path)


class StopSignals:
    """While active, SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 only raise a flag; the training
    loop checks it at each step boundary, writes a checkpoint and raises Preempted (a second
    Ctrl-C stops at once). `forward` then hands
    the signal to whoever handled it before (submitit requeues the job there)."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.requested is None:
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.requested = signum

    def forward(self, signum: int) -> None:
        """Call the handler that was installed before ours (submitit's checkpoint-and-requeue)."""
        previous = self._previous.get(signum)
        if callable(previous) and signum != signal.SIGINT:  # Python's SIGINT handler would raise KeyboardInterrupt
            previous(signum, None)
