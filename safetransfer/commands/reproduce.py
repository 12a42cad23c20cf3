"""`safetransfer-reproduce TABLE [--plan] [--dir DIR] [overrides...]`: one of the papers'
tables as its paper made it, in two stages (safetransfer/reporting/search.py):

1. search: for each method with a grid (`search.grids`), every setting of the grid on
   every cell, trained on the training images minus a validation hold-out
   (`search.val_fraction`) with `search.seeds`; per cell the setting with the best mean
   validation top-1 goes into <DIR>/chosen.json;
2. final: every cell with its chosen setting on its whole training split, the table's
   seeds, scored on the test split; then <results.dir>/<TABLE>.md in the paper's layout
   with the published values and the chosen settings listed.

Each stage is a Hydra multirun of `safetransfer-train` (any launcher: launcher=slurm ...)
into a fixed directory under DIR (default multirun/<TABLE>): rerunning the same command
keeps every finished seed and trains only what is missing. `--plan` prints every job of
both stages and the projected GPU hours, without training.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from safetransfer.commands.train import compose
from safetransfer.common.errors import ConfigError
from safetransfer.common.overrides import split_sweeps
from safetransfer.common.signals import STOP_SIGNALS, Preempted, StopSignals
from safetransfer.job.fetch import READY, summary
from safetransfer.reporting.search import choose, write_chosen

TABLES = ("dtnh_table2", "dtnh_table3", "dtnh_table4", "bss_table2")


def compose_job(table: str, overrides: list[str]) -> DictConfig:
    return compose([f"experiment={table}", *overrides])


def sweep_axes(cfg: DictConfig, sweeps: dict[str, list[str]], plain: list[str]) -> dict[str, list[str]]:
    """The table's cells as sweep axes: the preset's sweeper params, with the command line's
    sweeps and single values of the same keys taking their place."""
    axes = {k: [v.strip() for v in str(values).split(",")] for k, values in cfg.hydra.sweeper.params.items()}
    for text in plain:
        key, _, value = text.partition("=")
        if key in axes:
            axes[key] = [value]
    axes.update(sweeps)
    return axes


@dataclass
class Job:
    stage: str  # "search" or "final"
    cell: dict[str, str]  # the sweep axes' values
    setting: dict[str, str]  # the grid's values (search) or {} (final: the chosen values)
    seeds: int
    iterations: int
    backbone: str
    regularizer: str
    direction: str
    crop: int
    batch: int
    precision: str = "fp32"  # train.precision
    searched: bool = False  # the method has a grid: stage 2 takes the values chosen on validation


def cells(table: str, overrides: list[str]):
    """(cell, its composed config) for every cell of the table, the command line's sweeps included."""
    sweeps, plain = split_sweeps(overrides)
    axes = sweep_axes(compose_job(table, plain), sweeps, plain)
    for values in itertools.product(*axes.values()):
        cell = dict(zip(axes, values))
        yield cell, compose_job(table, [*plain, *(f"{k}={v}" for k, v in cell.items())])


def composer(overrides: list[str]):
    """compose(more) of the main config with the command line's paths.* overrides (where data lies)."""
    paths = [o for o in split_sweeps(overrides)[1] if o.lstrip("+").startswith("paths.")]
    return lambda more: compose([*more, *paths])


def table_data(table: str, overrides: list[str], download: bool) -> list:
    """Every artifact the table's jobs read, fetched (`download`) or checked (safetransfer/job/fetch.py)."""
    from safetransfer.job.fetch import fetch_all

    return fetch_all((cfg for _, cfg in cells(table, overrides)), download, composer(overrides))


def plan(table: str, overrides: list[str]) -> tuple[list[Job], DictConfig]:
    _, plain = split_sweeps(overrides)
    base = compose_job(table, plain)
    grids = {m: list(g) for m, g in base.search.grids.items()}
    jobs = []
    for cell, cfg in cells(table, overrides):
        choices = cfg.hydra.runtime.choices
        common = dict(
            iterations=int(cfg.train.iterations),
            backbone=cfg.backbone.name,
            regularizer=choices.regularizer,
            direction=choices.direction,
            crop=int(cfg.data.crop),
            batch=int(cfg.train.batch_size),
            precision=str(cfg.train.precision),
        )
        grid = grids.get(choices.get("method") or "", [])
        if grid:
            grid_axes = {k: v.split(",") for k, v in (o.split("=", 1) for o in grid)}
            for setting in itertools.product(*grid_axes.values()):
                jobs.append(Job("search", cell, dict(zip(grid_axes, setting)), len(cfg.search.seeds), **common))
        jobs.append(Job("final", cell, {}, len(cfg.seeds), **common, searched=bool(grid)))
    return jobs, base


#: the method each cell of scripts/benchmark_cell.py trains (BENCHMARKS.json, cuda-cell)
CELL_METHODS = {"dtnh": ("resnet18", "l2sp", "dtnh"), "bss": ("resnet50", "l2_bss", "sum")}


@dataclass(frozen=True)
class Figures:
    """The step times scripts/benchmark.py and scripts/benchmark_cell.py wrote to BENCHMARKS.json, for
    one kind of device (the CUDA figures when there are some)."""

    kind: str  # "cuda" or "cpu"
    ms_per_step: dict[tuple[str, str, str], float]  # by (backbone, regularizer, direction)
    px: float
    batch: int
    #: {(backbone, concurrent seeds): a whole job's seconds per seed and iteration, end to end (start, data,
    #: evaluation, the seeds one after another or concurrently), over the model-only step of the same method}
    cell_factors: dict
    precision: str  # the precision the step times were measured in
    #: {(backbone, precision): the Fine-tuning step in that precision over the step in `precision`}
    precision_scales: dict


def benchmark_figures(path: Path) -> Figures | None:
    """The figures of BENCHMARKS.json at `path`, None when it has none."""
    found = json.loads(path.read_text()) if path.exists() else {}
    for kind in ("cuda", "cpu"):
        figures = found.get(kind) or {}
        steps = figures.get("ms_per_step", {})
        rows = {(b, r, d): float(ms) for b, rs in steps.items() for r, ds in rs.items() for d, ms in ds.items()}
        if not rows:
            continue
        precision = str(figures.get("precision", "fp32"))
        scales = {
            (backbone, other): float(ms) / float(by[precision])
            for backbone, by in figures.get("fine_tuning_ms_by_precision", {}).items()
            if precision in by
            for other, ms in by.items()
        }
        cells, factors = found.get(f"{kind}-cell", {}), {}
        for cell, modes in cells.get("seconds_per_iteration", {}).items():
            method = CELL_METHODS.get(cell)
            for mode, seconds in modes.items() if method in rows else ():
                # over the model-only step in the precision the cell trained in
                trained = cells.get("precision", {}).get(cell, {}).get(mode, precision)
                model_only = 1.0 if trained == precision else scales.get((method[0], trained))
                if model_only is not None:
                    factors[(method[0], mode == "concurrent")] = 1000 * float(seconds) / (rows[method] * model_only)
        return Figures(kind, rows, float(figures["px"]), int(figures["batch"]), factors, precision, scales)
    return None


def precision_factor(backbone: str, precision: str, figures: Figures) -> float | None:
    """A step in `precision` over the figures' (1 when they are the same), None when not measured."""
    return 1.0 if precision == figures.precision else figures.precision_scales.get((backbone, precision))


def job_hours(job: Job, figures: Figures, concurrent: bool = False) -> float | None:
    """Model-only step time scaled to the job's pixels and batch and to its precision (the
    figures' own when no other was measured beside them, see precision_note), times the measured
    cell's end-to-end factor for the job's backbone and way of running seeds, when there is one."""
    ms = figures.ms_per_step.get((job.backbone, job.regularizer, job.direction))
    if ms is None:
        return None
    ms *= precision_factor(job.backbone, job.precision, figures) or 1.0
    scale = (job.crop / figures.px) ** 2 * (job.batch / figures.batch)  # pixels and images per step
    concurrent = concurrent and job.seeds > 1  # a single seed runs alone (runtime.concurrent_seeds)
    factors = figures.cell_factors
    # no measured cell for concurrent seeds: the sequential one (the slower), else model steps only
    factor = factors.get((job.backbone, concurrent), factors.get((job.backbone, False), 1.0))
    return ms * scale * factor * job.iterations * job.seeds / 3.6e6


def precision_note(jobs: list[Job], figures: Figures) -> str:
    """Which precision the hours assume: the jobs' own (train.precision), measured or scaled by
    the Fine-tuning step measured in both, or the figures' when nothing scales them."""
    measured, lines = figures.precision, []
    for precision in sorted({job.precision for job in jobs}):
        backbones = sorted({job.backbone for job in jobs if job.precision == precision})
        factors = {b: precision_factor(b, precision, figures) for b in backbones}
        said = f"the jobs train in {precision} (train.precision)"
        if precision == measured:
            lines.append(f"{said} and the step times were measured in it")
        elif all(f is not None for f in factors.values()):
            ratios = ", ".join(f"{b} {f:.2f}x" for b, f in factors.items())
            lines.append(
                f"{said}; the step times were measured in {measured} and are scaled by the {precision}/{measured} "
                f"Fine-tuning step measured beside them ({ratios})"
            )
        else:
            lines.append(
                f"{said} but the step times were measured in {measured} with no {precision} step beside them: "
                f"these hours assume {measured}"
            )
    return "precision: " + "; ".join(lines)


def figures_source(figures: Figures, concurrent: bool) -> str:
    """Where the projected hours come from, in words."""
    mode = "concurrent seeds" if concurrent else "seeds one after another"
    used = [
        f"{b} {f:.2f} ({mode if c else 'seeds one after another'})"
        for (b, c), f in sorted(figures.cell_factors.items())
        if c == concurrent or (b, concurrent) not in figures.cell_factors
    ]
    if figures.kind == "cuda" and used:
        return (
            "measured on a GPU: model-only step times x the end-to-end factor of a measured cell, "
            f"{', '.join(used)}; {figures.precision} step times, BENCHMARKS.json"
        )
    if figures.kind == "cuda":
        return f"measured on a GPU, {figures.precision} step times; model steps only (no measured cell for {mode})"
    return (
        f"a CPU projection: BENCHMARKS.json has no GPU figures yet, so its CPU {figures.precision} step times "
        f"({figures.px:g} px, batch {figures.batch}) are scaled by pixels and batch size; a GPU is far faster; "
        "model steps only"
    )


def print_plan(table: str, jobs: list[Job], figures: Figures | None, concurrent: bool = False) -> None:
    hours, unknown = {"search": 0.0, "final": 0.0}, 0
    print(f"{table}: every job of both stages (cells x settings; seeds x iterations each)")
    for job in jobs:
        h = job_hours(job, figures, concurrent) if figures else None
        unknown += h is None
        hours[job.stage] += h or 0.0
        cell = " ".join(f"{k}={v}" for k, v in job.cell.items())
        setting = " ".join(f"{k}={v}" for k, v in job.setting.items())
        if job.stage == "final":
            setting = "chosen on validation" if job.searched else "the preset's values (no grid)"
        hours_text = f" | {h:.2f} h" if h is not None else ""
        print(f"  {job.stage:6} {cell} | {setting} | {job.seeds} x {job.iterations} it{hours_text}")
    counts = {stage: sum(j.stage == stage for j in jobs) for stage in hours}
    print(f"{counts['search']} search jobs, {counts['final']} final jobs, {len(jobs)} in all")
    if not figures:
        print("projected hours: no BENCHMARKS.json found (run python scripts/benchmark.py)")
        return
    print(
        f"projected hours: search {hours['search']:.1f} h, final {hours['final']:.1f} h, total "
        f"{sum(hours.values()):.1f} h ({figures_source(figures, concurrent)})"
        + (f"; {unknown} jobs have no figure" if unknown else "")
    )
    print(precision_note(jobs, figures))


def run_train(arguments: list[str]) -> int:
    """`safetransfer-train ARGUMENTS` in this process (Hydra's multirun and its launcher, the
    end-of-sweep report included); its exit code."""
    from safetransfer.commands import train

    print("+ safetransfer-train " + " ".join(arguments), flush=True)
    saved = sys.argv
    sys.argv = ["safetransfer-train", *arguments]
    try:
        train.main()
        return 0
    except SystemExit as stop:  # Hydra exits non-zero when a job failed
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = saved


def run_stage(arguments: list[str]) -> None:
    """One stage: `safetransfer-train -m ARGUMENTS`, in this process. A stage stopped by a signal
    (its job exits 128 + the signal, its checkpoint written) stops the command with that code."""
    code = run_train(["-m", *arguments])
    stopped = {128 + s: s.name for s in STOP_SIGNALS}
    where = next((a.split("=", 1)[1] for a in arguments if a.startswith("hydra.sweep.dir=")), "its folder")
    if code in stopped:
        print(
            f"safetransfer-reproduce: stopped by {stopped[code]} in the stage of {where}; rerun the same "
            "command to continue: finished seeds are kept and the stopped seed resumes from its checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(code)
    if code:
        raise SystemExit(
            "safetransfer-reproduce: a stage ended with failed jobs (listed above); fix them and rerun "
            "the same command: finished seeds are kept"
        )


#: the overrides a source's pretraining takes from the table's command line: where and how it
#: runs, never what (a table's target=... is not the source's dataset)
PRETRAINING_KEYS = ("paths.", "runtime.", "hydra.launcher")


def sources_to_make(table: str, overrides: list[str]) -> list[tuple[str, str, Path, str]]:
    """(dataset, backbone, path, the artifact's name in fetch's report) of each source the table's
    jobs read that a pretraining run makes (experiment=pretrain_source: Table IV's Stanford Dogs
    source) and that is not there yet."""
    from safetransfer.common.registry import build
    from safetransfer.sources.base import own_keys
    from safetransfer.sources.local import PretrainedSource

    found = {}
    for _, cfg in cells(table, overrides):
        own_keys(cfg.source)
        source = build("source", cfg.source, "source")
        if isinstance(source, PretrainedSource) and not source.path.exists():
            found[source.path] = (
                source.dataset,
                cfg.backbone.name,
                source.path,
                f"source={cfg.source.name} backbone={cfg.backbone.name}",
            )
    return list(found.values())


def make_sources(made: list[tuple[str, str, Path, str]], overrides: list[str], root: Path) -> None:
    """Stage 0: the sources a pretraining run makes (sources_to_make), each once (a rerun keeps
    its finished seed)."""
    _, plain = split_sweeps(overrides)
    kept = [o for o in plain if o.lstrip("+~").startswith(PRETRAINING_KEYS)]
    for dataset, backbone, path, _ in made:
        arguments = [
            "experiment=pretrain_source",
            f"target={dataset}",
            f"backbone={backbone}",
            f"pretrain.save_to={path}",
            *kept,
            f"hydra.run.dir={root / 'sources' / f'{backbone}_{dataset}'}",
        ]
        run_train(arguments)
        if not path.is_file():
            raise SystemExit(
                f"safetransfer-reproduce: the source pretraining did not write {path} (see above); "
                "fix it and rerun the same command"
            )


def reproduce(table: str, overrides: list[str], root: Path, made: list | None = None) -> Path:
    """Both stages of `table`, after making the sources a pretraining run makes (`made`, from
    sources_to_make; found here when not given)."""
    import pandas as pd

    from safetransfer.reporting import store
    from safetransfer.reporting.tables import view_path

    make_sources(sources_to_make(table, overrides) if made is None else made, overrides, root)
    sweeps, plain = split_sweeps(overrides)
    base = compose_job(table, plain)
    grids = {m: list(g) for m, g in base.search.grids.items()}
    searched_dirs = []
    methods = sweep_axes(base, sweeps, plain).get("method", [])
    for method in methods:
        grid = grids.get(method)
        if not grid:
            continue
        directory = root / "search" / method
        searched_dirs.append(directory)
        run_stage(
            [
                f"experiment={table}",
                *overrides,
                f"method={method}",
                *grid,
                f"target.val_fraction={base.search.val_fraction}",
                f"seeds=[{','.join(map(str, base.search.seeds))}]",
                f"hydra.sweep.dir={directory}",
                f"results.table={base.results.table}_search",
                "results.published=null",
            ]
        )
    chosen_path = root / "chosen.json"
    if searched_dirs:
        records = pd.DataFrame(store.records_under(searched_dirs), columns=store.COLUMNS)
        write_chosen(chosen_path, table, choose(records, grids), sorted(set(records["method"])))
    else:
        write_chosen(chosen_path, table, {}, [])
    run_stage(
        [
            f"experiment={table}",
            *overrides,
            f"search.chosen={chosen_path.resolve()}",
            "target.val_fraction=0",
            f"hydra.sweep.dir={root / 'final'}",
        ]
    )
    path = view_path(Path(base.results.dir), str(base.results.table), "paper")
    print(path.read_text(), end="")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="safetransfer-reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", help=f"an experiment preset with a search: {', '.join(TABLES)}")
    parser.add_argument("overrides", nargs="*", help="safetransfer-train overrides for both stages")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print every job, the projected hours and whether the data is ready; train nothing",
    )
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="download and verify every checkpoint, dataset and list the table's jobs read; train nothing",
    )
    parser.add_argument("--dir", type=Path, help="where both stages run (default multirun/<table>)")
    parser.add_argument(
        "--benchmarks",
        type=Path,
        help="the step times the plan projects from (default: the repository's BENCHMARKS.json, else "
        "./BENCHMARKS.json; written by scripts/benchmark.py and scripts/benchmark_cell.py)",
    )
    args = parser.parse_intermixed_args(argv)
    one_line_errors(parser, lambda: run(args), stops=args.plan or args.fetch)


def one_line_errors(parser: argparse.ArgumentParser, action, stops: bool = False):
    """action(), a ConfigError or a bad override or preset name (Hydra's message) reported in one line;
    `stops`: a stop request (Ctrl-C, SIGTERM) ends it at once in one line, exit 128 + the signal."""
    try:
        with StopSignals() if stops else contextlib.nullcontext():
            return action()
    except Preempted as stopped:
        parser.exit(128 + stopped.signum, f"{parser.prog}: {stopped.text('run the same command to continue')}\n")
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except Exception as error:
        if type(error).__module__.startswith(("hydra", "omegaconf")):
            parser.exit(2, f"{parser.prog}: error: {'; '.join(filter(None, str(error).splitlines()[:2]))}\n")
        raise


def run(args: argparse.Namespace) -> None:
    """safetransfer-reproduce's three modes: --plan, --fetch, and both stages."""
    if args.plan:
        jobs, base = plan(args.table, args.overrides)
        repository = Path(__file__).resolve().parents[1] / "BENCHMARKS.json"
        candidates = [args.benchmarks] if args.benchmarks else [repository, Path("BENCHMARKS.json")]
        figures = next((f for f in map(benchmark_figures, candidates) if f), None)
        print_plan(args.table, jobs, figures, bool(base.runtime.concurrent_seeds))
        for dataset, backbone, path, _ in sources_to_make(args.table, args.overrides):
            print(
                f"Made first: the source {path} (experiment=pretrain_source target={dataset} backbone={backbone}, "
                "one seed, every training image; not in the hours above)"
            )
        print(f"{args.table}: the data its jobs read (checked, nothing downloaded)")
        outcomes = table_data(args.table, args.overrides, download=False)
        print(summary(outcomes, f"safetransfer-reproduce {args.table} --fetch"))
        return
    if args.fetch:
        outcomes = table_data(args.table, args.overrides, download=True)
        print(summary(outcomes, f"rerunning safetransfer-reproduce {args.table} --fetch"))
        if any(o.status not in READY for o in outcomes):
            sys.exit(1)
        return
    # the data, checked once before any job: a missing dataset would fail every job of its row;
    # a source a pretraining run makes is made first (its own inputs are among those checked)
    made = sources_to_make(args.table, args.overrides)
    made_names = {name for *_, name in made}
    outcomes = table_data(args.table, args.overrides, download=False)
    missing = [o for o in outcomes if o.status not in READY and o.artifact not in made_names]
    if missing:
        raise SystemExit(
            f"safetransfer-reproduce: error: {len(missing)} of the {len(outcomes)} artifacts the table's jobs "
            f"read are not ready (listed above); nothing was trained: run safetransfer-reproduce "
            f"{args.table} --fetch, or place what cannot be downloaded as listed"
        )
    reproduce(args.table, args.overrides, args.dir or Path("multirun") / args.table, made)


def fetch_main(argv: list[str] | None = None) -> None:
    """safetransfer-fetch [overrides]: download and verify what the jobs of these overrides read."""
    from safetransfer.job.fetch import fetch_all

    parser = argparse.ArgumentParser(
        prog="safetransfer-fetch",
        description=(
            "Download and verify every source checkpoint, target dataset and sample list that safetransfer-train "
            "with the same overrides would read (comma sweeps included), one line each; exit 1 when anything is "
            "not ready. For a paper's table: safetransfer-reproduce TABLE --fetch."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="safetransfer-train overrides, e.g. source=imagenet target=cub200")
    parser.add_argument("--check", action="store_true", help="only check what is there; download nothing")
    args = parser.parse_args(argv)

    def fetch_configs():
        sweeps, plain = split_sweeps(args.overrides)
        compose_more = composer(args.overrides)
        configs = (
            compose_more([*plain, *(f"{k}={v}" for k, v in zip(sweeps, values))])
            for values in itertools.product(*sweeps.values())
        )
        return fetch_all(configs, not args.check, compose_more)

    outcomes = one_line_errors(parser, fetch_configs, stops=True)
    print(summary(outcomes, "safetransfer-fetch with the same overrides"))
    if any(o.status not in READY for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
