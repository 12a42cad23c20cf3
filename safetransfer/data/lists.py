"""The lines of a dataset's list files (official split files, the BSS authors' sample lists, a
user's own): UTF-8 text, one entry a line. A file that is not UTF-8 is one line naming the file,
the line and the bytes, not a UnicodeDecodeError traceback."""

from __future__ import annotations

from pathlib import Path

from safetransfer.common.errors import ConfigError


def list_lines(path: Path, setting: str) -> list[str]:
    """The non-empty lines of `path`, stripped; `setting` says where the file comes from (the key
    that names it, or the dataset's folder), for the message."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{setting}: {path} is not UTF-8 text: line {line} holds the bytes "
            f"{data[error.start : error.end + 3]!r} at byte {error.start}; save it as UTF-8 (or replace it with "
            "the published file)"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]
