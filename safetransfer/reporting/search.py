"""The papers' per-cell search: "cross validation has been done for searching the best
regularization coefficient" (DTNH), an lr of 0.01 or 0.001 "depending on the task" (BSS).

Stage 1 trains every setting of a method's grid (`search.grids.<method>`) on a validation
split held out of the training images (`search.val_fraction`), with `search.seeds`; per
cell (backbone, source, target, sampling rate, method) the setting with the best mean
validation top-1 is chosen (the test split never takes part) and written to chosen.json.
Stage 2 trains every cell on its whole training split with the table's seeds: a job given
`search.chosen=<chosen.json>` takes its cell's chosen values before anything else.
`safetransfer-reproduce` (safetransfer/commands/reproduce.py) runs both stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from safetransfer.common.atomic import atomic_write_json, plain
from safetransfer.common.errors import ConfigError
from safetransfer.reporting.methods import source_label


def cell_id(cfg: DictConfig, method: str) -> str:
    return (
        f"{cfg.backbone.name}|{source_label(cfg.source)}|{cfg.target.name}|{float(cfg.target.sampling_rate):g}|{method}"
    )


def grid_keys(grid: list[str]) -> list[str]:
    """The keys a grid's sweep overrides set ("regularizer.terms.l2sp.alpha=0.01,0.1" -> its key)."""
    return [override.split("=", 1)[0].lstrip("+") for override in grid]


def apply_chosen(cfg: DictConfig, method: str) -> str:
    """Stage 2: set this job's cell's chosen values (search.chosen); returns them as text ("" for none)."""
    path = cfg.search.chosen
    if not path:
        return ""
    try:
        chosen = json.loads(Path(path).read_text())
        cells, searched = chosen["cells"], chosen["searched"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"search.chosen={path}: not a readable chosen.json of a finished search ({error}); "
            "rerun the table command to write it"
        ) from None
    entry = cells.get(cell_id(cfg, method))
    if entry is None:
        if method in searched:
            raise ConfigError(
                f"search.chosen={path} has no setting for {cell_id(cfg, method)}: its search did not "
                "finish; rerun the table command (finished search jobs are kept)"
            )
        return ""  # a method without a grid keeps its preset values
    declared = {k for grid in cfg.search.grids.values() for k in grid_keys(list(grid))}
    foreign = sorted(k for k in entry["values"] if k not in declared or "_target_" in k)
    if foreign:  # a file never sets what its search did not declare (a `_target_` would name code to run)
        raise ConfigError(
            f"search.chosen={path} sets {', '.join(foreign)} for {cell_id(cfg, method)}, which no grid of "
            f"search.grids declares ({', '.join(sorted(declared)) or 'none'}); nothing was run: rerun the table "
            "command to write chosen.json anew"
        )
    for key, value in entry["values"].items():
        OmegaConf.update(cfg, key, value, merge=False)
    tried = f" (of {entry['settings_tried']} settings)" if entry.get("settings_tried", 1) > 1 else ""
    return " ".join(f"{k}={v}" for k, v in entry["values"].items()) + tried


def choose(records: pd.DataFrame, grids: dict[str, list[str]]) -> dict:
    """Per cell of stage 1's finished seeds (the store's records), the setting with the best mean
    validation top-1 (tables.select) and its values of the searched keys."""
    from safetransfer.reporting.tables import cells as settings_of
    from safetransfer.reporting.tables import select

    table = settings_of(records)
    missing = table[table["val_mean"].isna()]
    if len(missing):
        cell = missing.iloc[0]
        raise ConfigError(
            f"{cell['target']} / {cell['method']}: search seeds without validation accuracy; the search "
            "needs search.val_fraction > 0"
        )
    keys = sorted({k for grid in grids.values() for k in grid_keys(grid)})
    chosen, _, _ = select(table)
    return {
        f"{c.backbone}|{c.source}|{c.target}|{float(c.sampling_rate):g}|{c.method}": {
            "values": {k: plain(c.settings[k]) for k in keys if k in c.settings},
            "val_top1": float(c.val_mean),
            "settings_tried": int(c.settings_tried),
            "seeds": int(c.seeds),
        }
        for c in chosen.itertuples()
    }


def write_chosen(path: Path, table: str, cells: dict, searched: list[str]) -> dict:
    chosen = {"table": table, "searched": sorted(searched), "cells": cells}
    atomic_write_json(path, chosen)
    return chosen
