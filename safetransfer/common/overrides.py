"""Command-line overrides as Hydra parses them, read in one place: by safetransfer-train's
checks before Hydra composes anything, by safetransfer-reproduce to split a table's sweeps
from its other settings, and by the end-of-sweep report to count a multirun's jobs."""

from __future__ import annotations


def parse_overrides(arguments: list[str]) -> list | None:
    """The command line's overrides as Hydra parses them, or None when Hydra should judge them itself
    (config folders of the user's own: Hydra knows their groups and keys). An override Hydra's grammar
    does not take is a ConfigError naming it, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from safetransfer.common.errors import ConfigError

    if any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")) for a in arguments):
        return None
    parser, parsed = OverridesParser.create(), []
    for argument in (a for a in arguments if "=" in a and not a.startswith("-")):
        try:
            parsed += parser.parse_overrides([argument])
        except Exception as error:  # Hydra's OverrideParseException, its message over several lines
            first = str(error).splitlines()[0]
            reason = "a character it does not take unquoted" if first.startswith("LexerNoViable") else first
            raise ConfigError(
                f"{argument} is not an override Hydra can read ({reason}); quote a value with other characters "
                "(key='value'), see https://hydra.cc/docs/advanced/override_grammar/basic/"
            ) from None
    return parsed


def group_values(override) -> list[str] | None:
    """The choices a group override names (one, or a comma sweep); None for range() or glob()."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [str(v) for v in value.list]
    if isinstance(value, (str, int, float)) and not override.is_sweep_override():
        return [str(value)]
    return None


def split_sweeps(overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(sweeps: key -> values, the other overrides) of command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    sweeps, plain = {}, []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        value = override.value()
        if isinstance(value, ChoiceSweep):
            sweeps[override.key_or_group] = [str(v) for v in value.list]
        else:
            plain.append(text)
    return sweeps, plain


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, in job order, as Hydra's basic sweeper expands a sweep's overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
