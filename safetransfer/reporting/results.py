"""Results: per-seed metrics and table rows (mean +- sample std over seeds).

A table is `<results.dir>/<table>.csv` (the data) plus `<table>.md` (for reading).
Each job owns one row, keyed by a fingerprint of its config without the seeds and the
runtime settings: rerunning a config replaces its row, and a file lock serialises the
read-modify-write so that jobs finishing at once never lose a row.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from filelock import FileLock

from safetransfer.common.atomic import atomic_write_text, remove_stale_temporaries
from safetransfer.common.errors import ConfigError
from safetransfer.common.fingerprints import NOT_IN_KEY
from safetransfer.reporting.methods import SCRATCH, describe_reference, is_scratch, key_of, reference_key
from safetransfer.reporting.paired import paired, paired_text


def runtime_only(override: str) -> bool:
    """Whether a command-line override (`runtime.device=cuda`, `+search.seeds=[0]`) sets a key
    of NOT_IN_KEY, and so is left out of a row's overrides."""
    return re.split(r"[./=]", override.lstrip("+~"), maxsplit=1)[0] in NOT_IN_KEY  # hydra/launcher=... too


ROW_COLUMNS = [
    "backbone",
    "source",
    "target",
    "sampling_rate",
    "method",
    "mean",
    "std",
    "n_seeds",
    "accuracies",
    "seeds",
    "failed",
    "overrides",
    "key",
    "run_dir",
    "updated",
    "structure",  # methods.method_structure as JSON: the row's reference is found from it
]
#: derived from the rows each time the table is written: each row against its reference row
#: (paired_note: why a row has none), and a transfer row against the From scratch row
PAIRED_COLUMNS = ["reference", "paired_n", "paired_diff", "paired_low", "paired_high", "paired_note"]
SCRATCH_COLUMNS = ["scratch_n", "scratch_diff", "scratch_low", "scratch_high"]


def summarize(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single seed is NaN."""
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan")
    return mean, std


#: overrides whose values are paths on this machine: a shared table shows them by name (shown_path)
PATH_KEYS = ("target.root", "source.path", "target.sample_list", "pretrain.save_to")


def shown_path(value: str) -> str:
    """A path as a table meant to be shared shows it: as given when relative, relative to the
    working folder when under it, else its last part only (`.../ants_bees`): no home folders,
    user names or mount points of this machine."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        return value
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return f".../{path.name}" if path.name else value


def shared_overrides(overrides: str) -> str:
    """`overrides` with the values of PATH_KEYS shown by shown_path."""
    shown = []
    for override in overrides.split():
        key, equals, value = override.partition("=")
        shown.append(f"{key}={shown_path(value)}" if equals and key.lstrip("+~") in PATH_KEYS else override)
    return " ".join(shown)


def make_row(
    *,
    backbone: str,
    source: str,
    target: str,
    sampling_rate: float,
    method: str,
    seeds: Sequence[int],
    accuracies: Sequence[float],
    overrides: str,
    key: str,
    run_dir: str,
    failed: Sequence[int] = (),
    structure: dict | None = None,
    local_paths: bool = False,
) -> dict:
    """A job's row: mean and sample std over its finished seeds; failed seeds only listed;
    `structure` (methods.method_structure) finds its reference row. Paths of this machine (the
    run folder, PATH_KEYS in the overrides) are shown as shown_path shows them unless
    `local_paths` (results.local_paths); the run's own files keep them whole."""
    if not local_paths:
        overrides, run_dir = shared_overrides(overrides), shown_path(run_dir)
    mean, std = summarize(accuracies)
    return {
        "backbone": backbone,
        "source": source,
        "target": target,
        "sampling_rate": sampling_rate,
        "method": method,
        "mean": mean,
        "std": std,
        "n_seeds": len(accuracies),
        "accuracies": ";".join(repr(float(a)) for a in accuracies),  # full precision: every table rounds alike
        "seeds": ";".join(map(str, seeds)),
        "failed": ";".join(map(str, failed)),
        "overrides": overrides,
        "key": key,
        "run_dir": run_dir,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "structure": json.dumps(structure, sort_keys=True) if structure else "",
    }


#: the longest table name, in bytes: room for what is added to it (`_paper`, `_search_<method>`,
#: `.csv`, a temporary file's `.<name>.csv.XXXXXXXX.tmp`) within a file name's 255 bytes
TABLE_NAME_BYTES = 180


def check_table_name(name: str, key: str) -> None:
    """A table name is a file name inside the results folder: no folders, no `..`, not too long.
    `key` names the setting (results.table, results.paper.name, --name)."""
    join = " " if key.startswith("-") else "="
    why = None
    if not name or name in (".", ".."):
        why = "it is empty or a folder's name"
    elif any(c in name for c in ("/", "\\", "\0")) or name.startswith("~"):
        why = "it holds a path (a table is written inside the results folder)"
    elif len(name.encode()) > TABLE_NAME_BYTES:
        why = f"it is {len(name.encode())} bytes long, more than {TABLE_NAME_BYTES}"
    if why:
        where = "--results" if key.startswith("-") else "results.dir"
        raise ConfigError(
            f"{key}{join}{name} is not a table name: {why}; give a plain file name such as {key}{join}my_table "
            f"(written as <name>.csv and <name>.md in {where}, which chooses the folder)"
        )


def table_paths(results_dir: Path, table: str) -> tuple[Path, Path]:
    results_dir = Path(results_dir)
    return results_dir / f"{table}.csv", results_dir / f"{table}.md"


def read_table(results_dir: Path, table: str) -> pd.DataFrame:
    csv_path, _ = table_paths(results_dir, table)
    if not csv_path.exists():
        return pd.DataFrame(columns=ROW_COLUMNS)
    text_columns = ("overrides", "seeds", "failed", "accuracies", "key", "structure")
    return pd.read_csv(csv_path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(text_columns, str))


def lock_for(results_dir: Path, table: str) -> str:
    """The lock file of a table: in <results.dir>/.locks/, out of the way of the tables."""
    folder = Path(results_dir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{table}.lock")


def write_row(results_dir: Path, table: str, row: dict) -> pd.DataFrame:
    """Insert or replace (same key) `row` in the table, under a lock; returns the new table."""
    csv_path, md_path = table_paths(results_dir, table)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_for(results_dir, table)):
        for path in (csv_path, md_path):
            remove_stale_temporaries(path)  # under the table's lock: no live writer's
        frame = read_table(results_dir, table)
        frame = frame[frame["key"] != row["key"]]
        frame = pd.concat([frame, pd.DataFrame([row], columns=ROW_COLUMNS)], ignore_index=True)
        frame = frame.sort_values(
            ["backbone", "source", "target", "sampling_rate", "method", "overrides"], kind="stable", ignore_index=True
        )
        frame = with_paired(frame[ROW_COLUMNS])
        atomic_write_text(csv_path, frame.to_csv(index=False))
        atomic_write_text(md_path, to_markdown(frame))
    return frame


def per_seed(row) -> dict[int, float]:
    """{seed: top-1} of a row (its `seeds` and `accuracies`, both ';'-separated)."""
    if not isinstance(row["seeds"], str) or not row["seeds"]:
        return {}
    return dict(zip(map(int, row["seeds"].split(";")), map(float, str(row["accuracies"]).split(";"))))


#: override keys that name a row's method or source, shown in their own columns
GROUP_KEYS = ("method", "regularizer", "direction", "source")


def settings_of(row) -> dict[str, str]:
    """The row's command-line settings as {key: value}, without the group choices that name its
    method and source (their own columns). `++a.b=1` and `a.b=1` are one key."""
    found = {}
    overrides = row["overrides"] if isinstance(row["overrides"], str) else ""  # NaN: none
    for override in overrides.split():
        key, _, value = override.partition("=")
        if key.lstrip("+~") not in GROUP_KEYS:
            found[key.lstrip("+~")] = value
    return found


#: settings that belong to a method itself (its terms' coefficients): compared only where both rows have them
METHOD_KEYS = ("regularizer.", "direction.")


def comparable(row, other, source_keys: bool = True) -> bool:
    """Whether two rows differ only in their methods (and sources, unless `source_keys`): every
    other setting equal, and a method's own setting (regularizer.terms.l2sp.alpha) equal where
    both rows set it (L2-SP at alpha 0.1 is compared with Fine-tuning, which has no alpha)."""
    ours, theirs = settings_of(row), settings_of(other)
    for key in set(ours) | set(theirs):
        if not source_keys and key.startswith("source."):
            continue
        if key.startswith(METHOD_KEYS) and (key not in ours or key not in theirs):
            continue
        if ours.get(key) != theirs.get(key):
            return False
    return True


def with_paired(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row against its reference row (tables' rule: L2-SP for DTNH (L2-SP), L2-SP for
    L2-SP+BSS, Fine-tuning for the rest) from the same source, with the same backbone, target,
    sampling rate and other settings: the mean difference of top-1 over the common seeds and
    its 95 % t interval; paired_note says why a row has no reference. A transfer row is also
    compared with the From scratch row of the same backbone, target, rate and settings."""
    frame = frame.copy()
    values = {c: [] for c in PAIRED_COLUMNS + SCRATCH_COLUMNS}
    empty = (0, float("nan"), float("nan"), float("nan"))
    for _, row in frame.iterrows():
        group = frame[
            (frame["backbone"] == row["backbone"])
            & (frame["target"] == row["target"])
            & (frame["sampling_rate"] == row["sampling_rate"])
        ]
        same = group[[comparable(row, r) for _, r in group.iterrows()]]
        reference, note, numbers = "", "", empty
        structure = structure_of(row)
        wanted = reference_key(structure) if structure else None
        if structure is None:
            note = "no method structure recorded (a row of an older version): rerun its job to pair it"
        elif wanted is not None:
            candidates = same[
                [
                    r["source"] == row["source"]
                    and (s := structure_of(r)) is not None
                    and not s.get("scratch")
                    and key_of(s) == wanted
                    for _, r in same.iterrows()
                ]
            ]
            if len(candidates) == 1:
                reference, numbers = candidates.iloc[0]["method"], paired(per_seed(row), per_seed(candidates.iloc[0]))
            elif len(candidates) > 1:
                note = (
                    f"{len(candidates)} rows of {describe_reference(structure)} from {row['source']} with the "
                    f"same settings (runs {', '.join(candidates['key'])}): which is the reference is ambiguous"
                )
            else:
                note = (
                    f"no row of {describe_reference(structure)} from {row['source']} with the same backbone, "
                    "sampling rate and settings"
                )
        scratch = group[[r["method"] == SCRATCH and comparable(row, r, source_keys=False) for _, r in group.iterrows()]]
        against = (
            paired(per_seed(row), per_seed(scratch.iloc[0]))
            if len(scratch) == 1 and not is_scratch(row["method"])
            else empty
        )
        for column, value in zip(PAIRED_COLUMNS + SCRATCH_COLUMNS, (reference, *numbers, note, *against)):
            values[column].append(value)
    for column, value in values.items():
        frame[column] = value
    return frame


def structure_of(row) -> dict | None:
    """A row's method structure (methods.method_structure), None when it has none recorded."""
    text = row.get("structure") if hasattr(row, "get") else None
    return json.loads(text) if isinstance(text, str) and text else None


def format_cell(mean: float, std: float) -> str:
    if pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def setting_columns(frame: pd.DataFrame) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The settings that differ between rows, a column each ({key: value per row}, "" where a
    row has none), and those all rows share ({key: value})."""
    settings = [settings_of(row) for _, row in frame.iterrows()]
    keys = sorted(set().union(*settings)) if settings else []
    varied = {k: [s.get(k, "") for s in settings] for k in keys if len({s.get(k) for s in settings}) > 1}
    shared = {k: settings[0][k] for k in keys if k not in varied}
    return varied, shared


def short_key(key: str, keys) -> str:
    """The shortest tail of a dotted key that no other key ends with: regularizer.terms.l2sp.alpha -> l2sp.alpha."""
    parts = key.split(".")
    for length in range(1, len(parts) + 1):
        tail = ".".join(parts[-length:])
        if length > 1 or key.count(".") == 0:
            if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
                return tail
    return key


def to_markdown(frame: pd.DataFrame) -> str:
    """The table for reading: one row per config, accuracy as mean ± std (two decimals), the
    settings that differ between rows as columns of their own (the CSV keeps all overrides)."""
    varied, shared = setting_columns(frame)
    shown = pd.DataFrame(
        {
            "backbone": frame["backbone"],
            "source": frame["source"],
            "target": frame["target"],
            "sampling (%)": frame["sampling_rate"].map(lambda r: f"{float(r):g}"),
            "method": frame["method"],
            **{short_key(k, varied): v for k, v in varied.items()},
            "top-1 (%)": [format_cell(m, s) for m, s in zip(frame["mean"], frame["std"])],
            "seeds": frame["n_seeds"],
            "per seed": [
                ", ".join(f"{float(a):.2f}" for a in str(value).split(";") if a) for value in frame["accuracies"]
            ],
        }
    )
    text = shown.to_markdown(index=False, disable_numparse=True) + "\n"
    if shared:
        text += "\nEvery row: " + " ".join(f"{k}={v}" for k, v in shared.items()) + "\n"
    lines = []
    for index, row in enumerate(frame.itertuples()):
        where = f"{row.target} {float(row.sampling_rate):g}% {row.source}"
        method = " ".join([row.method, *(f"{short_key(k, varied)}={v[index]}" for k, v in varied.items() if v[index])])
        if getattr(row, "reference", "") or getattr(row, "paired_note", ""):
            interval = (
                paired_text(int(row.paired_n), row.paired_diff, row.paired_low, row.paired_high)
                if row.reference
                else f"none: {row.paired_note}"
            )
            lines.append((where, method, row.reference or "", interval))
        if getattr(row, "scratch_n", 0):
            lines.append(
                (
                    where,
                    method,
                    SCRATCH,
                    paired_text(int(row.scratch_n), row.scratch_diff, row.scratch_low, row.scratch_high),
                )
            )
    if lines:
        second = pd.DataFrame(
            lines,
            columns=["target, sampling, source", "method", "reference", "ours − reference, 95 % interval (seeds)"],
        )
        text += (
            "\nPaired differences (seeds are shared across methods: same seed, sampled subset and data order): "
            "mean of the row − its reference row over the common seeds, its 95 % t interval and the number of "
            "seeds; * when the interval excludes zero. A transfer row is also compared with From scratch.\n\n"
            + second.to_markdown(index=False, disable_numparse=True)
            + "\n"
        )
    return text
