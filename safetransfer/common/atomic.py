"""Files written whole or not at all, and JSON files read back without trusting them.

Every result, checkpoint and cache file of a run goes through here: a crash, a kill or a
full disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from safetransfer.common.errors import ConfigError, StorageError

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    The file gets the mode a plain open() gives (0666 less the umask), not mkstemp's 0600,
    so that results on a shared disk are readable by whoever the umask lets read them."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, a folder that is not writable: one line
            reason = error.strerror or str(error)
            raise StorageError(
                f"writing {path} failed ({reason}); "
                f"{'the earlier file is kept; ' if path.exists() else ''}free space in {path.parent} "
                "(or make it writable) and rerun the same command: what is finished is kept",
                reason,
            ) from None
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files interrupted writes of `path` left beside it (atomic_write_bytes's
    `.<name>.XXXXXXXX.tmp`, a cache builder's `<name>.<pid>.tmp` or `<name>.tmp`). Only while holding
    the lock every writer of `path` holds: then none of them belongs to a live writer."""
    name = glob.escape(Path(path).name)
    folder = Path(path).parent
    for pattern in (f".{name}.*.tmp", f"{name}.*.tmp", f"{name}.tmp"):
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", stale)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def plain(value):
    """A NumPy scalar (as pandas gives them) as the Python value it holds, for JSON."""
    return value.item() if hasattr(value, "item") else value


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: Path, needs: Sequence[str] = ()) -> dict | None:
    """A JSON file written by a run (metrics.json, spectrum.json), or None with a warning that
    names it when it is truncated, malformed or lacks a key of `needs` (a crash or a full disk
    can leave such a file; the caller skips it, or trains that seed again)."""
    try:
        data = json.loads(Path(path).read_text())
        missing = [key for key in needs if key not in data]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return data
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        log.warning("%s is unreadable (%s: %s); skipped", path, type(error).__name__, error)
        return None


def read_torch(path: Path) -> Any:
    """A cached torch object read back as CPU tensors, without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def built_once(
    path: Path,
    build: Callable[[], Any],
    what: str,
    read: Callable[[Path], Any] = read_torch,
    write: Callable[[Any, Path], None] = lambda built, path: atomic_torch_save(built, path),
) -> Any:
    """The object cached at `path`: built by `build()` and written atomically by `write` on
    first use, under a file lock so that concurrent jobs build it once, then `read` back. A
    file that cannot be read (damaged: a full disk, a copy cut short) is named in a warning
    and built again. Used by the demo source, the terms' caches and the decoded images."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return read(path)
            except Exception as error:  # truncated zip or .npy, unpickling error, the wrong length ...
                first = str(error).splitlines()[0] if str(error) else ""
                log.warning("%s cannot be read (%s: %s); %s is built again", path, type(error).__name__, first, what)
                path.unlink()
        remove_stale_temporaries(path)  # under the lock: no live builder's
        write(build(), path)
        return read(path)


def check_writable(directory: Path, key: str, example: str = "safetransfer-results") -> None:
    """`directory` exists (made if need be), is a directory and takes a file; else one line.
    `key` names the setting: `results.dir`, or a command's option such as `--out`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-") as handle:  # a byte: a full disk
            handle.write(b"x")  # lets a file be made but not written
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        join = " " if key.startswith("-") else "="  # a command's option, or a config key
        raise ConfigError(
            f"{key}{join}{directory} is not a writable directory ({error.strerror or error}); "
            f"choose one you can write to, e.g. {key}{join}{Path.home() / example}"
        ) from None
