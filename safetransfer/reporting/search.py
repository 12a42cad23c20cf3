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


def apply_chosen(cfg: DictConfig, method: str) -> bool:
    """Stage 2: set this job's cell's chosen values (search.chosen); whether any were set."""
    path = cfg.search.chosen
    if not path:
        return False
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
        return False  # a method without a grid keeps its preset values
    for key, value in entry["values"].items():
        OmegaConf.update(cfg, key, value, merge=False)
    return True


def choose(seeds: pd.DataFrame, grids: dict[str, list[str]]) -> dict:
    """Per cell of stage 1's finished seeds, the setting with the best mean validation top-1
    (ties: the first by config key) and its values of the searched keys."""
    from safetransfer.reporting.tables import CELL, best_by_validation

    settings = seeds.attrs.get("settings", {})
    keys = sorted({k for grid in grids.values() for k in grid_keys(grid)})
    cells = {}
    for cell, group in seeds.groupby(CELL, sort=True):
        if group["val_top1"].isna().any():
            raise ConfigError(
                f"{' / '.join(map(str, cell))}: search seeds without validation accuracy; the search "
                "needs search.val_fraction > 0"
            )
        best, means = best_by_validation(group)
        backbone, source, target, rate, method = cell
        values = {k: plain(settings[best][k]) for k in keys if k in settings[best]}
        cells[f"{backbone}|{source}|{target}|{float(rate):g}|{method}"] = {
            "values": values,
            "val_top1": float(means[best]),
            "settings_tried": int(len(means)),
            "seeds": int((group["key"] == best).sum()),
        }
    return cells


def write_chosen(path: Path, table: str, cells: dict, searched: list[str]) -> dict:
    chosen = {"table": table, "searched": sorted(searched), "cells": cells}
    atomic_write_json(path, chosen)
    return chosen


def chosen_notes(chosen: dict) -> list[str]:
    """Lines for the table: the values chosen per cell and the validation top-1 they reached."""
    lines = []
    for cell, entry in sorted(chosen["cells"].items()):
        _, _, target, rate, method = cell.split("|")
        values = " ".join(f"{k}={v}" for k, v in entry["values"].items())
        lines.append(
            f"- {target} {rate}% {method}: {values} (mean validation top-1 {entry['val_top1']:.2f}, "
            f"best of {entry['settings_tried']} settings)"
        )
    return lines
