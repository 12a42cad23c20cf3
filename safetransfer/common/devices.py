"""Where a job runs: the device a config names, and GPU leases that give each of a
machine's parallel jobs (the joblib launcher) a device of its own.

Nothing here schedules jobs: Hydra's launchers do.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """runtime.device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def lease_dir() -> Path:
    return Path(tempfile.gettempdir()) / "safetransfer-gpu-leases"


@contextlib.contextmanager
def lease_device(count: int, directory: Path | None = None, poll_s: float = 2.0) -> Iterator[str]:
    """Hold one of `count` CUDA devices for this process: the first whose lock file is free.
    Jobs that run side by side on one machine (the joblib launcher) each get their own
    GPU; a job finding all taken waits for one."""
    directory = directory or lease_dir()
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(count):
            lock = FileLock(str(directory / f"cuda{index}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                log.info("leased cuda:%d", index)
                yield f"cuda:{index}"
                return
            finally:
                lock.release()
        if not waited:
            log.info("all %d GPUs are leased by other jobs; waiting for one", count)
            waited = True
        time.sleep(poll_s)


@contextlib.contextmanager
def job_device(cfg):
    """runtime.device=lease: hold a GPU of this machine no other job holds, for the whole job."""
    if cfg.runtime.device != "lease":
        yield
        return
    with lease_device(torch.cuda.device_count()) as device:
        cfg.runtime.device = device
        yield
