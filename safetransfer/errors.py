"""The one exception type for bad input: its message is the single line the user sees."""


class ConfigError(ValueError):
    """Bad input, reported as one line that says what is wrong and how to fix it."""
