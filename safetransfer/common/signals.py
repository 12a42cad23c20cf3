"""Stop requests: the signals SLURM, submitit and Ctrl-C send, turned into a flag the training
loop checks at each step boundary, and the Preempted exception raised once the seed's
checkpoint is written."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
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

    def __init__(
        self, signum: int, iteration: int, path: Path | None, during: str | None = None, kept: str | None = None
    ):
        self.signum, self.iteration, self.path, self.during, self.kept = signum, iteration, path, during, kept
        super().__init__(self.text(self.RERUN))

    def text(self, how_to_continue: str) -> str:
        """The one line, ending in how to continue (a multirun names its sweep folder)."""
        name = signal.Signals(self.signum).name
        if self.during is not None:  # before training: a cache or a source being made, none of it kept
            return f"stopped by {name} while {self.during}: none of it is kept; {how_to_continue}"
        if self.kept is not None:  # several seeds, each saying what it kept
            return f"stopped by {name}: {self.kept}; {how_to_continue}"
        return f"stopped by {name} after iteration {self.iteration}: {self.where()}; {how_to_continue}"

    def where(self) -> str:
        return f"checkpoint written to {self.path}" if self.path else "no checkpoint (runtime.checkpoint_every=0)"

    def __reduce__(self):  # crosses process boundaries (runtime.concurrent_seeds)
        return Preempted, (self.signum, self.iteration, self.path, self.during, self.kept)


#: the StopSignals in force in this process, innermost last
_active: list[StopSignals] = []


def current() -> StopSignals | None:
    """The StopSignals in force in this process, if any."""
    return _active[-1] if _active else None


def requested() -> int | None:
    """The stop signal received by the StopSignals in force, if any: for work before training
    (a cache being decoded, the demo source being pretrained) that stops within a few seconds."""
    return _active[-1].requested if _active else None


def check_stop(during: str) -> None:
    """Raise Preempted (nothing kept) when a stop was requested; `during` says what was under way."""
    signum = requested()
    if signum is not None:
        raise Preempted(signum, 0, None, during=during)


@contextlib.contextmanager
def at_once(during: str) -> Iterator[None]:
    """Within it, a stop request raises Preempted (nothing kept) at once, even inside a blocking read:
    for work that cannot checkpoint and may wait long (a download, an extraction)."""
    check_stop(during)
    stop = current()
    if stop is None:
        yield
        return
    previous, stop.now = stop.now, during
    try:
        yield
    finally:
        stop.now = previous


class StopSignals:
    """While active, SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 only raise a flag; the training
    loop checks it at each step boundary, writes a checkpoint and raises Preempted (a second
    Ctrl-C stops at once). `forward` then hands
    the signal to whoever handled it before (submitit requeues the job there)."""

    def __init__(self):
        self.requested: int | None = None
        self.now: str | None = None  # what is under way that a stop ends at once (at_once)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        _active.append(self)
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.requested is None and self.now is None:  # at once: Preempted's own line says it
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.requested = signum
        if self.now is not None:  # work that cannot checkpoint (a download): it ends here, none of it kept
            raise Preempted(signum, 0, None, during=self.now)

    def forward(self, signum: int) -> None:
        """Call the handler that was installed before ours (submitit's checkpoint-and-requeue)."""
        previous = self._previous.get(signum)
        if callable(previous) and signum != signal.SIGINT:  # Python's SIGINT handler would raise KeyboardInterrupt
            previous(signum, None)
