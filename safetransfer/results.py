"""Results: per-seed metrics and table rows (mean +- sample std over seeds).

A table is `<results.dir>/<table>.csv` (the data) plus `<table>.md` (for reading).
Each job owns one row, keyed by a fingerprint of its config without the seeds and the
runtime settings: rerunning a config replaces its row, and a file lock serialises the
read-modify-write so that jobs finishing at once never lose a row.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from safetransfer.atomic import atomic_write_text
from safetransfer.paired import paired, paired_text, reference_column

#: config sections (and the launcher group, which only sets hydra.launcher) that change how a
#: job runs or where it writes, never its numbers; search: its chosen values are in the config
NOT_IN_KEY = ("seeds", "runtime", "results", "paths", "hydra", "logger", "search", "launcher")


def runtime_only(override: str) -> bool:
    """Whether a command-line override (`runtime.device=cuda`, `+search.seeds=[0]`) sets a key
    of NOT_IN_KEY, and so is left out of a row's overrides."""
    return re.split(r"[./=]", override.lstrip("+~"), maxsplit=1)[0] in NOT_IN_KEY  # hydra/launcher=... too


ROW_COLUMNS = ["backbone", "source", "target", "sampling_rate", "method", "mean", "std", "n_seeds",
               "accuracies", "seeds", "failed", "overrides", "key", "run_dir", "updated"]
#: derived from the rows each time the table is written: each row against its reference row
PAIRED_COLUMNS = ["reference", "paired_n", "paired_diff", "paired_low", "paired_high"]


def config_key(cfg: DictConfig) -> str:
    """Fingerprint of everything that determines a row's numbers (not seeds, not runtime)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for section in NOT_IN_KEY:
        container.pop(section, None)
    container.get("target", {}).pop("sample_list_dir", None)  # where a list is kept, not which list
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:12]


def summarize(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single seed is NaN."""
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan")
    return mean, std


def make_row(*, backbone: str, source: str, target: str, sampling_rate: float, method: str,
             seeds: Sequence[int], accuracies: Sequence[float], overrides: str, key: str, run_dir: str,
             failed: Sequence[int] = ()) -> dict:
    """A job's row: mean and sample std over its finished seeds; failed seeds only listed."""
    mean, std = summarize(accuracies)
    return {
        "backbone": backbone, "source": source, "target": target, "sampling_rate": sampling_rate,
        "method": method, "mean": mean, "std": std, "n_seeds": len(accuracies),
        "accuracies": ";".join(f"{a:.2f}" for a in accuracies), "seeds": ";".join(map(str, seeds)), "failed": ";".join(map(str, failed)),
        "overrides": overrides, "key": key, "run_dir": run_dir,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table_paths(results_dir: Path, table: str) -> tuple[Path, Path]:
    results_dir = Path(results_dir)
    return results_dir / f"{table}.csv", results_dir / f"{table}.md"


def read_table(results_dir: Path, table: str) -> pd.DataFrame:
    csv_path, _ = table_paths(results_dir, table)
    if not csv_path.exists():
        return pd.DataFrame(columns=ROW_COLUMNS)
    text_columns = ("overrides", "seeds", "failed", "accuracies", "key")
    return pd.read_csv(csv_path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(text_columns, str))


def write_row(results_dir: Path, table: str, row: dict) -> pd.DataFrame:
    """Insert or replace (same key) `row` in the table, under a lock; returns the new table."""
    csv_path, md_path = table_paths(results_dir, table)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(csv_path) + ".lock"):
        frame = read_table(results_dir, table)
        frame = frame[frame["key"] != row["key"]]
        frame = pd.concat([frame, pd.DataFrame([row], columns=ROW_COLUMNS)], ignore_index=True)
        frame = frame.sort_values(["backbone", "source", "target", "sampling_rate", "method", "overrides"],
                                  kind="stable", ignore_index=True)
        frame = with_paired(frame[ROW_COLUMNS])
        atomic_write_text(csv_path, frame.to_csv(index=False))
        atomic_write_text(md_path, to_markdown(frame))
    return frame


def per_seed(row) -> dict[int, float]:
    """{seed: top-1} of a row (its `seeds` and `accuracies`, both ';'-separated)."""
    if not isinstance(row["seeds"], str) or not row["seeds"]:
        return {}
    return dict(zip(map(int, row["seeds"].split(";")), map(float, str(row["accuracies"]).split(";"))))


def _other_settings(row) -> str:
    """The row's overrides without the method and the regularizer/direction/source it sets."""
    keys = ("method=", "regularizer=", "direction=", "source=")
    return " ".join(o for o in str(row["overrides"] or "").split() if not o.startswith(keys))


def with_paired(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row against its reference row (tables' rule: L2-SP for DTNH (L2-SP), L2-SP for
    L2-SP+BSS, Fine-tuning for the rest) with the same backbone, target, sampling rate and
    other settings: the mean difference of top-1 over the common seeds and its 95 % t
    interval. No reference, or more than one, leaves the columns empty."""
    frame = frame.copy()
    values = {c: [] for c in PAIRED_COLUMNS}
    for _, row in frame.iterrows():
        group = frame[(frame["backbone"] == row["backbone"]) & (frame["target"] == row["target"])
                      & (frame["sampling_rate"] == row["sampling_rate"])]
        group = group[[_other_settings(r) == _other_settings(row) for _, r in group.iterrows()]]
        reference = reference_column(row["method"], list(group["method"]))
        candidates = group[group["method"] == reference] if reference else group.iloc[0:0]
        if len(candidates) == 1:
            n, diff, low, high = paired(per_seed(row), per_seed(candidates.iloc[0]))
        else:
            reference, (n, diff, low, high) = "", (0, float("nan"), float("nan"), float("nan"))
        for column, value in zip(PAIRED_COLUMNS, (reference, n, diff, low, high)):
            values[column].append(value)
    for column, value in values.items():
        frame[column] = value
    return frame


def format_cell(mean: float, std: float) -> str:
    if pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(frame: pd.DataFrame) -> str:
    """The table for reading: one row per config, accuracy as mean ± std (two decimals)."""
    shown = pd.DataFrame({
        "backbone": frame["backbone"],
        "source": frame["source"],
        "target": frame["target"],
        "sampling (%)": frame["sampling_rate"].map(lambda r: f"{float(r):g}"),
        "method": frame["method"],
        "top-1 (%)": [format_cell(m, s) for m, s in zip(frame["mean"], frame["std"])],
        "seeds": frame["n_seeds"],
        "per seed": frame["accuracies"].str.replace(";", ", "),
        "overrides": frame["overrides"].fillna(""),
    })
    text = shown.to_markdown(index=False, disable_numparse=True) + "\n"
    compared = frame[frame["reference"].fillna("") != ""] if "reference" in frame else frame.iloc[0:0]
    if len(compared):
        second = pd.DataFrame({
            "target": compared["target"], "sampling (%)": compared["sampling_rate"].map(lambda r: f"{float(r):g}"),
            "method": compared["method"], "reference": compared["reference"],
            "ours − reference, 95 % interval (seeds)": [paired_text(int(r.paired_n), r.paired_diff, r.paired_low,
                                                                     r.paired_high) for r in compared.itertuples()],
        })
        text += ("\nPaired differences (seeds are shared across methods: same seed, sampled subset and data order): "
                 "mean of the row − its reference row over the common seeds, its 95 % t interval and the number of "
                 "seeds; * when the interval excludes zero.\n\n" + second.to_markdown(index=False, disable_numparse=True)
                 + "\n")
    return text
