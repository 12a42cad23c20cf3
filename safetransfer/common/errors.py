"""The kinds of failure reported as one line that says what is wrong and how to fix it
(never a traceback): bad input, a file that cannot be written, a download that failed."""


class SafetransferError(Exception):
    """A failure the user fixes: its message is the single line they see."""


class ConfigError(SafetransferError, ValueError):
    """Bad input: a config value or option, or a file the config names that is missing or malformed."""


class MissingData(ConfigError):
    """Data or a checkpoint that is not there and that safetransfer cannot download (a dataset
    whose official download is gone, the user's own files, a source made by a pretraining
    run): the message says how to get it and where to put it."""


class StorageError(SafetransferError):
    """A file could not be written (a full disk, a folder without write permission); `reason`
    is the system's word for it ("No space left on device")."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries (runtime.concurrent_seeds)
        return StorageError, (str(self), self.reason)


class DownloadError(SafetransferError):
    """A download failed, or what it fetched does not match its pinned checksum."""


def one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it (the loader wraps it
    in the worker's traceback: its last line holds the message)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]
