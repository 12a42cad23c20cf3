"""Work in child processes that stop with the job: runtime.concurrent_seeds runs each seed so.

Each child runs in a process group of its own, so that a stop request reaches it once,
forwarded by the job's process (a terminal's Ctrl-C and a signal to the job's group reach
only the job's process; sent to the children as well, a Ctrl-C would arrive twice, and a
second Ctrl-C stops at once, without a checkpoint). A child whose parent dies (SIGKILL,
an out-of-memory kill) sends itself SIGTERM, which its stop handler turns into a checkpoint
and an exit. Each child sends back what its task returned or raised, through a pipe; a
child that ends without sending anything is reported as such, never waited for.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch

log = logging.getLogger(__name__)

#: seconds between a child's looks at whether its parent is still there
WATCH_S = 1.0
#: seconds the children get to stop after a second Ctrl-C (or an error in the parent) before they are killed
GRACE_S = 60.0


@dataclass
class Outcome:
    """What a child's task returned (`value`) or raised (`error`); `exitcode` when it sent nothing."""

    value: Any = None
    error: BaseException | None = None
    exitcode: int | None = None


def watch_parent(parent: int) -> None:
    """SIGTERM to this process once `parent` is no longer its parent (it died)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        log.warning("the job's process %d ended: stopping (checkpoint first)", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child(task: Callable, args: tuple, parent: int, results) -> None:
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # stop requests come forwarded by the job's process, once
    watch_parent(parent)
    try:
        outcome = Outcome(value=task(*args))
    except BaseException as error:  # sent back: the parent decides (Preempted, a one-line error, ...)
        try:
            pickle.loads(pickle.dumps(error))  # some exceptions pickle but cannot be rebuilt
            outcome = Outcome(error=error)
        except Exception:
            outcome = Outcome(error=RuntimeError(f"{type(error).__name__}: {error}"))
    try:
        results.send(outcome)
        results.close()
    except OSError:  # the job's process is gone (killed): no one to tell; its checkpoint is written
        pass


def run_each(task: Callable, work: dict[Any, tuple], stop=None, poll_s: float = 0.2) -> dict[Any, Outcome]:
    """task(*work[key]) for every key at once, a spawned process each; `stop` (a
    common.signals.StopSignals of this process) is forwarded to the children when it is raised.
    A second Ctrl-C here (KeyboardInterrupt) is forwarded too, then the children get GRACE_S
    seconds before they are killed."""
    context = torch.multiprocessing.get_context("spawn")
    processes, pipes = {}, {}
    for key, args in work.items():
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(task, args, os.getpid(), send), name=f"safetransfer-{key}")
        process.start()
        send.close()  # the child holds the only write end: end of file means it ended
        processes[key], pipes[key] = process, receive
    outcomes: dict[Any, Outcome] = {}
    forwarded = None
    try:
        while len(outcomes) < len(processes):
            waiting = {pipes[key]: key for key in processes if key not in outcomes}
            for pipe in wait(list(waiting), timeout=poll_s):
                key = waiting[pipe]
                try:
                    outcomes[key] = pipe.recv()
                except EOFError:  # it ended without a word (killed, or it died before its task began)
                    processes[key].join()
                    outcomes[key] = Outcome(exitcode=processes[key].exitcode)
                except Exception as error:  # an outcome that cannot be read back: that child's failure alone
                    outcomes[key] = Outcome(error=RuntimeError(f"{key}: its outcome could not be read back ({error})"))
            signum = stop.requested if stop is not None else None
            if signum is not None and forwarded is None:
                forwarded = signum
                send_signal(processes, outcomes, signum)
    except BaseException:
        send_signal(processes, outcomes, signal.SIGINT)  # after a forwarded one: stop at once
        deadline = time.monotonic() + GRACE_S
        for process in processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        raise
    for process in processes.values():  # each has sent its outcome: it is ending
        process.join(GRACE_S)
        if process.is_alive():
            log.warning("%s did not exit %.0f s after sending its outcome: killed", process.name, GRACE_S)
            process.kill()
            process.join()
    return outcomes


def send_signal(processes: dict, outcomes: dict, signum: int) -> None:
    for key, process in processes.items():
        if key not in outcomes and process.is_alive():
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
