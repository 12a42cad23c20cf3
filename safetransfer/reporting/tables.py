"""Paper-layout tables assembled from finished seeds: rows = target (x sampling rate),
columns = method, cells = mean ± std over the seeds found (with their count), and
beside each cell the paper's published value and our difference to it.

    safetransfer-tables multirun/2026-11-22/10-00-00-000000 --name dtnh_table2 --published dtnh_table2

Every `seed_*/metrics.json` under the given directories counts (partial sweeps too);
the same seed of the same setting found twice counts once (the newest file wins).

Hyper-parameter search: when a cell holds several settings (a grid over alpha, beta,
eta, k, ...), the setting with the best mean *validation* accuracy is chosen (runs need
target.val_fraction > 0) and that setting's test accuracy is reported, with the chosen
values in the CSV. The test accuracy never takes part in the choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import pandas as pd
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from safetransfer.common.atomic import atomic_write_text, check_writable, plain, read_json, remove_stale_temporaries
from safetransfer.common.errors import ConfigError
from safetransfer.common.fingerprints import config_key, decisive
from safetransfer.reporting.methods import (
    is_scratch,
    key_of,
    method_name,
    method_structure,
    reference_key,
    source_label,
)
from safetransfer.reporting.paired import paired, paired_text, scratch_column
from safetransfer.reporting.results import check_table_name, format_cell, lock_for, short_key, summarize

log = logging.getLogger(__name__)

CELL = ["backbone", "source", "target", "sampling_rate", "method"]
ROWS = ["target", "sampling_rate"]
QUANTITIES = [
    "mean",
    "std",
    "seeds",
    "published",
    "published_std",
    "diff",
    "within",
    "val_mean",
    "settings",
    "chosen",
    "reference",
    "paired_n",
    "paired_diff",
    "paired_low",
    "paired_high",
    "scratch",
    "scratch_n",
    "scratch_diff",
    "scratch_low",
    "scratch_high",
]
#: A row of a paper's table that stands for several of our rows. The DTNH tables print one
#: "Caltech 256" row although the paper trains on 30 or 60 images per class and does not say
#: which its table shows: its value is shown beside both, with a footnote.
SHARED_PAPER_ROWS = {"caltech256": ("caltech256_30", "caltech256_60")}
SHARED_ROW_NOTE = (
    "† The paper's table has one Caltech 256 row and does not say whether it is the 30 or the "
    "60 images per class split; its value is shown beside both."
)


def collect(directories: Iterable[Path]) -> pd.DataFrame:
    """One row per finished seed: its cell, its setting (config key), seed, test and validation top-1."""
    rows, settings, structures = {}, {}, {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("seed_*/metrics.json"), key=lambda p: p.stat().st_mtime):
            metrics = read_json(path, needs=("config", "seed", "top1"))
            if metrics is None:
                continue
            cfg = OmegaConf.create(metrics["config"])
            key, digest = config_key(cfg), (metrics.get("source_checkpoint") or {}).get("sha256")
            if digest:  # one config fine-tuned from two versions of a source file: two settings, not one
                key = f"{key}:{digest[:12]}"
            cell = (
                cfg.backbone.name,
                source_label(cfg.source),
                cfg.target.name,
                float(cfg.target.sampling_rate),
                metrics.get("method") or method_name(cfg),
            )  # runs before the name was saved: from the config
            rows[(key, metrics["seed"])] = (
                *cell,
                key,
                metrics["seed"],
                metrics["top1"],
                metrics.get("val_top1", math.nan),
            )
            settings[key] = {**flat_settings(cfg), **({"source_checkpoint.sha256": digest} if digest else {})}
            structures[key] = metrics.get("structure") or method_structure(cfg)  # older runs: from the config
    frame = pd.DataFrame(list(rows.values()), columns=[*CELL, "key", "seed", "top1", "val_top1"])
    frame.attrs["settings"], frame.attrs["structures"] = settings, structures
    return frame


def flat_settings(cfg: DictConfig) -> dict[str, object]:
    """The config's values that decide a result (fingerprints.decisive), as dotted keys."""
    container = decisive(cfg)
    return {
        key: json.dumps(value) if isinstance(value, list) else value
        for key, value in pd.json_normalize(container, sep=".").iloc[0].items()
    }


def varied_keys(settings: Sequence[dict[str, object]]) -> list[str]:
    """The keys whose values differ between settings (what a grid search varied)."""
    keys = sorted(set().union(*settings))
    return [k for k in keys if len({json.dumps(s.get(k), default=str) for s in settings}) > 1]


def best_by_validation(group: pd.DataFrame) -> tuple[str, pd.Series]:
    """The setting (config key) of a cell's seeds with the best mean validation top-1, ties going
    to the first by key, and every setting's mean; the test top-1 is never looked at."""
    means = group.groupby("key", sort=True)["val_top1"].mean()
    return str(means.idxmax()), means


def select(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per cell. A cell with several settings keeps the one with the best mean
    validation top-1 (ties: the first by config key); the test top-1 is never looked at."""
    settings = seeds.attrs.get("settings", {})
    cells = []
    for cell, group in seeds.groupby(CELL, sort=True):
        by_setting = {key: g for key, g in group.groupby("key", sort=True)}
        if len(by_setting) > 1:
            missing = [k for k, g in by_setting.items() if g["val_top1"].isna().any()]
            if missing:
                varied = varied_keys([settings.get(k, {}) for k in by_setting])
                raise ConfigError(
                    f"{' / '.join(map(str, cell))} holds {len(by_setting)} settings that differ in "
                    f"{', '.join(varied) or 'their configs'}, and some have no validation accuracy to choose between "
                    "them: settings meant as rows of their own need names of their own (e.g. target.name=... for "
                    "datasets) or a table each; a grid search needs target.val_fraction=0.2 (the test split is "
                    "never used to choose)"
                )
            chosen = best_by_validation(group)[0]
        else:
            chosen = next(iter(by_setting))
        best = by_setting[chosen].sort_values("seed")
        varied = varied_keys([settings.get(k, {}) for k in by_setting]) if len(by_setting) > 1 else []
        mean, std = summarize(list(best["top1"]))
        cells.append(
            {
                **dict(zip(CELL, cell)),
                "mean": mean,
                "std": std,
                "seeds": len(best),
                "val_mean": best["val_top1"].mean() if best["val_top1"].notna().all() else math.nan,
                "settings": len(by_setting),
                "key": chosen,
                "per_seed": dict(zip(best["seed"].astype(int), best["top1"].astype(float))),
                "chosen": " ".join(f"{k}={settings[chosen][k]}" for k in varied),
                "structure": seeds.attrs.get("structures", {}).get(chosen),
            }
        )
    frame = pd.DataFrame(
        cells,
        columns=[*CELL, "mean", "std", "seeds", "val_mean", "settings", "key", "chosen", "per_seed", "structure"],
    )
    return frame.assign(method=column_labels(frame))


def search_table(seeds: pd.DataFrame) -> pd.DataFrame:
    """Every setting of every cell that holds several (a grid search): one row each, the swept
    values as columns, validation and test top-1 as mean ± std over its seeds, the chosen one
    (best mean validation top-1, as select chooses) marked. Empty when no cell was searched."""
    settings = seeds.attrs.get("settings", {})
    rows, keys = [], set()
    for cell, group in seeds.groupby(CELL, sort=True):
        if group["key"].nunique() < 2 or group["val_top1"].isna().any():
            continue
        chosen, _ = best_by_validation(group)
        varied = varied_keys([settings.get(k, {}) for k in group["key"].unique()])
        keys.update(varied)

        def order(item, varied=varied):  # the settings in the order of their swept values (numbers as numbers)
            return tuple(
                (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                for v in (settings.get(item[0], {}).get(k) for k in varied)
            )

        for key, runs in sorted(group.groupby("key", sort=True), key=order):
            val, test = summarize(list(runs["val_top1"])), summarize(list(runs["top1"]))
            rows.append(
                {
                    **dict(zip(CELL, cell)),
                    **{k: settings.get(key, {}).get(k) for k in varied},
                    "val top-1 (%)": format_cell(*val),
                    "test top-1 (%)": format_cell(*test),
                    "seeds": len(runs),
                    "chosen": "✓" if key == chosen else "",
                    "key": key,
                }
            )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["sampling_rate"] = frame["sampling_rate"].map(lambda r: f"{float(r):g}")
    frame = frame.rename(columns={**{k: short_key(k, keys) for k in keys}, "sampling_rate": "sampling (%)"})
    return frame.drop(columns=[c for c in ("backbone", "source") if frame[c].nunique() == 1])


def column_labels(cells: pd.DataFrame) -> list[str]:
    """The method, with its source (and backbone) in brackets when the table mixes several:
    `L2-SP [pretrained:vehicles]` beside `L2-SP [demo]`. From scratch needs no source, and
    does not count as one: beside it, the transfer columns of one source keep plain names."""
    transfer = cells[[not is_scratch(m) for m in cells["method"]]]
    parts = [c for c in ("backbone", "source") if (cells if c == "backbone" else transfer)[c].nunique() > 1]
    labels = []
    for method, (_, row) in zip(cells["method"], cells.iterrows()):
        shown = [str(row[p]) for p in parts if not (p == "source" and is_scratch(method))]
        labels.append(f"{method} [{', '.join(shown)}]" if shown else method)
    return labels


def expand_methods(methods: Sequence[str] | None, labels: Sequence[str]) -> list[str] | None:
    """--methods as typed: a column label (`Fine-tuning [demo]`) is itself; a plain method name
    (`Fine-tuning`) stands for every column of that method (`Fine-tuning [demo]`, `[imagenet]`)."""
    if not methods:
        return None
    expanded = []
    for name in methods:
        matches = [label for label in dict.fromkeys(labels) if label == name or label.partition(" [")[0] == name]
        if not matches:
            log.warning(
                "--methods %r matches no column (the columns: %s); it is shown as missing",
                name,
                ", ".join(dict.fromkeys(labels)),
            )
        expanded += matches if name not in labels and matches else [name]
    return list(dict.fromkeys(expanded))


def published_values(table: str, path: Path | None = None) -> pd.DataFrame:
    """The paper's values of `table`: target, sampling_rate, method, top1, std and paper_row
    (the paper's own row name; it differs from target where one paper row stands for
    several of ours, see SHARED_PAPER_ROWS). NaN where a value is not known."""
    if path is None:
        path = resources.files("safetransfer.reporting").joinpath("published.csv")
    with Path(str(path)).open() as handle:
        frame = pd.read_csv(handle, comment="#", dtype={"table": str, "target": str, "method": str})
    known = sorted(frame["table"].unique())
    if table not in known:
        raise ConfigError(f"results.paper.published={table} is not a published table; known: {', '.join(known)}")
    frame = frame[frame["table"] == table].assign(sampling_rate=lambda f: f["sampling_rate"].astype(float))
    if "std" not in frame:
        frame = frame.assign(std=math.nan)
    frame = frame.assign(
        paper_row=frame["target"], target=frame["target"].map(lambda t: list(SHARED_PAPER_ROWS.get(t, (t,))))
    )
    frame = frame.explode("target")
    return frame[["target", "sampling_rate", "method", "top1", "std", "paper_row"]].reset_index(drop=True)


def within_spread(diff: float, std: float, published_std: float) -> bool | None:
    """Whether |ours - paper| <= sqrt(std_ours^2 + std_paper^2), the spread of a difference
    of two independent means each as spread as its seeds; None when a spread is unknown."""
    if any(pd.isna(v) for v in (diff, std, published_std)):
        return None
    return bool(abs(diff) <= math.hypot(std, published_std))


def assemble(
    cells: pd.DataFrame,
    published: pd.DataFrame | None = None,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The paper layout as numbers: rows = (target, sampling rate), columns = (method, quantity).
    The rows and columns of the published table are all kept, found or not."""
    published = (
        published
        if published is not None
        else pd.DataFrame(columns=["target", "sampling_rate", "method", "top1", "std", "paper_row"])
    )
    methods = list(methods or _ordered(published["method"], cells["method"]))
    targets = list(targets or _ordered(published["target"], cells["target"]))
    rates = sorted(set(published["sampling_rate"]) | set(cells["sampling_rate"])) or [100.0]
    found = {(c.target, c.sampling_rate, c.method): c for c in cells.itertuples()}
    paper = {(p.target, p.sampling_rate, p.method): (p.top1, p.std) for p in published.itertuples()}
    index = [
        (t, r)
        for t in targets
        for r in rates
        if any((t, r, m) in found or (t, r, m) in paper for m in methods) or not paper
    ]
    references = reference_columns(cells, methods)
    rows = []
    for target, rate in index:
        row = {}
        for method in methods:
            cell = found.get((target, rate, method))
            value, value_std = paper.get((target, rate, method), (math.nan, math.nan))
            mean = cell.mean if cell is not None else math.nan
            std = cell.std if cell is not None else math.nan
            row.update(
                {
                    (method, "mean"): mean,
                    (method, "std"): std,
                    (method, "seeds"): cell.seeds if cell is not None else 0,
                    (method, "published"): value,
                    (method, "published_std"): value_std,
                    (method, "diff"): mean - value,
                    (method, "within"): within_spread(mean - value, std, value_std),
                    (method, "val_mean"): cell.val_mean if cell is not None else math.nan,
                    (method, "settings"): cell.settings if cell is not None else 0,
                    (method, "chosen"): cell.chosen if cell is not None else "",
                }
            )
            # against its reference column, and a transfer column against From scratch
            for name, prefix, other in (
                ("reference", "paired", references.get(method)),
                ("scratch", "scratch", scratch_column(method, methods)),
            ):
                theirs = found.get((target, rate, other)) if other else None
                numbers = (
                    paired(cell.per_seed, theirs.per_seed)
                    if cell is not None and theirs is not None
                    else (0, math.nan, math.nan, math.nan)
                )
                row[(method, name)] = other or ""
                row.update({(method, f"{prefix}_{q}"): v for q, v in zip(("n", "diff", "low", "high"), numbers)})
        rows.append(row)
    columns = pd.MultiIndex.from_tuples([(m, q) for m in methods for q in QUANTITIES], names=["method", "quantity"])
    table = pd.DataFrame(
        rows, index=pd.MultiIndex.from_tuples(index, names=["target", "sampling (%)"]), columns=columns
    )
    table.attrs["shared_rows"] = sorted({p.target for p in published.itertuples() if p.paper_row != p.target})
    return table


def reference_columns(cells: pd.DataFrame, methods: Sequence[str]) -> dict[str, str]:
    """Each column's reference column, found from the methods' structures (methods.reference_key):
    the column of the same backbone and source whose terms and direction are the reference's."""
    info = {}
    for cell in cells.itertuples():
        if isinstance(cell.structure, dict):
            info.setdefault(cell.method, (cell.structure, cell.backbone, cell.source))
    references = {}
    for method in methods:
        if method not in info:
            continue
        structure, *where = info[method]
        wanted = reference_key(structure)
        references[method] = next(
            (
                other
                for other in methods
                if other != method
                and other in info
                and list(info[other][1:]) == where
                and not is_scratch(other)
                and key_of(info[other][0]) == wanted
            ),
            None,
        )
    return {method: reference for method, reference in references.items() if reference}


def _ordered(*columns: pd.Series) -> list[str]:
    """Values in order of first appearance, the published table's order first."""
    return list(dict.fromkeys(v for column in columns for v in column))


def cell_text(mean: float, std: float, seeds: int, published: float, published_std: float = math.nan) -> str:
    """'81.20 ± 0.41 (5) · paper 82.00 ± 0.20 · Δ -0.80 ✗'; 'missing' when no seed has finished.
    ✓ / ✗: the difference is inside / outside the two spreads combined (within_spread)."""
    if not seeds:
        ours = "missing"
    else:
        ours = f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}") + f" ({seeds})"
    if pd.isna(published):
        return ours
    text = ours + f" · paper {published:.2f}" + ("" if pd.isna(published_std) else f" ± {published_std:.2f}")
    if seeds:
        within = within_spread(mean - published, std, published_std)
        text += f" · Δ {mean - published:+.2f}" + {True: " ✓", False: " ✗", None: ""}[within]
    return text


def paper_layout(table: pd.DataFrame) -> pd.DataFrame:
    """The table for reading: one text cell per (row, method)."""
    methods = list(dict.fromkeys(table.columns.get_level_values("method")))
    return pd.DataFrame(
        {
            m: [
                cell_text(r[(m, "mean")], r[(m, "std")], r[(m, "seeds")], r[(m, "published")], r[(m, "published_std")])
                for _, r in table.iterrows()
            ]
            for m in methods
        },
        index=table.index,
    )


def to_markdown(table: pd.DataFrame, published: str | None = None, notes: Sequence[str] = ()) -> str:
    text = paper_layout(table).reset_index()
    text["sampling (%)"] = text["sampling (%)"].map(lambda r: f"{r:g}")
    shared = set(table.attrs.get("shared_rows", ()))
    text["target"] = text["target"].map(lambda t: f"{t} †" if t in shared else t)
    lines = [text.to_markdown(index=False, disable_numparse=True), ""]
    lines.append(
        "Cells: mean ± sample std of the test top-1 (%) over the seeds found (their count in brackets)"
        + (
            f"; `paper`: mean ± std published in {published} (safetransfer/reporting/published.csv); "
            "Δ = ours - paper, ✓ when |Δ| ≤ √(std_ours² + std_paper²), ✗ when outside (no mark: a "
            "spread is unknown, e.g. one seed)"
            if published
            else ""
        )
        + "."
    )
    if shared:
        lines += ["", SHARED_ROW_NOTE]
    chosen = [
        (idx, m, table.loc[idx, (m, "chosen")], table.loc[idx, (m, "settings")])
        for idx in table.index
        for m in dict.fromkeys(table.columns.get_level_values("method"))
        if table.loc[idx, (m, "settings")] > 1
    ]
    if chosen:
        lines += ["", "Chosen on the validation split (best mean validation top-1 among the settings tried):", ""]
        lines += [f"- {t} {r:g}% {m}: {c} (of {n} settings)" for (t, r), m, c, n in chosen]
    lines += paired_markdown(table)
    views = table.attrs.get("test_crops")
    if views:
        lines += [
            "",
            "Test-time views: "
            + ", ".join(
                "the centre crop" if v == 1 else f"{v} crops (corners and centre, each mirrored; mean logits)"
                for v in views
            )
            + " (data.test_crops).",
        ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def paired_markdown(table: pd.DataFrame) -> list[str]:
    """A second table: each column against its reference column, and each transfer column
    against From scratch where the table has it, seed by seed."""
    columns = {}
    methods = list(dict.fromkeys(table.columns.get_level_values("method")))
    for prefix, name in (("paired", "reference"), ("scratch", "scratch")):
        for m in methods:
            if not (table[(m, name)] != "").any():
                continue
            reference = next(r for r in table[(m, name)] if r)
            columns[f"{m} − {reference}"] = [
                paired_text(
                    r[(m, f"{prefix}_n")], r[(m, f"{prefix}_diff")], r[(m, f"{prefix}_low")], r[(m, f"{prefix}_high")]
                )
                if r[(m, name)] and r[(m, "seeds")]
                else ""
                for _, r in table.iterrows()
            ]
    if not columns:
        return []
    frame = pd.DataFrame(columns, index=table.index).reset_index()
    frame["sampling (%)"] = frame["sampling (%)"].map(lambda r: f"{r:g}")
    return [
        "",
        "Paired differences (seeds are shared across methods: same seed, sampled subset and data order): "
        "mean of ours − the reference column over the common seeds, its 95 % t interval and the number of "
        "seeds; * when the interval excludes zero.",
        "",
        frame.to_markdown(index=False, disable_numparse=True),
    ]


def write_table(
    directories: Iterable[Path],
    results_dir: Path,
    name: str,
    published: str | None = None,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    published_file: Path | None = None,
    notes: Sequence[str] = (),
    accumulate: bool = False,
) -> str:
    """Collect, select, assemble; writes <results_dir>/<name>.csv and .md and returns the Markdown.
    `accumulate`: the table also keeps the cells of earlier writes under the same name (see
    accumulated); with no finished seed, nothing is written."""
    seeds = collect(directories)
    if not accumulate:
        return write_seeds_table(seeds, results_dir, name, published, methods, targets, published_file, notes)
    with FileLock(lock_for(Path(results_dir), name)):
        for suffix in (".csv", ".md", ".seeds.json"):  # under the table's lock: no live writer's
            remove_stale_temporaries(Path(results_dir) / f"{name}{suffix}")
        if seeds.empty:
            raise ConfigError(f"no finished seed; {Path(results_dir) / (name + '.md')} is left as it was")
        merged = accumulated(seeds, Path(results_dir), name)
        return write_seeds_table(merged, results_dir, name, published, methods, targets, published_file, notes)


#: beside an accumulating table: the seeds it is made of, and their settings
STORE = "{name}.seeds.json"


def accumulated(seeds: pd.DataFrame, results_dir: Path, name: str) -> pd.DataFrame:
    """A paper-layout table that accumulates, as the per-job table does: `seeds` (one sweep's)
    replace the earlier seeds of their own cells, every other cell is kept. In a cell of this
    sweep, earlier seeds of a setting this sweep has are kept too (the same config: the same
    numbers), those of other settings dropped. Stored in <name>.seeds.json (caller holds the lock)."""
    store = Path(results_dir) / STORE.format(name=name)
    old = read_json(store, needs=("seeds", "settings")) if store.exists() else None
    columns = [*CELL, "key", "seed", "top1", "val_top1"]
    earlier = pd.DataFrame(old["seeds"] if old else [], columns=columns)
    settings = {**(old["settings"] if old else {}), **seeds.attrs.get("settings", {})}
    structures = {**((old or {}).get("structures") or {}), **seeds.attrs.get("structures", {})}
    if len(earlier):
        earlier["sampling_rate"] = earlier["sampling_rate"].astype(float)
        renewed = {cell: set(group["key"]) for cell, group in seeds.groupby(CELL)}
        earlier = earlier[
            [
                tuple(r)[: len(CELL)] not in renewed or r.key in renewed[tuple(r)[: len(CELL)]]
                for r in earlier[columns].itertuples(index=False)
            ]
        ]
    merged = pd.concat([earlier, seeds[columns]], ignore_index=True).drop_duplicates(["key", "seed"], keep="last")
    merged = merged.reset_index(drop=True)
    merged.attrs["settings"] = {k: v for k, v in settings.items() if k in set(merged["key"])}
    merged.attrs["structures"] = {k: v for k, v in structures.items() if k in set(merged["key"])}
    record = {
        "seeds": merged.astype(object).where(merged.notna(), None).to_dict("records"),
        "settings": merged.attrs["settings"],
        "structures": merged.attrs["structures"],
    }
    atomic_write_text(store, json.dumps(record, default=plain) + "\n")
    return merged


def write_seeds_table(
    seeds: pd.DataFrame,
    results_dir: Path,
    name: str,
    published: str | None = None,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    published_file: Path | None = None,
    notes: Sequence[str] = (),
) -> str:
    """write_table from seeds already collected; a search (cells with several settings) also gets
    <name>_search.md and .csv, every setting's validation and test accuracy (returned after the table)."""
    reference = published_values(published, published_file) if published else None
    cells = select(seeds)
    table = assemble(cells, reference, expand_methods(methods, list(cells["method"])), targets)
    settings = seeds.attrs.get("settings", {})
    table.attrs["test_crops"] = sorted({int(settings[k].get("data.test_crops", 1)) for k in cells["key"]})
    flat = table.copy()
    flat.columns = [f"{m} {q}" for m, q in table.columns]
    searched = search_table(seeds)
    search_name = f"{name}_search"
    if len(searched):
        notes = [*notes, f"Every setting of the search, its validation and test accuracy: {search_name}.md"]
    atomic_write_text(Path(results_dir) / f"{name}.csv", flat.to_csv())
    markdown = to_markdown(table, published, notes)
    atomic_write_text(Path(results_dir) / f"{name}.md", markdown)
    if not len(searched):  # a search table of an earlier write would contradict this one
        for suffix in (".md", ".csv"):
            (Path(results_dir) / f"{search_name}{suffix}").unlink(missing_ok=True)
        return markdown
    atomic_write_text(Path(results_dir) / f"{search_name}.csv", searched.to_csv(index=False))
    search_markdown = (
        searched.drop(columns=["key"]).to_markdown(index=False, disable_numparse=True) + "\n\n"
        "One row per setting: validation and test top-1 (%), mean ± sample std over its seeds; ✓ the "
        "setting chosen (best mean validation top-1; the test split never takes part).\n"
    )
    atomic_write_text(Path(results_dir) / f"{search_name}.md", search_markdown)
    return markdown + f"\nSearch ({Path(results_dir) / search_name}.md):\n\n" + search_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="safetransfer-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--name", default="table", help="writes <results>/<name>.md and .csv")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument(
        "--published", help="show the paper's values: dtnh_table2 | dtnh_table3 | dtnh_table4 | bss_table2"
    )
    parser.add_argument("--published-file", type=Path, help="a CSV like safetransfer/reporting/published.csv")
    parser.add_argument("--methods", nargs="*", help="the columns, in order (missing ones are shown)")
    parser.add_argument("--targets", nargs="*", help="the rows, in order (missing ones are shown)")
    args = parser.parse_args(argv)
    try:
        check_table_name(args.name, "--name")
    except ConfigError as error:
        parser.exit(2, f"safetransfer-tables: error: {error}\n")
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        parser.exit(2, f"safetransfer-tables: error: no such directory: {', '.join(missing)}\n")
    seeds = collect(args.directories)  # read once: the check below and the table use the same seeds
    if seeds.empty:
        parser.exit(
            2,
            f"safetransfer-tables: error: no finished seed (seed_*/metrics.json) under "
            f"{', '.join(map(str, args.directories))}; nothing written\n",
        )
    try:
        check_writable(args.results, "--results")
    except ConfigError as error:
        parser.exit(2, f"safetransfer-tables: error: {error}\n")
    try:
        markdown = write_seeds_table(
            seeds, args.results, args.name, args.published, args.methods, args.targets, args.published_file
        )
    except ConfigError as error:
        parser.exit(2, f"safetransfer-tables: error: {error}\n")
    print(markdown, end="")
