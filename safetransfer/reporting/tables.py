"""Every view of a table's store (safetransfer/reporting/store.py): pandas groupbys of its records.

- `<table>.md`: one row per setting (a config, from one source file), the settings that differ
  between rows as columns, and each row paired seed by seed with its reference and with From scratch;
- `<table>_paper.md` and `.csv`: the paper layout, rows = target x sampling rate, columns = methods,
  beside the paper's published values; a cell searched over several settings on a validation split
  shows the setting with the best mean validation top-1 (the test split never takes part);
- `<table>_search.md` and `.csv`: every setting of each searched cell, validation and test top-1.

A cell is its settings: settings that differ between columns of one row are shown in the column's
label, and a comparison is made only between rows of one setting (a method's own coefficients
compared where both have them).

    safetransfer-tables multirun/2026-11-22/10-00-00-000000 --name dtnh_table2 --published dtnh_table2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import pandas as pd

from safetransfer.common.atomic import atomic_write_text, check_writable, remove_stale_temporaries
from safetransfer.common.errors import ConfigError
from safetransfer.reporting import store
from safetransfer.reporting.methods import BASE_OPTIMIZERS, SCRATCH, describe_reference, key_of, reference_key

#: paired intervals from fewer seeds are shown, never flagged
FLAGGED_FROM = 3
#: settings shown in columns of their own, and those that only name a method's parts
OWN_COLUMNS = ("backbone.name", "target.name", "target.sampling_rate")
#: the keys of a method's own parts: its regularizer and direction, and what a modifier adds (StochNorm's
#: normalization, SPD's lambda); of these, the coefficients are compared where two settings both have them
MODIFIER_KEYS = ("normalization.", "optim.optimizer.lambda_spd")
METHOD_PREFIXES = ("regularizer.", "direction.", *MODIFIER_KEYS)
COEFFICIENT_PREFIXES = ("regularizer.terms.", *MODIFIER_KEYS)
#: A row of a paper's table that stands for several of ours. The DTNH tables print one "Caltech 256"
#: row although the paper trains on 30 or 60 images per class and does not say which it shows.
SHARED_PAPER_ROWS = {"caltech256": ("caltech256_30", "caltech256_60")}
SHARED_ROW_NOTE = (
    "† The paper's table has one Caltech 256 row and does not say whether it is the 30 or the "
    "60 images per class split; its value is shown beside both."
)
PAIRED_NOTE = (
    "Paired differences (seeds are shared across methods: same seed, sampled subset and data order): mean of "
    "the row − its reference over the common seeds, its 95 % t interval and the number of seeds; * when the "
    f"interval excludes zero (from {FLAGGED_FROM} seeds on). A transfer row is also compared with From scratch."
)


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is NaN."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


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
    """'+1.20 [+0.35, +2.05] (5) *': * when the interval excludes zero, from FLAGGED_FROM seeds on."""
    if n < 2:
        return f"{n} common seed{'s' if n != 1 else ''}: no interval"
    mark = " *" if n >= FLAGGED_FROM and (low > 0 or high < 0) else ""
    return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}] ({n}){mark}"


def format_cell(mean: float, std: float) -> str:
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def short_key(key: str, keys) -> str:
    """The shortest tail of a dotted key that no other key ends with: regularizer.terms.l2sp.alpha -> l2sp.alpha."""
    parts = key.split(".")
    for length in range(min(2, len(parts)), len(parts) + 1):
        tail = ".".join(parts[-length:])
        if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
            return tail
    return key


def cells(records: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: its cell, numbers over its seeds, and what it is (structure, settings)."""
    rows = []
    for setting, group in records.groupby("setting", sort=False):
        group = group.sort_values("seed")
        latest = group.iloc[-1]
        mean, std = summarize(group["top1"])
        has_val = bool(group["val_top1"].notna().all())
        rows.append(
            {
                **{c: latest[c] for c in store.CELL},
                "setting": setting,
                "mean": mean,
                "std": std,
                "seeds": len(group),
                "val_mean": group["val_top1"].mean() if has_val else math.nan,
                "val_std": summarize(group["val_top1"])[1] if has_val else math.nan,
                "per_seed": dict(zip(group["seed"].astype(int), group["top1"].astype(float))),
                "structure": json.loads(latest["structure"]),
                "settings": json.loads(latest["settings"]),
                "chosen": latest["chosen"],
            }
        )
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["sampling_rate"] = frame["sampling_rate"].astype(float)
    return frame


def same_setting(ours: dict, theirs: dict, ignore=frozenset(), sources: bool = True) -> bool:
    """Whether two settings differ only in what makes their methods differ: every key equal but the
    methods' own (their terms' coefficients compared where both have them), the source's keys only
    when `sources`, and the keys in `ignore` (those a search chose)."""
    for key in set(ours) | set(theirs):
        if key in ignore or key in OWN_COLUMNS or (key.startswith("source.") and not sources):
            continue
        if key.startswith(METHOD_PREFIXES):
            if key.startswith(COEFFICIENT_PREFIXES) and key in ours and key in theirs and ours[key] != theirs[key]:
                return False
        elif key == "optim.optimizer.kind":  # SPD's optimizer is its base optimizer's setting
            if BASE_OPTIMIZERS.get(ours.get(key), ours.get(key)) != BASE_OPTIMIZERS.get(
                theirs.get(key), theirs.get(key)
            ):
                return False
        elif ours.get(key) != theirs.get(key):
            return False
    return True


def varied_keys(settings: Sequence[dict], sources: Sequence[str] | None = None) -> list[str]:
    """The settings that tell these apart: a key with two values among those that have it, or (outside a
    method's own keys) one that some lack. A method's parts (its class names, its terms) are its name;
    a source's keys count only between settings of one source (`sources`: their labels, shown apart)."""
    keys = sorted(set().union(*settings)) if settings else []
    sources = list(sources) if sources is not None else [""] * len(settings)
    varied = []
    for key in keys:
        if key in OWN_COLUMNS or key.endswith(("_target_", ".kind")) or key == "regularizer.name":
            continue
        groups = {}
        for source, found in zip(sources, settings):
            if key in found:
                groups.setdefault(source if key.startswith("source.") else "", set()).add(
                    json.dumps(found[key], default=str)
                )
        missing = any(key not in s for s in settings) and not key.startswith((*METHOD_PREFIXES, "source."))
        if any(len(values) > 1 for values in groups.values()) or missing:
            varied.append(key)
    return varied


def setting_text(settings: dict, keys: Sequence[str], names) -> str:
    return ", ".join(f"{short_key(k, names)}={settings[k]}" for k in keys if k in settings)


def pairs(table: pd.DataFrame, searched: dict | None = None) -> pd.DataFrame:
    """Each row against its reference (methods.reference_key) and a transfer row against From scratch,
    among the rows of its backbone, target and sampling rate with the same setting (same_setting,
    leaving out the keys a search chose in either)."""
    searched = searched or {}
    found = {q: [] for q in ("reference", "paired", "note", "scratch", "scratch_paired")}
    for index, row in table.iterrows():
        peers = table[
            (table["backbone"] == row["backbone"])
            & (table["target"] == row["target"])
            & (table["sampling_rate"] == row["sampling_rate"])
            & (table.index != index)
        ]

        def alike(other, sources=True, row=row):
            ignore = searched.get(row["setting"], set()) | searched.get(other["setting"], set())
            return same_setting(row["settings"], other["settings"], frozenset(ignore), sources)

        structure, wanted = row["structure"], reference_key(row["structure"])
        reference, numbers, note = None, None, ""
        if wanted is not None:
            candidates = [
                other
                for _, other in peers.iterrows()
                if other["source"] == row["source"]
                and other["method"] != SCRATCH
                and key_of(other["structure"]) == wanted
                and alike(other)
            ]
            if len(candidates) == 1:
                reference, numbers = candidates[0], paired(row["per_seed"], candidates[0]["per_seed"])
            else:
                how = f"{len(candidates)} rows of" if candidates else "no row of"
                note = f"{how} {describe_reference(structure)} from {row['source']} with the same setting"
        scratch = [o for _, o in peers.iterrows() if o["method"] == SCRATCH and alike(o, sources=False)]
        against = (
            paired(row["per_seed"], scratch[0]["per_seed"]) if len(scratch) == 1 and row["method"] != SCRATCH else None
        )
        found["reference"].append(reference["label"] if reference is not None else "")
        found["paired"].append(numbers)
        found["note"].append(note)
        found["scratch"].append(scratch[0]["label"] if against is not None else "")
        found["scratch_paired"].append(against)
    return pd.DataFrame(found, index=table.index)


def labelled(table: pd.DataFrame, searched: dict | None = None) -> pd.DataFrame:
    """`table` with each row's label: the method, its backbone and source in brackets where the table
    mixes several (From scratch has no source), and the settings that tell it apart from other rows
    of its target and sampling rate, except those a search chose (listed under the table)."""
    searched = searched or {}
    transfer = table[table["method"] != SCRATCH]
    parts = [c for c in ("backbone", "source") if (table if c == "backbone" else transfer)[c].nunique() > 1]
    labels = {}
    for _, group in table.groupby(["target", "sampling_rate"], sort=False):
        keys = varied_keys(list(group["settings"]), list(group["source"]))
        names = set().union(*group["settings"])
        for index, row in group.iterrows():
            shown = [str(row[p]) for p in parts if not (p == "source" and row["method"] == SCRATCH)]
            label = f"{row['method']} [{', '.join(shown)}]" if shown else row["method"]
            text = setting_text(row["settings"], [k for k in keys if k not in searched.get(row["setting"], ())], names)
            labels[index] = f"{label} ({text})" if text else label
    return table.assign(label=pd.Series(labels))


def select(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, set], pd.DataFrame]:
    """(one setting per cell, {chosen setting: the keys its search varied}, every setting of the searched
    cells). A cell whose settings all hold out a validation split is a search: the best mean validation
    top-1 is kept (ties: the first by setting). Settings without one stay side by side, labelled."""
    kept, searched, tried = [], {}, []
    for _, group in table.groupby(store.CELL, sort=False):
        if len(group) < 2 or group["val_mean"].isna().any():
            kept.append(group.assign(settings_tried=1))
            continue
        best = group.sort_values("setting")["val_mean"].idxmax()
        keys = set(varied_keys(list(group["settings"]), list(group["source"])))
        searched[group.loc[best, "setting"]] = keys
        kept.append(group.loc[[best]].assign(settings_tried=len(group)))
        tried.append(group.assign(chosen_here=group.index == best, searched_keys=[sorted(keys)] * len(group)))
    empty = table.iloc[0:0]
    return (
        (pd.concat(kept) if kept else empty.assign(settings_tried=[])),
        searched,
        (pd.concat(tried) if tried else empty),
    )


def published_values(table: str, path: Path | None = None) -> pd.DataFrame:
    """The paper's values of `table`: target, sampling_rate, method, top1, std, paper_row (the paper's own
    row name where one of its rows stands for several of ours, SHARED_PAPER_ROWS)."""
    if path is None:
        path = resources.files("safetransfer.reporting").joinpath("published.csv")
    with Path(str(path)).open() as handle:
        frame = pd.read_csv(handle, comment="#", dtype={"table": str, "target": str, "method": str})
    known = sorted(frame["table"].unique())
    if table not in known:
        raise ConfigError(f"results.published={table} is not a published table; known: {', '.join(known)}")
    frame = frame[frame["table"] == table].assign(sampling_rate=lambda f: f["sampling_rate"].astype(float))
    if "std" not in frame:
        frame = frame.assign(std=math.nan)
    frame = frame.assign(
        paper_row=frame["target"], target=frame["target"].map(lambda t: list(SHARED_PAPER_ROWS.get(t, (t,))))
    )
    return frame.explode("target")[["target", "sampling_rate", "method", "top1", "std", "paper_row"]]


def within_spread(diff: float, std: float, published_std: float) -> bool | None:
    """|ours - paper| <= sqrt(std_ours^2 + std_paper^2), the spread of a difference of two independent
    means each as spread as its seeds; None when a spread is unknown."""
    if any(pd.isna(v) for v in (diff, std, published_std)):
        return None
    return bool(abs(diff) <= math.hypot(std, published_std))


def paper_frame(
    chosen: pd.DataFrame, published: pd.DataFrame | None, searched: dict, methods=None, targets=None
) -> pd.DataFrame:
    """The paper layout in long form: one row per (target, sampling rate, column) found or published."""
    ours = labelled(chosen, searched) if len(chosen) else chosen.assign(label=[])
    paired_with = pairs(ours, searched) if len(ours) else pd.DataFrame()
    paper = published if published is not None else pd.DataFrame(columns=["target", "sampling_rate", "method"])
    columns = list(dict.fromkeys([*paper["method"], *ours.get("label", [])]))
    if methods:  # as typed: a column's label, or a method's name for every column of that method
        of_method = {label: method for label, method in zip(ours.get("label", []), ours.get("method", []))}
        picked = [[c for c in columns if c == m or of_method.get(c) == m] or [m] for m in methods]
        columns = list(dict.fromkeys(c for found in picked for c in found))
    rows = list(dict.fromkeys([*paper["target"], *ours.get("target", [])]))
    rows = list(targets) if targets else rows
    rates = sorted(set(paper["sampling_rate"]) | set(ours.get("sampling_rate", []))) or [100.0]
    found = {(r.target, r.sampling_rate, r.label): (i, r) for i, r in zip(ours.index, ours.itertuples())}
    values = {(p.target, p.sampling_rate, p.method): (p.top1, p.std) for p in paper.itertuples()}
    out = []
    for target in rows:
        for rate in rates:
            here = [c for c in columns if (target, rate, c) in found or (target, rate, c) in values]
            if not here and not (targets and target in targets and rate in set(ours.get("sampling_rate", []))):
                continue  # nothing run or published here (a target asked for by --targets keeps its rows)
            for column in columns:
                index, cell = found.get((target, rate, column), (None, None))
                top1, top1_std = values.get((target, rate, column), (math.nan, math.nan))
                mean = cell.mean if cell is not None else math.nan
                std = cell.std if cell is not None else math.nan
                link = paired_with.loc[index] if index is not None else None
                numbers = link["paired"] if link is not None and link["paired"] else (0, math.nan, math.nan, math.nan)
                scratch = (
                    link["scratch_paired"]
                    if link is not None and link["scratch_paired"]
                    else (0, math.nan, math.nan, math.nan)
                )
                out.append(
                    {
                        "target": target,
                        "sampling_rate": rate,
                        "column": column,
                        "method": cell.method if cell is not None else column,
                        "mean": mean,
                        "std": std,
                        "seeds": cell.seeds if cell is not None else 0,
                        "val_mean": cell.val_mean if cell is not None else math.nan,
                        "settings_tried": cell.settings_tried if cell is not None else 0,
                        "chosen": chosen_text(cell, searched),
                        "published": top1,
                        "published_std": top1_std,
                        "diff": mean - top1,
                        "within": within_spread(mean - top1, std, top1_std),
                        "reference": link["reference"] if link is not None else "",
                        **dict(zip(("paired_n", "paired_diff", "paired_low", "paired_high"), numbers)),
                        "scratch": link["scratch"] if link is not None else "",
                        **dict(zip(("scratch_n", "scratch_diff", "scratch_low", "scratch_high"), scratch)),
                    }
                )
    frame = pd.DataFrame(out)
    frame.attrs["shared_rows"] = sorted({p.target for p in paper.itertuples() if p.paper_row != p.target})
    return frame


def chosen_text(cell, searched: dict) -> str:
    """The values a search chose for this cell (in this table, or in stage 1 of safetransfer-reproduce)."""
    if cell is None:
        return ""
    if cell.setting in searched:
        return setting_text(cell.settings, sorted(searched[cell.setting]), set(cell.settings))
    return cell.chosen or ""


def cell_text(mean: float, std: float, seeds: int, published: float, published_std: float = math.nan) -> str:
    """'81.20 ± 0.41 (5) · paper 82.00 ± 0.20 · Δ -0.80 ✗'; 'missing' when no seed has finished.
    ✓ / ✗: the difference is inside / outside the two spreads combined (within_spread)."""
    ours = "missing" if not seeds else f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}") + f" ({seeds})"
    if pd.isna(published):
        return ours
    text = ours + f" · paper {published:.2f}" + ("" if pd.isna(published_std) else f" ± {published_std:.2f}")
    if seeds:
        within = within_spread(mean - published, std, published_std)
        text += f" · Δ {mean - published:+.2f}" + {True: " ✓", False: " ✗", None: ""}[within]
    return text


def rows_of(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(**{"sampling (%)": frame["sampling_rate"].map(lambda r: f"{float(r):g}")})


#: what a reader of a published table's comparison must know about how its values were obtained
PUBLISHED_NOTES = {
    "tllib_table": (
        "TLlib's values (`paper`) are one run each, at the best epoch on the test split: its scripts' "
        "validation loader is the test split, so its hyper-parameters and epoch are chosen on the numbers it "
        "reports. Ours: the lr chosen on a validation split held out of the training images (never the test "
        "split), the last iteration, five seeds. Its samples are TLlib's own lists (now behind dead links); "
        "ours are the BSS authors' released lists for these three targets (or our stratified sample where a "
        "job sets target.sample_list=null). Bi-Tuning's values are shown without a run of ours."
    ),
}


def paper_markdown(frame: pd.DataFrame, published: str | None) -> str:
    shared = set(frame.attrs.get("shared_rows", ()))
    shown = rows_of(frame).assign(
        target=lambda f: f["target"].map(lambda t: f"{t} †" if t in shared else t),
        text=[cell_text(r.mean, r.std, r.seeds, r.published, r.published_std) for r in frame.itertuples()],
    )
    columns = list(dict.fromkeys(frame["column"]))
    layout = shown.pivot_table(
        index=["target", "sampling (%)"], columns="column", values="text", aggfunc="first", sort=False
    )
    layout = layout.reindex(columns=columns).fillna("").reset_index()
    layout.columns.name = None
    lines = [
        layout.to_markdown(index=False, disable_numparse=True),
        "",
        "Cells: mean ± sample std of the test top-1 (%) over the seeds found (their count in brackets)"
        + (
            f"; `paper`: mean ± std published in {published} (safetransfer/reporting/published.csv); Δ = ours - "
            "paper, ✓ when |Δ| ≤ √(std_ours² + std_paper²), ✗ when outside (no mark: a spread is unknown)"
            if published
            else ""
        )
        + ".",
    ]
    if shared:
        lines += ["", SHARED_ROW_NOTE]
    if published in PUBLISHED_NOTES:
        lines += ["", PUBLISHED_NOTES[published]]
    chosen = frame[(frame["chosen"] != "") & (frame["seeds"] > 0)]
    if len(chosen):
        lines += ["", "Chosen on the validation split (the best mean validation top-1 of the settings tried):", ""]
        lines += [
            f"- {r.target} {float(r.sampling_rate):g}% {r.column}: {r.chosen}"
            + (f" (of {r.settings_tried} settings)" if r.settings_tried > 1 else "")
            for r in chosen.itertuples()
        ]
    compared = [
        {
            "target": r.target,
            "sampling (%)": f"{float(r.sampling_rate):g}",
            "ours − reference": f"{r.column} − {other}",
            "difference, 95 % interval (seeds)": paired_text(int(n), d, lo, hi),
        }
        for r in frame[frame["seeds"] > 0].itertuples()
        for other, n, d, lo, hi in (
            (r.reference, r.paired_n, r.paired_diff, r.paired_low, r.paired_high),
            (r.scratch, r.scratch_n, r.scratch_diff, r.scratch_low, r.scratch_high),
        )
        if other
    ]
    if compared:
        lines += ["", PAIRED_NOTE, "", pd.DataFrame(compared).to_markdown(index=False, disable_numparse=True)]
    views = frame.attrs.get("test_crops")
    if views:
        crops = "{} crops (corners and centre, each mirrored; mean logits)"
        shown = ", ".join("the centre crop" if v == 1 else crops.format(v) for v in views)
        lines += ["", f"Test-time views: {shown} (data.test_crops)."]
    return "\n".join(lines) + "\n"


def job_markdown(table: pd.DataFrame) -> str:
    """Every setting of the store, one row each, the settings that differ between rows as columns."""
    table = labelled(table)
    keys = varied_keys(list(table["settings"]), list(table["source"]))
    names = set().union(*table["settings"])
    shown = rows_of(table)
    frame = pd.DataFrame(
        {
            "backbone": shown["backbone"],
            "source": shown["source"],
            "target": shown["target"],
            "sampling (%)": shown["sampling (%)"],
            "method": shown["method"],
            **{short_key(k, names): [str(s.get(k, "")) for s in table["settings"]] for k in keys},
            "top-1 (%)": [format_cell(m, s) for m, s in zip(table["mean"], table["std"])],
            **(
                {
                    "val top-1 (%)": [
                        format_cell(m, s) if not pd.isna(m) else "" for m, s in zip(table["val_mean"], table["val_std"])
                    ]
                }
                if table["val_mean"].notna().any()
                else {}
            ),
            "seeds": table["seeds"],
            "per seed": [", ".join(f"{v:.2f}" for v in s.values()) for s in table["per_seed"]],
        }
    )
    lines = [frame.to_markdown(index=False, disable_numparse=True)]
    compared = []
    for (_, row), (_, link) in zip(table.iterrows(), pairs(table).iterrows()):
        where = f"{row['target']} {float(row['sampling_rate']):g}% {row['source']}"
        if link["reference"]:
            compared.append((where, row["label"], link["reference"], paired_text(*link["paired"])))
        elif link["note"]:
            compared.append((where, row["label"], "", f"none: {link['note']}"))
        if link["scratch"]:
            compared.append((where, row["label"], link["scratch"], paired_text(*link["scratch_paired"])))
    if compared:
        columns = ["target, sampling, source", "row", "reference", "row − reference, 95 % interval (seeds)"]
        lines += ["", PAIRED_NOTE, "", pd.DataFrame(compared, columns=columns).to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def search_frame(tried: pd.DataFrame) -> pd.DataFrame:
    """Every setting of the searched cells: the varied values, validation and test top-1, the chosen one."""
    if not len(tried):
        return pd.DataFrame()
    keys = sorted(set().union(*tried["searched_keys"]))
    names = set().union(*tried["settings"])

    def order(settings):  # the settings in the order of their swept values, numbers as numbers
        values = (settings.get(k) for k in keys)
        return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)

    tried = tried.assign(order=tried["settings"].map(order))
    frame = rows_of(tried.sort_values([*store.CELL, "order"], kind="stable"))
    return pd.DataFrame(
        {
            "target": frame["target"],
            "sampling (%)": frame["sampling (%)"],
            "method": frame["method"],
            **{short_key(k, names): [s.get(k, "") for s in frame["settings"]] for k in keys},
            "val top-1 (%)": [format_cell(m, s) for m, s in zip(frame["val_mean"], frame["val_std"])],
            "test top-1 (%)": [format_cell(m, s) for m, s in zip(frame["mean"], frame["std"])],
            "seeds": frame["seeds"],
            "chosen": ["✓" if c else "" for c in frame["chosen_here"]],
            "setting": frame["setting"],
        }
    )


def paper_view(records: pd.DataFrame, methods=None, targets=None) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """(the paper layout in long form, every setting of the searched cells, the published table shown)."""
    chosen, searched, tried = select(cells(records))
    published = next((p for p in reversed(list(records["published"])) if p), None)
    frame = paper_frame(chosen, published_values(published) if published else None, searched, methods, targets)
    frame.attrs["test_crops"] = sorted({int(s.get("data.test_crops", 1)) for s in chosen.get("settings", [])})
    return frame, tried, published


def view_path(results_dir: Path, table: str, view: str = "") -> Path:
    """Where a view of a table is written: the job's rows (`view` ""), "paper" or "search"."""
    return Path(results_dir) / f"{table}{'_' + view if view else ''}.md"


def render(records: pd.DataFrame, results_dir: Path, name: str, methods=None, targets=None) -> str:
    """Every view of `records` written beside the store as <name>.md, <name>_paper.md/.csv and, for
    searched cells, <name>_search.md/.csv; returns the paper layout's Markdown. The caller holds the lock."""
    results_dir = Path(results_dir)
    for suffix in (".md", "_paper.md", "_paper.csv", "_search.md", "_search.csv"):
        remove_stale_temporaries(results_dir / f"{name}{suffix}")
    table = cells(records)
    atomic_write_text(results_dir / f"{name}.md", job_markdown(table))
    frame, tried, published = paper_view(records, methods, targets)
    markdown = paper_markdown(frame, published)
    searches = search_frame(tried)
    if len(searches):
        markdown += f"\nEvery setting searched, its validation and test top-1: {name}_search.md\n"
        atomic_write_text(results_dir / f"{name}_search.csv", searches.to_csv(index=False))
        atomic_write_text(
            results_dir / f"{name}_search.md",
            searches.drop(columns="setting").to_markdown(index=False, disable_numparse=True)
            + "\n\nOne row per setting: validation and test top-1 (%), mean ± sample std over its seeds; ✓ the "
            "setting chosen (best mean validation top-1; the test split never takes part).\n",
        )
    else:  # a search of an earlier write would contradict this one
        for suffix in ("_search.md", "_search.csv"):
            (results_dir / f"{name}{suffix}").unlink(missing_ok=True)
    atomic_write_text(results_dir / f"{name}_paper.csv", frame.to_csv(index=False))
    atomic_write_text(results_dir / f"{name}_paper.md", markdown)
    return markdown


def write(results_dir: Path, name: str, records: Sequence[dict]) -> str:
    """Add `records` to the store `name` and write its views; returns the paper layout's Markdown."""
    written = {}
    store.append(results_dir, name, records, lambda frame: written.update(md=render(frame, results_dir, name)))
    return written["md"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="safetransfer-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="*", type=Path, help="run or sweep directories to add to the table")
    parser.add_argument("--name", default="table", help="the store <results>/<name>.seeds.csv and its views")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument(
        "--published", help="the paper's values beside: dtnh_table2 | dtnh_table3 | dtnh_table4 | bss_table2"
    )
    parser.add_argument("--methods", nargs="*", help="the columns, in order (missing ones are shown)")
    parser.add_argument("--targets", nargs="*", help="the rows, in order (missing ones are shown)")
    args = parser.parse_args(argv)

    def fail(message: str):
        parser.exit(2, f"safetransfer-tables: error: {message}\n")

    try:
        store.check_table_name(args.name, "--name")
        check_writable(args.results, "--results")
        if args.published:
            published_values(args.published)
    except ConfigError as error:
        fail(str(error))
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        fail(f"no such directory: {', '.join(missing)}")
    found = store.records_under(args.directories, args.published)
    if args.directories and not found:
        fail(f"no finished seed (seed_*/metrics.json) under {', '.join(map(str, args.directories))}; nothing written")
    written = {}

    def views(records: pd.DataFrame) -> None:  # under the table's lock, the store as it now is
        if not len(records):
            fail(f"{store.store_path(args.results, args.name)} holds no seed: give the run or sweep directories to add")
        if args.published:
            records = records.assign(published=args.published)
        written["markdown"] = render(records, args.results, args.name, args.methods, args.targets)

    try:
        if found:
            store.append(args.results, args.name, found, views)
        else:
            with store.lock_for(args.results, args.name):
                views(store.read(args.results, args.name))
    except ConfigError as error:
        fail(str(error))
    print(written["markdown"], end="")
