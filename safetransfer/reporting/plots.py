"""Figures from run and sweep directories, as PNG files (matplotlib, no display needed):

    safetransfer-plot multirun/2026-11-22/10-00-00-000000 [--out results/figures] [--published dtnh_table2]

1. losses.png: the empirical loss J and the held-out loss (runtime.eval_every) against
   the iteration, one line per method, mean over seeds with a +-1 std band (DTNH Fig. 3);
2. angles.png: Angle 1 against Angle 3 and Angle 2 against Angle 4 (DTNH Figs. 4 and 5);
3. spectra.png: the singular values of the pooled test-batch features in descending
   order, all and the smaller half, one line per method and sampling rate (BSS Figs. 1c/d, 3b/c);
4. table.png: the results table as grouped bars with error bars (methods x targets),
   published values marked where known.
The numbers each figure draws come from the functions below, so they can be checked.
"""

from __future__ import annotations

import argparse
import logging
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


def _labels(runs: Sequence[Run], by_rate: bool = False) -> dict[str, tuple[str, list[Run]]]:
    """Runs grouped per line: {label: (series, runs)}; the series (series_name) picks the colour,
    the label adds the target and rate when the runs mix those (`by_rate`: always the rate, for
    the spectra)."""
    cells = len({(r.target, r.sampling_rate) for r in runs}) > 1
    groups: dict[str, tuple[str, list[Run]]] = {}
    for run in runs:
        series = series_name(run, runs)
        label = series
        if cells and not by_rate:
            label += f", {run.target} {run.sampling_rate:g}%"
        elif by_rate:
            label += f", {run.sampling_rate:g}%" + (f" ({run.target})" if len({r.target for r in runs}) > 1 else "")
        groups.setdefault(label, (series, []))[1].append(run)
    return groups


def palette(names: Iterable[str]) -> dict[str, str]:
    """One colour per method name, the same in every figure of a call (sorted names, tab10 then tab20)."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors[1::2])
    return {name: matplotlib.colors.to_hex(colours[i % len(colours)]) for i, name in enumerate(sorted(set(names)))}


def series_colors(runs: Sequence[Run], methods: dict[str, str] | None = None) -> dict[str, str]:
    """The colour of every series: its method's (`methods`, a palette of method names), in shades
    from dark to light when a grid gives the method several series."""
    import matplotlib.colors

    parts: dict[str, set[str]] = {}
    for run in runs:
        parts.setdefault(series_name(run, runs, settings=False), set()).add(series_name(run, runs))
    methods = {**palette(parts), **(methods or {})}
    colours = {}
    for method, variants in parts.items():
        base = np.asarray(matplotlib.colors.to_rgb(methods[method]))
        for index, variant in enumerate(sorted(variants)):
            t = index / (len(variants) - 1) if len(variants) > 1 else 0.5
            shade = base * (0.55 + 0.45 * t / 0.5) if t <= 0.5 else base + (1 - base) * (t - 0.5) * 0.9
            colours[variant] = matplotlib.colors.to_hex(np.clip(shade, 0, 1))
    return colours


def legend_below(figure, axes) -> None:
    """One legend for the figure, outside every axis (below them): it never covers data."""
    handles, labels = {}, []
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        figure.legend(
            [handles[label] for label in labels],
            labels,
            loc="outside lower center",
            ncols=min(3, len(labels)),
            fontsize=7,
        )


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


def _figure(columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=SIZE, dpi=DPI, squeeze=False, layout="constrained")
    return plt, figure, list(axes[0])


def _save(plt, figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    legend_below(figure, figure.axes)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _band(axis, band: pd.DataFrame, label: str, color, style: str = "-", floor: float | None = None) -> None:
    """The mean as a line, mean ± std as a shaded band (cut at `floor` on a log axis)."""
    lower = band["mean"] - band["std"]
    if floor is not None:
        lower = lower.clip(lower=floor)
    axis.plot(band["iteration"], band["mean"], style, color=color, label=label)
    axis.fill_between(band["iteration"], lower, band["mean"] + band["std"], color=color, alpha=0.2, linewidth=0)


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


def plot_losses(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    why = too_few_rows(runs, "loss_J")
    if why:
        log.info("%s not drawn: %s", path.name, why)
        return None
    held_out = next((c for c in ("val_loss", "test_loss") if any(c in r.log for r in runs)), None)
    plt, figure, (axis,) = _figure(1)
    groups = _labels(runs)
    colors = series_colors(runs, colors)
    for label, (series, group) in groups.items():
        color = colors[series]
        _band(axis, curve_band(group, "loss_J"), f"{label}: empirical loss J (train)", color, floor=1e-3)
        if held_out:
            band = curve_band(group, held_out)
            if len(band):
                _band(axis, band, f"{label}: {held_out.split('_')[0]} loss", color, "--", floor=1e-3)
    axis.set_yscale("log")  # methods whose losses differ by orders of magnitude stay readable
    axis.set(
        title="Empirical loss J and held-out loss (mean ± std over seeds; DTNH Fig. 3)",
        xlabel="iteration",
        ylabel="cross-entropy (nats, log scale)",
    )
    return _save(plt, figure, path)


ANGLE_PAIRS = (
    ("angle_d_J", "angle_sum_J", "Angle 1: d vs g_J", "Angle 3: g_J+g_Ω vs g_J"),
    ("angle_d_Omega", "angle_sum_Omega", "Angle 2: d vs g_Ω", "Angle 4: g_J+g_Ω vs g_Ω"),
)


def logged(runs: Sequence[Run], column: str) -> list[Run]:
    return [r for r in runs if column in r.log and r.log[column].notna().any()]


def plot_angles(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    """The DTNH paper's Angles 1-4 (its Figs. 4 and 5) and, where logged, the angle between
    g_J and g_Omega: above 90 degrees DTNH removes cos^2 of it of the pull's squared length."""
    why = too_few_rows(runs, "angle_d_J")
    if why:
        log.info("%s not drawn: %s", path.name, why)
        return None
    runs = logged(runs, "angle_d_J")
    between = bool(logged(runs, "angle_J_Omega"))  # logs written before it was recorded have none
    plt, figure, axes = _figure(3 if between else 2)
    groups = _labels(runs)
    colors = series_colors(runs, colors)
    for axis, (first, second, first_name, second_name) in zip(axes, ANGLE_PAIRS):
        for label, (series, group) in groups.items():
            color = colors[series]
            _band(axis, curve_band(group, first), f"{label}: {first_name}", color)
            _band(axis, curve_band(group, second), f"{label}: {second_name}", color, ":")
        figure_number = 4 if first == "angle_d_J" else 5
        axis.set_title(
            f"{first_name.split(':')[0]} and {second_name.split(':')[0]} (DTNH Fig. {figure_number})", fontsize=10
        )
        axis.set(xlabel="iteration", ylabel="angle (degrees)")
    if between:
        axis = axes[2]
        for label, (series, group) in groups.items():
            _band(axis, curve_band(group, "angle_J_Omega"), f"{label}: g_J vs g_Ω", colors[series])
        axis.axhline(90.0, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title("g_J vs g_Ω (conflict above 90°)", fontsize=10)
        axis.set(xlabel="iteration", ylabel="angle (degrees)")
    return _save(plt, figure, path)


def plot_spectra(runs: Sequence[Run], path: Path, colors: dict[str, str] | None = None) -> Path | None:
    runs = [r for r in runs if r.spectrum]
    if not runs:
        return None
    plt, figure, axes = _figure(2)
    groups = _labels(runs, by_rate=True)
    colors = series_colors(runs, colors)
    rates = sorted({r.sampling_rate for r in runs})
    styles = ["-", "--", ":", "-."]
    for label, (series, group) in sorted(groups.items()):
        curve = spectrum_curve(group)
        index = np.arange(1, len(curve) + 1)
        style = dict(
            color=colors[series],
            linestyle=styles[rates.index(group[0].sampling_rate) % len(styles)],
            marker=".",
            label=label,
        )
        axes[0].plot(index, curve, **style)
        half = len(curve) // 2
        axes[1].plot(index[half:], curve[half:], **{**style, "label": None})
    axes[0].set(
        title="Singular values of the batch features (BSS Figs. 1c, 3b)",
        xlabel="index (descending order)",
        ylabel="singular value",
    )
    axes[1].set(title="The smaller half (BSS Figs. 1d, 3c)", xlabel="index (descending order)", ylabel="singular value")
    return _save(plt, figure, path)


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
    plt, figure, axes = _figure(2 if compared else 1)
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
    return _save(plt, figure, path)


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
    for name, column in (("losses.png", "loss_J"), ("angles.png", "angle_d_J")):
        why = too_few_rows(runs, column)
        if why:
            print(f"safetransfer-plot: {name} not drawn: {why}")
    for path in written:
        if path is not None:
            print(path)
