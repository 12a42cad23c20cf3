"""Paired comparisons of methods: seeds are shared across methods (same seed, same sampled
subset, same data order), so a method is compared with its reference seed by seed.
Used by the per-job tables (results.py) and the paper-layout tables (tables.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from safetransfer.reporting.methods import SCRATCH, is_scratch


def scratch_column(method: str, methods: Sequence[str]) -> str | None:
    """The From scratch column a transfer method is also compared with (the transfer's gain):
    the one whose bracketed details ([backbone], ...) are all among the method's, if exactly one."""
    if is_scratch(method):
        return None
    details = set(_details(method))
    found = [m for m in methods if m.partition(" [")[0] == SCRATCH and set(_details(m)) <= details]
    return found[0] if len(found) == 1 else None


def _details(method: str) -> list[str]:
    """'L2-SP [resnet18, demo]' -> ['resnet18', 'demo']."""
    _, bracket, inside = method.partition(" [")
    return [part.strip() for part in inside.rstrip("]").split(",")] if bracket else []


def paired(ours: dict[int, float], reference: dict[int, float]) -> tuple[int, float, float, float]:
    """(common seeds, mean of ours - reference over them, its 95 % t interval); NaN below two seeds."""
    from scipy import stats

    common = sorted(set(ours) & set(reference))
    if len(common) < 2:
        return len(common), math.nan, math.nan, math.nan
    differences = [ours[s] - reference[s] for s in common]
    mean = statistics.fmean(differences)
    half = stats.t.ppf(0.975, len(common) - 1) * statistics.stdev(differences) / math.sqrt(len(common))
    return len(common), mean, mean - half, mean + half


def paired_text(n: int, difference: float, low: float, high: float) -> str:
    """'+1.20 [+0.35, +2.05] (5) *': * when the 95 % interval excludes zero."""
    if n < 2:
        return f"{n} common seed{'s' if n != 1 else ''}: no interval"
    mark = " *" if low > 0 or high < 0 else ""
    return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}] ({n}){mark}"
