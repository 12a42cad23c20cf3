"""The one exception type for bad input: its message is the single line the user sees."""


class ConfigError(ValueError):
    """Bad input, reported as one line that says what is wrong and how to fix it."""


def one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it (the loader wraps it
    in the worker's traceback: its last line holds the message)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]
