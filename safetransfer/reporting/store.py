"""The result store: one record per finished seed, in long format, in `<results.dir>/<table>.seeds.csv`.

A job appends its seeds under the table's lock (the file rewritten atomically: a reader sees
the whole file before or after); a seed finished again (the same setting and seed) replaces its
record. Every table, paired comparison, search choice and figure is a view of these records
(safetransfer/reporting/tables.py). A seed's own record stays its metrics.json; results written
before the store existed are imported from those files by `safetransfer-tables DIR ...`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from filelock import FileLock
from omegaconf import OmegaConf

from safetransfer.common.atomic import atomic_write_text, read_json, remove_stale_temporaries
from safetransfer.common.errors import ConfigError
from safetransfer.common.fingerprints import config_key, decisive
from safetransfer.reporting.methods import method_name, method_structure, source_label

log = logging.getLogger(__name__)

#: a record: the cell (backbone, source, target, sampling rate, method), its setting (the config
#: key, and the source file's digest when it read one), the seed and its numbers, where it ran
COLUMNS = [
    "setting",
    "key",
    "backbone",
    "source",
    "target",
    "sampling_rate",
    "method",
    "seed",
    "top1",
    "test_loss",
    "val_top1",
    "val_loss",
    "source_sha256",
    "wall_time_s",
    "run_dir",
    "published",
    "chosen",
    "finished",
    "structure",
    "settings",
]
CELL = ["backbone", "source", "target", "sampling_rate", "method"]
TEXT = ("setting", "key", "backbone", "source", "target", "method", "source_sha256", "run_dir", "published", "chosen")
#: digits of a sha256 shown in settings and labels
DIGEST = 12
#: the longest table name, in bytes: room for what is added to it (`_paper`, `_search`, `.seeds.csv`,
#: a temporary file's `.<name>.seeds.csv.XXXXXXXX.tmp`) within a file name's 255 bytes
TABLE_NAME_BYTES = 180
#: values that are paths on this machine: a shared table shows them by name (shown_path)
PATH_KEYS = ("target.root", "source.path", "target.sample_list", "pretrain.save_to")


def check_table_name(name: str, key: str) -> None:
    """A table name is a file name inside the results folder: no folders, no `..`, not too long.
    `key` names the setting (results.table, --name)."""
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
            f"(written as <name>.seeds.csv and <name>.md in {where}, which chooses the folder)"
        )


def shown_path(value: str) -> str:
    """A path as a shared table shows it: as given when relative, relative to the working folder
    when under it, else its last part only (`.../ants_bees`): no home folders or mount points."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        return value
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return f".../{path.name}" if path.name else value


def flat_settings(cfg) -> dict[str, object]:
    """The config's values that decide a result (fingerprints.decisive), as dotted keys; lists as JSON."""
    container = decisive(cfg)
    flat = pd.json_normalize(container, sep=".").iloc[0].to_dict() if container else {}
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}


def record(metrics: dict, run_dir: Path | str, chosen: str = "", local_paths: bool = False) -> dict:
    """The store's record of one finished seed, from what its metrics.json holds."""
    cfg = OmegaConf.create(metrics["config"])
    key = config_key(cfg)
    digest = (metrics.get("source_checkpoint") or {}).get("sha256") or ""
    settings = flat_settings(cfg)
    if digest:  # one config fine-tuned from two versions of a source file: two settings
        settings["source.sha256"] = digest[:DIGEST]
    if not local_paths:
        settings = {k: shown_path(str(v)) if k in PATH_KEYS and v is not None else v for k, v in settings.items()}
    results = cfg.get("results") or {}
    structure = dict(metrics.get("structure") or method_structure(cfg))
    structure["direction"] = str(structure["direction"]).lower()  # versions before the registry: its class name
    return {
        "setting": f"{key}:{digest[:DIGEST]}" if digest else key,
        "key": key,
        "backbone": str(cfg.backbone.name),
        "source": source_label(cfg.source),
        "target": str(cfg.target.name),
        "sampling_rate": float(cfg.target.sampling_rate),
        "method": metrics.get("method") or method_name(cfg),
        "seed": int(metrics["seed"]),
        "top1": float(metrics["top1"]),
        "test_loss": float(metrics.get("test_loss", math.nan)),
        "val_top1": float(metrics.get("val_top1", math.nan)),
        "val_loss": float(metrics.get("val_loss", math.nan)),
        "source_sha256": digest,
        "wall_time_s": float(metrics.get("wall_time_s", math.nan)),
        "run_dir": str(run_dir) if local_paths else shown_path(str(run_dir)),
        "published": str(results.get("published") or (results.get("paper") or {}).get("published") or ""),
        "chosen": chosen,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "structure": json.dumps(structure, sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True, default=str),
    }


def store_path(results_dir: Path, table: str) -> Path:
    return Path(results_dir) / f"{table}.seeds.csv"


def lock_for(results_dir: Path, table: str) -> FileLock:
    """The lock of a table's store and views: in <results.dir>/.locks/, out of the way of the tables."""
    folder = Path(results_dir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{table}.lock"))


def read(results_dir: Path, table: str) -> pd.DataFrame:
    """The table's records (none: an empty frame with the store's columns). A file that is not a store
    (damaged, another file in its place) is one line naming it; a record whose top-1 is not a finite
    number is named and left out."""
    path = store_path(results_dir, table)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(TEXT, str))
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        frame["top1"] = pd.to_numeric(frame["top1"], errors="coerce")
    except (OSError, ValueError, UnicodeDecodeError) as error:  # pandas' ParserError is a ValueError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"{path} is not a result store safetransfer can read ({type(error).__name__}: {reason}); move it "
            f"aside: `safetransfer-tables <run folders> --name {table}` rebuilds it from the seeds' metrics.json "
            "(finished seeds are kept in their run folders)"
        ) from None
    finite = frame["top1"].map(math.isfinite)
    if not finite.all():
        bad = list(frame.index[~finite][:5])
        log.warning("%s: %d records without a finite top-1 are left out (rows %s)", path, int((~finite).sum()), bad)
    return frame[finite].fillna({c: "" for c in TEXT}).reset_index(drop=True)


def append(results_dir: Path, table: str, records: Sequence[dict], render=None) -> pd.DataFrame:
    """Add `records` to the table's store, replacing earlier records of the same setting and seed;
    `render(frame)` (the views) runs under the same lock. Returns the store's records."""
    path = store_path(results_dir, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock_for(results_dir, table):
        remove_stale_temporaries(path)  # under the table's lock: no live writer's
        new = pd.DataFrame(list(records), columns=COLUMNS)
        earlier = read(results_dir, table)
        earlier = earlier.merge(new[["setting", "seed"]], how="left", indicator=True)
        earlier = earlier[earlier["_merge"] == "left_only"].drop(columns="_merge")
        frame = pd.concat([earlier[COLUMNS], new], ignore_index=True) if len(earlier) else new
        frame = frame.sort_values([*CELL, "setting", "seed"], kind="stable", ignore_index=True)
        atomic_write_text(path, frame.to_csv(index=False))
        if render is not None:
            render(frame)
    return frame


def records_under(directories: Iterable[Path], published: str | None = None) -> list[dict]:
    """A record for every finished seed (seed_*/metrics.json) under `directories`; the same seed
    of the same setting found twice counts once (the newest file wins)."""
    found = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("seed_*/metrics.json"), key=lambda p: p.stat().st_mtime):
            metrics = read_json(path, needs=("config", "seed", "top1"))
            if metrics is None:  # damaged: read_json said which
                continue
            top1 = metrics["top1"]
            if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
                log.warning("%s: top1 is %r, not a finite number; skipped", path, top1)
                continue
            entry = record(metrics, path.parent.parent)
            if published is not None:
                entry["published"] = published
            found[(entry["setting"], entry["seed"])] = entry
    return list(found.values())
