"""A run directory belongs to one job at a time.

Two jobs in one directory (the same command started twice, a copy started by mistake)
trained everything twice, interleaved their log rows, and one removed the other's checkpoint
as "left by an interrupted write". A job holds its directory's lock for its whole lifetime;
a second job on it is refused in one line before it writes anything. The lock is the
operating system's (flock, through filelock), released when the holder ends however it
ends, so the files a crashed job left are cleaned only by the job that holds the lock next.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from safetransfer.common.atomic import atomic_write_text
from safetransfer.common.errors import ConfigError, StorageError

LOCK, HOLDER = ".job.lock", ".job.holder"


def check_free(run_dir: Path) -> None:
    """Refuse (the ConfigError of `holding`) when another job holds `run_dir`; for a check before
    Hydra writes the job's .hydra/ files into it."""
    run_dir = Path(run_dir).absolute()
    if not (run_dir / LOCK).exists():
        return
    with holding(run_dir):
        pass


@contextlib.contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this job; a ConfigError naming the holder when another job holds it, or
    naming the file when the lock or the holder's note cannot be used (a folder, a link, read-only)."""
    run_dir = Path(run_dir).absolute()
    lock = FileLock(str(run_dir / LOCK))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        holder = run_dir / HOLDER
        who = holder.read_text().strip() if holder.is_file() else "another process"
        raise ConfigError(
            f"{run_dir} is in use by another job ({who}); wait for it to end, or run this one in another "
            "folder (hydra.run.dir=... or hydra.sweep.dir=...)"
        ) from None
    except OSError as error:
        raise unusable(Path(error.filename or run_dir / LOCK), error) from None
    try:
        note = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            atomic_write_text(run_dir / HOLDER, note)
        except StorageError as error:  # a folder in its place, a read-only folder
            raise unusable(run_dir / HOLDER, error) from None
        yield
    finally:
        lock.release()


def unusable(path: Path, error: BaseException) -> ConfigError:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
    return ConfigError(
        f"{path} cannot serve to hold the run folder for this job ({reason}); no job can take it as it is: "
        "remove it, or run in another folder (hydra.run.dir=... or hydra.sweep.dir=...)"
    )
