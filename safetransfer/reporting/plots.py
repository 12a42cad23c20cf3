"""Figures from run and sweep directories, as PNG files (matplotlib, no display needed):

    safetransfer-plot multirun/2026-11-22/10-00-00-000000 [--out results/figures] [--published dtnh_table2]

1. losses.png: the empirical loss J and the held-out loss (runtime.eval_every) against
   the iteration, one line per method, mean over seeds with a +-1 std band (DTNH Fig. 3);
2. angles.png: Angle 1 against Angle 3 and Angle 2 against Angle 4 (DTNH Figs. 4 and 5);
3. spectra.png: the singular values of the pooled test-batch features in descending
   order, all and the smaller half, one line per method and sampling rate (BSS Figs. 1c/d, 3b/c);
4. table.png: the results table as grouped bars with error bars (methods x targets),
   published values marked where known;
5. search.png: each searched cell's settings (a grid, or Optuna's trials), their validation and test
   top-1, the choice (best mean validation top-1) marked;
6. sweep.png: a heatmap per method of the paired gain over From scratch, sources x targets.
Figures 1-3 have a panel per target and sampling rate (and source, where swept), a colour per method and
a marker per setting of a grid; every figure's data is written beside it as CSV (`losses.csv`, ...).
The numbers each figure draws come from the functions below, so they can be checked.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from safetransfer.common.atomic import read_json
from safetransfer.common.fingerprints import config_key
from safetransfer.reporting.methods import SCRATCH, method_name, source_label
from safetransfer.reporting.store import flat_settings
from safetransfer.reporting.tables import short_key, varied_keys

log = logging.getLogger(__name__)

DPI = 100
SIZE = (11, 4.5)  # inches: 1100 x 450 pixels


@dataclass
class Run:
    """One finished or running seed: what it is and what it logged."""

    method: str
    source: str
    target: str
    sampling_rate: float
    seed: int
    log: pd.DataFrame
    spectrum: list[list[float]] | None
    key: str = ""  # the config key: one setting of a grid
    settings: dict | None = None  # its values (tables.flat_settings), to name what a grid varied
    log_every: int = 0
    iterations: int = 0


def load_runs(directories: Iterable[Path]) -> list[Run]:
    """Every seed directory (with metrics.json or a log.csv and the job's .hydra/config.yaml) under `directories`."""
    from omegaconf import OmegaConf

    runs = []
    for directory in directories:
        for log_path in sorted(Path(directory).rglob("seed_*/log.csv")):
            seed_dir = log_path.parent
            if (seed_dir / "metrics.json").exists():
                metrics = read_json(seed_dir / "metrics.json", needs=("config",))
                if metrics is None:
                    continue
                cfg, method = OmegaConf.create(metrics["config"]), metrics.get("method")
            elif (seed_dir.parent / ".hydra" / "config.yaml").exists():
                cfg, method = OmegaConf.load(seed_dir.parent / ".hydra" / "config.yaml"), None  # a seed in progress
            else:
                continue
            try:
                curve = pd.read_csv(log_path)
            except (ValueError, UnicodeDecodeError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
                log.warning("%s is unreadable (%s: %s); skipped", log_path, type(error).__name__, error)
                continue
            spectrum_path = seed_dir / "spectrum.json"
            found = read_json(spectrum_path, needs=("singular_values",)) if spectrum_path.exists() else None
            runs.append(
                Run(
                    method or method_name(cfg),
                    source_label(cfg.source),
                    str(cfg.target.name),
                    float(cfg.target.sampling_rate),
                    int(seed_dir.name.split("_")[1]),
                    curve,
                    found["singular_values"] if found else None,
                    config_key(cfg),
                    flat_settings(cfg),
                    int(OmegaConf.select(cfg, "runtime.log_every", default=0) or 0),
                    int(OmegaConf.select(cfg, "train.iterations", default=0) or 0),
                )
            )
    return runs


def series_name(run: Run, runs: Sequence[Run], settings: bool = True) -> str:
    """A line's name, the same in every figure: the method, its source in brackets when the runs
    mix sources (From scratch needs none), and (`settings`) the values a grid varied when the
    method's runs hold several settings (`L2-SP l2sp.alpha=0.1`: settings are never averaged)."""
    name = run.method
    if len({r.source for r in runs if r.method != SCRATCH}) > 1 and run.method != SCRATCH:
        name += f" [{run.source}]"
    same = [
        r
        for r in runs
        if (r.method, r.source, r.target, r.sampling_rate) == (run.method, run.source, run.target, run.sampling_rate)
    ]
    if settings and len({r.key for r in same}) > 1:
        varied = varied_keys([r.settings or {} for r in same])
        name += " " + " ".join(f"{short_key(k, varied)}={(run.settings or {}).get(k)}" for k in varied)
    return name


def palette(names: Iterable[str]) -> dict[str, str]:
    """One colour per method name, the same in every figure of a call (sorted names, tab10 then tab20)."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors[1::2])
    return {name: matplotlib.colors.to_hex(colours[i % len(colours)]) for i, name in enumerate(sorted(set(names)))}


def curve_band(runs: Sequence[Run], column: str) -> pd.DataFrame:
    """Mean and sample std over the seeds at each iteration where `column` was logged."""
    frames = [r.log[["iteration", column]].dropna() for r in runs if column in r.log]
    if not frames:
        return pd.DataFrame(columns=["iteration", "mean", "std", "n"])
    stacked = pd.concat(frames)
    grouped = stacked.groupby("iteration")[column]
    return pd.DataFrame(
        {"mean": grouped.mean(), "std": grouped.std(ddof=1).fillna(0.0), "n": grouped.count()}
    ).reset_index()


def spectrum_curve(runs: Sequence[Run]) -> np.ndarray:
    """The singular values in descending order, averaged over the saved batches and the seeds."""
    spectra = [np.sort(np.asarray(batch))[::-1] for r in runs if r.spectrum for batch in r.spectrum]
    if not spectra:
        return np.array([])
    length = min(len(s) for s in spectra)
    return np.mean([s[:length] for s in spectra], axis=0)


#: a grid's settings of one method: one marker each, in the order of their config keys (colour is the method's)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
PANEL_HEIGHT, LEGEND_ROW = 3.0, 0.24  # inches: a row of panels, a row of the legend below them
#: matplotlib's warning when the axes had no room left, and its figure would be broken
COLLAPSED = "constrained_layout not applied"


def panel_of(run: Run, runs: Sequence[Run]) -> str:
    """The facet a run is drawn in: its target and sampling rate, and its source where the target's
    transfer runs come from several (a source sweep); From scratch joins every facet of its target."""
    name = f"{run.target} {run.sampling_rate:g}%"
    sources = {r.source for r in runs if r.method != SCRATCH and r.target == run.target}
    return name + (f" [{run.source}]" if len(sources) > 1 and run.method != SCRATCH else "")


def facets(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """{panel: its runs}, panels sorted; a From scratch run in each panel of its target and rate."""
    transfer = [r for r in runs if r.method != SCRATCH]
    names = sorted({panel_of(r, runs) for r in transfer or runs})
    found: dict[str, list[Run]] = {name: [] for name in names}
    for run in runs:
        if run.method == SCRATCH and transfer:
            cell = f"{run.target} {run.sampling_rate:g}%"
            for name in names:
                if name == cell or name.startswith(cell + " ["):
                    found[name].append(run)
        else:
            found[panel_of(run, runs)].append(run)
    return {name: group for name, group in found.items() if group}


class Looks:
    """How a series is drawn, the same in every panel and figure of a call: its method's colour (a palette
    of method names) and, where a grid gives the method several settings, one marker per setting."""

    def __init__(self, runs: Sequence[Run], methods: dict[str, str] | None = None):
        self.colors = {**palette({r.method for r in runs}), **(methods or {})}
        keys: dict[str, list[str]] = {}
        for run in runs:
            keys.setdefault(run.method, [])
            if run.key not in keys[run.method]:
                keys[run.method].append(run.key)
        self.keys = {method: sorted(found) for method, found in keys.items()}

    def of(self, run: Run) -> dict:
        keys = self.keys[run.method]
        marker = MARKERS[keys.index(run.key) % len(MARKERS)] if len(keys) > 1 else None
        return {"color": self.colors[run.method], "marker": marker, "markersize": 4}


def series_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """A panel's runs per series (series_name: the method and the settings a grid varied)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(series_name(run, runs), []).append(run)
    return dict(sorted(groups.items()))


def _figure(rows: int, columns: int, legend_entries: int):
    """A grid of panels high enough for its rows and for the legend below them: axes never collapse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = PANEL_HEIGHT * rows + LEGEND_ROW * (math.ceil(legend_entries / 3) + 1) + 0.4
    figure, axes = plt.subplots(rows, columns, figsize=(SIZE[0], height), dpi=DPI, squeeze=False, layout="constrained")
    return plt, figure, axes


def legend_below(figure, entries: list[tuple[object, str]]) -> None:
    """One legend for the figure, below every panel (outside them: it never covers data)."""
    if entries:
        handles, labels = zip(*entries)
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=7)


def line_entry(label: str, **style) -> tuple[object, str]:
    from matplotlib.lines import Line2D

    return Line2D([], [], **{"color": "black", **style}), label


def _save(plt, figure, path: Path, data: pd.DataFrame, entries: list) -> Path | None:
    """The figure and, beside it, its data as CSV (one row per point: its panel, series and values), so
    that it can be drawn again. A layout matplotlib could not fit is refused with a line, not written."""
    import io
    import warnings

    from safetransfer.common.atomic import atomic_write_bytes, atomic_write_text

    legend_below(figure, entries)
    image = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:  # the layout is made while the PNG is rendered
        warnings.simplefilter("always")
        figure.savefig(image, format="png", dpi=DPI)
    plt.close(figure)
    if any(COLLAPSED in str(w.message) for w in caught):
        log.info("%s not drawn: its panels had no room (%d panels)", path.name, len(set(data["panel"])))
        return None
    atomic_write_bytes(path, image.getvalue())
    atomic_write_text(path.with_suffix(".csv"), data.to_csv(index=False))
    return path


def _band(axis, band: pd.DataFrame, label: str, style: dict, line: str = "-", floor: float | None = None) -> None:
    """The mean as a line, mean ± std as a shaded band (cut at `floor` on a log axis)."""
    lower = band["mean"] - band["std"]
    if floor is not None:
        lower = lower.clip(lower=floor)
    axis.plot(band["iteration"], band["mean"], linestyle=line, label=label, **style)
    axis.fill_between(
        band["iteration"], lower, band["mean"] + band["std"], color=style["color"], alpha=0.15, linewidth=0
    )


def band_rows(band: pd.DataFrame, panel: str, series: str, quantity: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"panel": panel, "series": series, "quantity": quantity, "x": band["iteration"], "mean": band["mean"],
         "std": band["std"], "n": band["n"]}
    )  # fmt: skip


def too_few_rows(runs: Sequence[Run], column: str) -> str | None:
    """Why no run has a curve of `column` (at least two logged rows), or None when one has."""
    if any(column in r.log and r.log[column].notna().sum() >= 2 for r in runs):
        return None
    run = runs[0]
    if column.startswith("angle"):
        return (
            "no run logged the angles on two rows or more (runtime.diagnostics_every=0, or too few log rows): "
            "rerun with runtime.diagnostics_every equal to runtime.log_every"
        )
    dense = max(1, run.iterations // 10) if run.iterations else 1
    return (
        f"every run logged fewer than two rows (runtime.log_every={run.log_every} over {run.iterations} "
        f"iterations): rerun with runtime.log_every={dense}"
    )


def series_entries(panels: dict[str, list[Run]], looks: Looks) -> list[tuple[object, str]]:
    """The legend's series, once each over all panels."""
    entries, seen = [], set()
    for group in panels.values():
        for series, members in series_groups(group).items():
            if series not in seen:
                seen.add(series)
                entries.append(line_entry(series, **looks.of(members[0])))
    return entries


def plot_losses(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """One panel per target and sampling rate (and source, where swept): J and the held-out loss per series."""
    why = too_few_rows(runs, "loss_J")
    if why:
        log.info("%s not drawn: %s", path.name, why)
        return None
    runs = [r for r in runs if "loss_J" in r.log and r.log["loss_J"].notna().sum() >= 2]
    held_out = next((c for c in ("val_loss", "test_loss") if any(c in r.log for r in runs)), None)
    panels, looks = facets(runs), Looks(runs, colors)
    columns = min(3, len(panels))
    entries = series_entries(panels, looks) + [line_entry("solid: empirical loss J (train)")]
    if held_out:
        entries.append(line_entry(f"dashed: {held_out.split('_')[0]} loss", linestyle="--"))
    plt, figure, axes = _figure(math.ceil(len(panels) / columns), columns, len(entries))
    data = []
    for axis, (panel, group) in zip(axes.flat, panels.items()):
        for series, members in series_groups(group).items():
            band = curve_band(members, "loss_J")
            _band(axis, band, series, looks.of(members[0]), floor=1e-3)
            data.append(band_rows(band, panel, series, "loss_J"))
            if held_out and len(curve_band(members, held_out)):
                band = curve_band(members, held_out)
                _band(axis, band, series, looks.of(members[0]), "--", floor=1e-3)
                data.append(band_rows(band, panel, series, held_out))
        axis.set_yscale("log")  # methods whose losses differ by orders of magnitude stay readable
        axis.set_title(panel, fontsize=9)
        axis.set(xlabel="iteration", ylabel="cross-entropy (log scale)")
    for axis in list(axes.flat)[len(panels) :]:
        axis.remove()  # the grid's last row, where the panels run out: no empty panel is drawn
    figure.suptitle("Empirical loss J and held-out loss (mean ± std over seeds; DTNH Fig. 3)", fontsize=10)
    return _save(plt, figure, path, pd.concat(data), entries)


ANGLE_PAIRS = (
    ("angle_d_J", "angle_sum_J", "Angle 1: d vs g_J", "Angle 3: g_J+g_Ω vs g_J"),
    ("angle_d_Omega", "angle_sum_Omega", "Angle 2: d vs g_Ω", "Angle 4: g_J+g_Ω vs g_Ω"),
)


def logged(runs: Sequence[Run], column: str) -> list[Run]:
    return [r for r in runs if column in r.log and r.log[column].notna().any()]


def plot_angles(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """The DTNH paper's Angles 1-4 (its Figs. 4 and 5) and, where logged, the angle between g_J and
    g_Omega (above 90 degrees DTNH removes cos^2 of it of the pull's squared length): a row of panels
    per target and sampling rate (and source, where swept)."""
    why = too_few_rows(runs, "angle_d_J")
    if why:
        log.info("%s not drawn: %s", path.name, why)
        return None
    runs = logged(runs, "angle_d_J")
    between = bool(logged(runs, "angle_J_Omega"))  # logs written before it was recorded have none
    panels, looks = facets(runs), Looks(runs, colors)
    entries = series_entries(panels, looks) + [
        line_entry("solid: Angle 1 / Angle 2 (d, the step taken)"),
        line_entry("dotted: Angle 3 / Angle 4 (g_J + g_Ω, the plain sum)", linestyle=":"),
    ]
    plt, figure, axes = _figure(len(panels), 3 if between else 2, len(entries))
    data = []
    for row, (panel, group) in zip(axes, panels.items()):
        for axis, (first, second, first_name, second_name) in zip(row, ANGLE_PAIRS):
            for series, members in series_groups(group).items():
                for column, line in ((first, "-"), (second, ":")):
                    band = curve_band(members, column)
                    _band(axis, band, series, looks.of(members[0]), line)
                    data.append(band_rows(band, panel, series, column))
            figure_number = 4 if first == "angle_d_J" else 5
            axis.set_title(
                f"{panel}: {first_name.split(':')[0]}, {second_name.split(':')[0]} (Fig. {figure_number})", fontsize=9
            )
            axis.set(xlabel="iteration", ylabel="angle (degrees)")
        if between:
            axis = row[2]
            for series, members in series_groups(group).items():
                band = curve_band(members, "angle_J_Omega")
                _band(axis, band, series, looks.of(members[0]))
                data.append(band_rows(band, panel, series, "angle_J_Omega"))
            axis.axhline(90.0, color="grey", linestyle="--", linewidth=0.8)
            axis.set_title(f"{panel}: g_J vs g_Ω (conflict above 90°)", fontsize=9)
            axis.set(xlabel="iteration", ylabel="angle (degrees)")
    return _save(plt, figure, path, pd.concat(data), entries)


def plot_spectra(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """The singular values of the test features, all and the smaller half: a row per target and sampling
    rate (and source, where swept), a colour per method, a marker per setting of a grid."""
    runs = [r for r in runs if r.spectrum]
    if not runs:
        return None
    panels, looks = facets(runs), Looks(runs, colors)
    entries = series_entries(panels, looks)
    plt, figure, axes = _figure(len(panels), 2, len(entries))
    data = []
    for row, (panel, group) in zip(axes, panels.items()):
        for series, members in series_groups(group).items():
            curve = spectrum_curve(members)
            index = np.arange(1, len(curve) + 1)
            style = {**looks.of(members[0]), "marker": looks.of(members[0])["marker"] or "."}
            row[0].plot(index, curve, label=series, **style)
            half = len(curve) // 2
            row[1].plot(index[half:], curve[half:], **style)
            data.append(
                pd.DataFrame(
                    {"panel": panel, "series": series, "quantity": "singular_value", "x": index, "mean": curve}
                )
            )
        row[0].set_title(f"{panel}: singular values of the batch features (BSS Figs. 1c, 3b)", fontsize=9)
        row[1].set_title(f"{panel}: the smaller half (BSS Figs. 1d, 3c)", fontsize=9)
        for axis in row:
            axis.set(xlabel="index (descending order)", ylabel="singular value")
    return _save(plt, figure, path, pd.concat(data), entries)


def numbers_of(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper layout's long frame (tables.paper_view) as plot_table reads it: rows (target, rate),
    columns (column, quantity)."""
    wide = frame.set_index(["target", "sampling_rate", "column"]).unstack("column")
    wide.columns = wide.columns.swaplevel().set_names(["method", "quantity"])
    return wide.reindex(columns=list(dict.fromkeys(frame["column"])), level="method")


def plot_table(numbers: pd.DataFrame, path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """Grouped bars from numbers_of's numbers: one group per (target, rate), one bar per method."""
    if numbers.empty:
        return None
    methods = list(dict.fromkeys(numbers.columns.get_level_values("method")))
    rows = [f"{t} {r:g}%" for t, r in numbers.index]
    compared = [m for m in methods if (numbers[(m, "paired_n")] >= 2).any()]
    plt, figure, grid = _figure(1, 2 if compared else 1, len(methods) + len(compared) + 1)
    axes = list(grid[0])
    axis = axes[0]
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(rows))
    colors = {**palette(methods), **(colors or {})}
    for index, method in enumerate(methods):
        means = numbers[(method, "mean")].to_numpy(dtype=float)
        stds = np.nan_to_num(numbers[(method, "std")].to_numpy(dtype=float))
        positions = x - 0.4 + width * (index + 0.5)
        axis.bar(positions, np.nan_to_num(means), width, yerr=stds, capsize=3, label=method, color=colors[method])
        published = numbers[(method, "published")].to_numpy(dtype=float)
        known = ~np.isnan(published)
        if known.any():
            published_std = np.nan_to_num(numbers[(method, "published_std")].to_numpy(dtype=float))
            axis.errorbar(
                positions[known],
                published[known],
                yerr=published_std[known],
                fmt="_",
                markersize=14,
                color="black",
                capsize=2,
                zorder=3,
                label="published ± std" if index == 0 else None,
            )
    axis.set_xticks(x, rows, rotation=20, ha="right")
    marked = numbers.xs("published", axis=1, level="quantity").notna().to_numpy().any()
    axis.set(
        title="Top-1 accuracy, mean ± std over seeds" + (" (black marks: published values)" if marked else ""),
        xlabel="target and sampling rate",
        ylabel="top-1 accuracy (%)",
    )
    if compared:  # each column against its reference column, seed by seed: mean and 95 % t interval
        paired_axis, step = axes[1], 0.8 / len(compared)
        for index, method in enumerate(compared):
            difference = numbers[(method, "paired_diff")].to_numpy(dtype=float)
            low, high = (numbers[(method, q)].to_numpy(dtype=float) for q in ("paired_low", "paired_high"))
            known = ~np.isnan(difference)
            positions = x - 0.4 + step * (index + 0.5)
            paired_axis.errorbar(
                positions[known],
                difference[known],
                yerr=[difference[known] - low[known], high[known] - difference[known]],
                fmt="o",
                capsize=3,
                color=colors[method],
                label=f"{method} − {next(r for r in numbers[(method, 'reference')] if isinstance(r, str) and r)}",
            )
        paired_axis.axhline(0, color="black", linewidth=0.8)
        paired_axis.set_xticks(x, rows, rotation=20, ha="right")
        paired_axis.set(
            title="Paired differences: mean, 95 % t interval",
            xlabel="target and sampling rate",
            ylabel="top-1 difference (points)",
        )
    entries, seen = [], set()
    for each in axes:
        for handle, label in zip(*each.get_legend_handles_labels()):
            if label not in seen:
                seen.add(label)
                entries.append((handle, label))
    data = numbers.copy()
    data.columns = [f"{method}: {quantity}" for method, quantity in data.columns]
    data = data.reset_index()
    data.insert(0, "panel", "table")  # one panel (and beside it the paired differences' panel)
    return _save(plt, figure, path, data, entries)


def search_points(records: pd.DataFrame) -> pd.DataFrame:
    """Each setting of every cell that holds several settings of one method (a grid, or Optuna's trials):
    its validation and test top-1 (mean, std over seeds) and whether it is the cell's choice, the best
    mean validation top-1 (the tables' rule; none without a validation split: nothing is chosen on test)."""
    from safetransfer.reporting import store
    from safetransfer.reporting.tables import cells, short_key, varied_keys

    table = cells(records)
    rows = []
    for cell, group in table.groupby(store.CELL, sort=True):
        if len(group) < 2:
            continue
        backbone, source, target, rate, method = cell
        varied = varied_keys(list(group["settings"]))
        chosen = group["val_mean"].idxmax() if group["val_mean"].notna().all() else None
        panel = f"{target} {rate:g}% {method}" + (f" [{source}]" if table["source"].nunique() > 1 else "")
        for index, row in group.iterrows():
            setting = " ".join(f"{short_key(k, varied)}={row['settings'].get(k)}" for k in varied)
            rows.append(
                {
                    "panel": panel,
                    "setting": setting or row["setting"][:8],
                    "val_mean": row["val_mean"],
                    "val_std": row["val_std"],
                    "test_mean": row["mean"],
                    "test_std": row["std"],
                    "seeds": row["seeds"],
                    "chosen": index == chosen,
                }
            )
    return pd.DataFrame(rows)


def plot_search(records: pd.DataFrame, path: Path) -> Path | None:
    """A panel per searched cell: the validation and test top-1 of each setting, the choice marked."""
    points = search_points(records)
    if points.empty:
        return None
    panels = list(dict.fromkeys(points["panel"]))
    columns = min(3, len(panels))
    entries = [
        line_entry("validation top-1 (what chooses)", marker="o", linestyle="none", color="tab:blue"),
        line_entry("test top-1 (reported, never chooses)", marker="s", linestyle="none", color="tab:orange"),
        line_entry(
            "the choice: best mean validation top-1", marker="*", linestyle="none", color="black", markersize=12
        ),
    ]
    plt, figure, axes = _figure(math.ceil(len(panels) / columns), columns, len(entries))
    for axis, panel in zip(axes.flat, panels):
        group = points[points["panel"] == panel].reset_index(drop=True)
        x = np.arange(len(group))
        if group["val_mean"].notna().any():
            axis.errorbar(
                x - 0.1, group["val_mean"], yerr=group["val_std"].fillna(0), fmt="o", color="tab:blue", capsize=2
            )
        axis.errorbar(
            x + 0.1, group["test_mean"], yerr=group["test_std"].fillna(0), fmt="s", color="tab:orange", capsize=2
        )
        for i in np.flatnonzero(group["chosen"].to_numpy()):
            axis.plot([x[i] - 0.1], [group["val_mean"][i]], "*", color="black", markersize=12)
        axis.set_xticks(x, group["setting"], rotation=25, ha="right", fontsize=7)
        chosen = "" if group["chosen"].any() else " (no validation split: nothing chosen)"
        axis.set_title(panel + chosen, fontsize=9)
        axis.set(ylabel="top-1 (%)")
    for axis in list(axes.flat)[len(panels) :]:
        axis.remove()
    figure.suptitle("The search: each setting's validation and test top-1 (mean ± std over seeds)", fontsize=10)
    return _save(plt, figure, path, points, entries)


def sweep_gains(records: pd.DataFrame) -> pd.DataFrame:
    """For each method, source and cell (target, rate): the paired gain over From scratch (the seeds it
    shares with the From scratch row of the same setting) and its 95 % t interval, the form a
    negative-transfer study is read in; without a From scratch row, the gain over the method's reference."""
    from safetransfer.reporting.tables import cells, pairs

    table = cells(records)
    if table.empty:
        return pd.DataFrame()
    table = table.assign(label=table["method"])
    links = pairs(table)
    rows = []
    for index, row in table.iterrows():
        if row["method"] == SCRATCH:
            continue
        link = links.loc[index]
        over, numbers = (
            ("From scratch", link["scratch_paired"]) if link["scratch"] else (link["reference"], link["paired"])
        )
        if not over or numbers is None or numbers[0] < 2:
            continue
        n, mean, low, high = numbers
        cell = f"{row['target']} {row['sampling_rate']:g}%"
        rows.append(
            {"panel": row["method"], "source": row["source"], "cell": cell, "over": over, "gain": mean, "low": low,
             "high": high, "seeds": n}
        )  # fmt: skip
    return pd.DataFrame(rows)


def plot_sweep(records: pd.DataFrame, path: Path) -> Path | None:
    """A heatmap per method: sources x targets (and rates), the paired gain over From scratch with its
    interval written in each square; drawn for a sweep over several sources or targets."""
    gains = sweep_gains(records)
    if gains.empty or (gains["source"].nunique() < 2 and gains["cell"].nunique() < 2):
        return None
    panels = list(dict.fromkeys(gains["panel"]))
    columns = min(2, len(panels))
    plt, figure, axes = _figure(math.ceil(len(panels) / columns), columns, 0)
    limit = float(np.nanmax(np.abs(gains["gain"]))) or 1.0
    for axis, panel in zip(axes.flat, panels):
        group = gains[gains["panel"] == panel]
        sources, targets = sorted(set(group["source"])), sorted(set(group["cell"]))
        grid = np.full((len(sources), len(targets)), np.nan)
        for row in group.itertuples():
            i, j = sources.index(row.source), targets.index(row.cell)
            grid[i, j] = row.gain
            ink = "white" if abs(row.gain) > limit / 2 else "black"  # readable on the dark squares too
            text = f"{row.gain:+.1f}\n[{row.low:+.1f}, {row.high:+.1f}]"
            axis.text(j, i, text, ha="center", va="center", fontsize=8, color=ink)
        image = axis.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_xticks(range(len(targets)), targets, rotation=20, ha="right", fontsize=8)
        axis.set_yticks(range(len(sources)), sources, fontsize=8)
        axis.set_title(f"{panel} − {', '.join(sorted(set(group['over'])))} (points, 95 % interval)", fontsize=9)
        figure.colorbar(image, ax=axis, shrink=0.8, label="paired gain (points)")
    for axis in list(axes.flat)[len(panels) :]:
        axis.remove()
    figure.suptitle("Transfer gain by source and target (blue: transfer helps; red: negative transfer)", fontsize=10)
    return _save(plt, figure, path, gains, [])


def main(argv: list[str] | None = None) -> None:
    from safetransfer.common.atomic import check_writable
    from safetransfer.common.errors import ConfigError
    from safetransfer.reporting import store
    from safetransfer.reporting.tables import paper_view, published_values

    parser = argparse.ArgumentParser(
        prog="safetransfer-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=Path("results") / "figures")
    parser.add_argument(
        "--published", help="mark the paper's values: dtnh_table2 | dtnh_table3 | dtnh_table4 | bss_table2"
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.directories if not d.is_dir()]
    if missing:
        parser.exit(2, f"safetransfer-plot: error: no such directory: {', '.join(missing)}\n")
    try:
        check_writable(args.out, "--out")
    except ConfigError as error:
        parser.exit(2, f"safetransfer-plot: error: {error}\n")
    runs = load_runs(args.directories)
    if not runs:
        parser.exit(2, "safetransfer-plot: error: no seed_*/log.csv under the given directories\n")
    try:
        if args.published:
            published_values(args.published)
        records = pd.DataFrame(store.records_under(args.directories, args.published), columns=store.COLUMNS)
        numbers = numbers_of(paper_view(records)[0]) if len(records) else pd.DataFrame()
    except ConfigError as error:
        numbers = None
        print(f"safetransfer-plot: no table figure: {error}")
    # one colour per method (series) in every figure, the table's columns included
    names = {series_name(run, runs, settings=False) for run in runs}
    if numbers is not None:
        names |= set(numbers.columns.get_level_values("method"))
    colors = palette(names)
    written = [
        plot_losses(runs, args.out / "losses.png", colors),
        plot_angles(runs, args.out / "angles.png", colors),
        plot_spectra(runs, args.out / "spectra.png", colors),
    ]
    if numbers is not None:
        written.append(plot_table(numbers, args.out / "table.png", colors))
        written.append(plot_search(records, args.out / "search.png"))
        written.append(plot_sweep(records, args.out / "sweep.png"))
    for name, column in (("losses.png", "loss_J"), ("angles.png", "angle_d_J")):
        why = too_few_rows(runs, column)
        if why:
            print(f"safetransfer-plot: {name} not drawn: {why}")
    for path in written:
        if path is not None:
            print(path)
