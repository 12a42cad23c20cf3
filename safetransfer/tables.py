"""Paper-layout tables assembled from finished seeds: rows = target (x sampling rate),
columns = method, cells = mean ± std over the seeds found, with the seed count.

    safetransfer-tables multirun/2026-11-22/10-00-00-000000 --name dtnh_table2

Every `seed_*/metrics.json` under the given directories counts (partial sweeps too);
the same seed of the same cell found twice counts once (the newest file wins).
Cells with no finished seed are shown as missing, never dropped, when `--methods` or
`--targets` name what the table should hold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from safetransfer.experiment import method_name
from safetransfer.results import atomic_write_text, summarize

CELL = ["backbone", "source", "target", "sampling_rate", "method"]


def collect(directories: Iterable[Path]) -> pd.DataFrame:
    """One row per finished seed: the cell it belongs to, its seed and its top-1."""
    from omegaconf import OmegaConf

    rows = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("seed_*/metrics.json"), key=lambda p: p.stat().st_mtime):
            metrics = json.loads(path.read_text())
            cfg = OmegaConf.create(metrics["config"])
            cell = (cfg.backbone.name, cfg.source.name, cfg.target.name, float(cfg.target.sampling_rate),
                    method_name(cfg))
            rows[(*cell, metrics["seed"])] = (*cell, metrics["seed"], metrics["top1"])
    return pd.DataFrame(list(rows.values()), columns=[*CELL, "seed", "top1"])


def paper_layout(seeds: pd.DataFrame, methods: Sequence[str] | None = None,
                 targets: Sequence[str] | None = None) -> pd.DataFrame:
    """rows = (target, sampling rate), columns = method, cells = 'mean ± std (n)'."""
    cells = {}
    for (target, rate, method), group in seeds.groupby(["target", "sampling_rate", "method"]):
        mean, std = summarize(list(group["top1"]))
        spread = "" if pd.isna(std) else f" ± {std:.2f}"
        cells[(target, rate, method)] = f"{mean:.2f}{spread} ({len(group)})"
    methods = list(methods or sorted(seeds["method"].unique()))
    rates = sorted(seeds["sampling_rate"].unique()) or [100.0]
    targets = list(targets or sorted(seeds["target"].unique()))
    index = [(t, r) for t in targets for r in rates]
    table = pd.DataFrame([[cells.get((t, r, m), "missing") for m in methods] for t, r in index],
                         index=pd.MultiIndex.from_tuples(index, names=["target", "sampling (%)"]), columns=methods)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="safetransfer-tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--name", default="table", help="writes <results>/<name>.md and .csv")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--methods", nargs="*", help="the columns, in order (missing ones are shown)")
    parser.add_argument("--targets", nargs="*", help="the rows, in order (missing ones are shown)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        parser.exit(2, f"safetransfer-tables: error: no such directory: {', '.join(missing)}\n")
    table = paper_layout(collect(args.directories), args.methods, args.targets)
    atomic_write_text(args.results / f"{args.name}.csv", table.to_csv())
    markdown = table.reset_index().to_markdown(index=False, disable_numparse=True) + "\n"
    atomic_write_text(args.results / f"{args.name}.md", markdown)
    print(markdown, end="")
