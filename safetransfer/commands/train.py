"""`safetransfer-train`: the Hydra entrypoint.

With no arguments it runs the embedded demo (`experiment=demo`). Otherwise it composes
conf/config.yaml with the command-line overrides, fine-tunes once per seed and writes
the job's row to the results table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from safetransfer.common.atomic import check_writable
from safetransfer.common.errors import ConfigError, SafetransferError, one_line
from safetransfer.common.overrides import group_values, parse_overrides

log = logging.getLogger(__name__)

CONFIG_PACKAGE = "safetransfer.conf"


def cuda_device_count() -> int:
    """For launcher=gpus: as many parallel jobs as this machine has visible GPUs (at least one)."""
    import torch

    return max(torch.cuda.device_count(), 1)


OmegaConf.register_new_resolver("safetransfer.cuda_device_count", cuda_device_count, replace=True)


def group_options(group: str) -> list[str] | None:
    """The choices of a config group shipped with the package, or None if `group` is not one."""
    folder = resources.files(CONFIG_PACKAGE).joinpath(group)
    if not folder.is_dir():
        return None
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def check_group_choices(arguments: list[str]) -> None:
    """Refuse an unknown choice for a config group in one line, before Hydra composes anything."""
    for override in parse_overrides(arguments) or []:
        options = group_options(override.key_or_group)
        if options is None or override.is_delete():
            continue
        for choice in group_values(override) or []:
            if choice not in options and choice != "null":
                raise ConfigError(
                    f"{override.key_or_group}={choice} is not a known choice; allowed: {', '.join(options)}"
                )


#: maps meant to take new keys with `+`, e.g. +search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.1,1"]
OPEN_MAPS = ("search.grids", "bss_lists")


def _dotted_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys.add(name)
            keys |= _dotted_keys(value, name + ".")
    return keys


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether `dotted` names a node of `cfg`, a missing value (???) included."""
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None, throw_on_resolution_failure=False) if parent_key else cfg
    return isinstance(parent, DictConfig) and leaf in list(parent.keys())


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to look up
        return False


def output_dirs(arguments: list[str]) -> list[tuple[str, Path]]:
    """(key, folder) of each hydra.run.dir / hydra.sweep.dir the command line gives as a plain path."""
    found = []
    for argument in arguments:
        key, _, value = argument.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            found.append((key, Path(value).expanduser()))
    return found


def check_dirs_free(arguments: list[str]) -> None:
    """The run directory (or a job directory of the sweep folder) another job holds is refused
    before Hydra writes this job's .hydra/ files over the running job's."""
    from safetransfer.job.lock import check_free

    for key, path in output_dirs(arguments):
        if key == "hydra.run.dir":
            check_free(path)
        elif path.is_dir():
            for job_dir in sorted(p for p in path.iterdir() if p.is_dir()):
                check_free(job_dir)


def check_output_dirs(arguments: list[str]) -> None:
    """hydra.run.dir and hydra.sweep.dir, when given, can be made and written: Hydra makes them
    before any of ours runs, and its refusal is a traceback (a read-only place, a name too long).
    Tried by making them, then removing what the trial made: a refused command leaves nothing."""
    for key, path in output_dirs(arguments):
        whole = Path(os.path.abspath(path))  # `..` resolved as the file system will
        made = [folder for folder in (whole, *whole.parents) if not exists(folder)]  # deepest first
        try:
            check_writable(path, key, "safetransfer-runs")
        finally:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break


def check_keys(arguments: list[str]) -> None:
    """Refuse an override of a key the config does not have, in one line naming the closest
    known keys, before Hydra composes anything. Hydra's own message suggests `+key=value`,
    which adds a key nothing reads: a `+` key is refused too, except under OPEN_MAPS."""
    import difflib
    import itertools

    from hydra import compose, initialize_config_module

    overrides = parse_overrides(arguments)
    if overrides is None:
        return
    choices, keyed = {}, []
    for override in overrides:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.is_delete():
            continue  # Hydra's own keys and groups (hydra/sweeper=optuna): Hydra judges them
        if group_options(key) is None:
            keyed.append(override)
            continue
        values = group_values(override)
        if values is None:
            return  # range() or glob() over a group: left to Hydra
        choices[key] = values
    if not keyed:
        return
    configs = []
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        # the first combination of the swept groups, then more only while a key is not found
        for combination in itertools.islice(itertools.product(*choices.values()), 32):
            try:
                configs.append(compose("config", overrides=[f"{g}={v}" for g, v in zip(choices, combination)]))
            except Exception:
                return  # Hydra reports what is wrong with the composition itself
            keyed = [o for o in keyed if not _has_key(configs[-1], o.key_or_group)]
            if not keyed:
                return
    for override in keyed:
        key, added = override.key_or_group, override.is_add() or override.is_force_add()
        if added and key.rpartition(".")[0] in OPEN_MAPS:
            continue
        if override.is_force_add() and key.startswith("source.") and key.split(".")[1] in source_keys():
            continue  # a source sweep's key, in a rerun of one of its jobs: the job keeps what its source takes
        known = sorted(set().union(*(_dotted_keys(OmegaConf.to_container(c, resolve=False)) for c in configs)))
        scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
        best = max(scores.values(), default=0)
        close = sorted((k for k, r in scores.items() if r >= max(0.6, best - 0.03)), key=lambda k: -scores[k])[:3]
        hint = f"did you mean {' or '.join(close)}?" if close else "`safetransfer-train --cfg job` prints every key"
        raise ConfigError(f"{key} is not a key{' (a + would add a key nothing reads)' if added else ''}; {hint}")


def method_groups(method: str) -> dict[str, str]:
    """The groups a method preset fixes ({group: choice}) that a command-line choice of the same
    group would override. A group whose node the preset also sets in its body (from_scratch's
    source) is not among them: the preset's node wins over any choice."""
    preset = OmegaConf.load(str(resources.files(CONFIG_PACKAGE).joinpath("method", f"{method}.yaml")))
    fixed = {}
    for entry in preset.get("defaults", []):
        for key, value in entry.items() if isinstance(entry, DictConfig) else []:
            group = str(key).removeprefix("override /")
            pinned = isinstance(preset.get(group), DictConfig) and "kind" in preset[group]
            if str(key).startswith("override /") and not pinned:
                fixed[group] = str(value)
    return fixed


def source_keys() -> set[str]:
    """The keys of every source config shipped with the package."""
    folder = resources.files(CONFIG_PACKAGE).joinpath("source")
    return {
        str(k) for name in group_options("source") or [] for k in OmegaConf.load(str(folder.joinpath(f"{name}.yaml")))
    }


def check_method_choices(choices) -> None:
    """A method preset fixes groups (method=l2sp: regularizer=l2sp, ...); a choice given on the
    command line wins over it and would make the job another method under the method's name.
    Refuse that in one line."""
    method = choices.get("method")
    if not method:
        return
    for group, value in method_groups(method).items():
        if choices.get(group) != value:
            raise ConfigError(
                f"method={method} sets {group}={value}, but {group}={choices.get(group)} is given too "
                f"and would win, training another method under this one's name: drop {group}=... "
                f"or choose a method without it"
            )


def swept_source_keys(arguments: list[str]) -> list[str]:
    """In a sweep over sources (source=pretrained,demo,scratch), `source.dataset=x` belongs to some
    of them only: it is force-added (`++`) so that Hydra composes every job, and each job keeps
    only the keys its source takes (sources.own_keys). check_keys has made sure some swept source
    has the key."""
    overrides = parse_overrides(arguments) or []
    swept = any(o.key_or_group == "source" and len(group_values(o) or []) > 1 for o in overrides)
    if not swept:
        return arguments
    return [f"++{a}" if a.startswith("source.") and "=" in a else a for a in arguments]


def check_method_presets(arguments: list[str]) -> None:
    """A method preset that fixes a group (method=l2sp: regularizer=l2sp) beside the same group on
    the command line (regularizer=bss) would run under the method's name with the other choice:
    refused in one line before any job starts (a multirun would find it only at that job)."""
    overrides = parse_overrides(arguments) or []
    given = {o.key_or_group: group_values(o) or [] for o in overrides if group_options(o.key_or_group) is not None}
    methods = list(given.pop("method", []))
    experiment = (given.get("experiment") or [None])[0]
    if not methods and experiment and experiment in (group_options("experiment") or []):
        preset = OmegaConf.load(str(resources.files(CONFIG_PACKAGE).joinpath("experiment", f"{experiment}.yaml")))
        swept = OmegaConf.select(preset, "hydra.sweeper.params.method")
        methods = [m.strip() for m in str(swept).split(",")] if swept else []
    for method in methods:
        if method not in (group_options("method") or []):
            continue
        for group, value in method_groups(method).items():
            other = [v for v in given.get(group, []) if v != value]
            if other:
                raise ConfigError(
                    f"method={method} sets {group}={value}, but {group}={','.join(other)} is given for "
                    f"every job and would win, training another method under this one's name: drop "
                    f"{group}=... or run method={method} in a command of its own"
                )


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def first_job(arguments: list[str]) -> DictConfig | None:
    """The config (with Hydra's) of the first job the command line describes: a swept value as its
    first choice, a search space (interval, range) left out; a value of the wrong type is one line
    naming its key; None when it does not compose otherwise (Hydra then reports why itself)."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.types import ChoiceSweep, Override

    overrides = parse_overrides(arguments)
    if overrides is None:
        return None
    first = []
    for override in overrides:
        value = override.value()
        if isinstance(value, ChoiceSweep) and value.list:
            first.append(f"{override.get_key_element()}={Override._get_value_element_as_str(value.list[0])}")
        elif not override.is_sweep_override():
            first.append(override.input_line)
    from omegaconf.errors import ValidationError

    try:
        with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
            return compose("config", overrides=first, return_hydra_config=True)
    except Exception as error:
        if isinstance(error.__cause__, ValidationError):  # a value of the wrong type (safetransfer/job/schema.py)
            cause = error.__cause__
            raise ConfigError(f"{cause.full_key}={cause.value}: {str(cause.msg).splitlines()[0]}") from None
        return None


def is_multirun(cfg: DictConfig, arguments: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in arguments) or cfg.hydra.mode == RunMode.MULTIRUN


def check_sweeper(cfg: DictConfig, arguments: list[str]) -> None:
    """A sweeper that optimises (Optuna, Ax, Nevergrad) optimises what each job returns: its mean
    validation top-1. Jobs that hold out no validation split return nothing to optimise, and the test
    split is never what a search chooses on: such a sweep is refused in one line before any job."""
    if not is_multirun(cfg, arguments) or cfg.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
        return
    fractions = [cfg.target.val_fraction]
    for override in parse_overrides(arguments) or []:
        if override.key_or_group == "target.val_fraction" and override.is_sweep_override():
            fractions = list(getattr(override.value(), "list", [0.0]))  # a searched fraction: refused too
    if any(not isinstance(f, (int, float)) or f <= 0 for f in fractions):
        sweeper = cfg.hydra.runtime.choices.get("hydra/sweeper") or cfg.hydra.sweeper.get("_target_")
        raise ConfigError(
            f"hydra/sweeper={sweeper} optimises each job's mean validation top-1, and these jobs hold out no "
            f"validation split (target.val_fraction={fractions[0]}): set target.val_fraction=0.2, say; a search "
            "never chooses on the test split"
        )


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="config")
def app(cfg: DictConfig) -> float:
    from safetransfer.job.lock import holding

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    num = hydra_cfg.job.get("num") if hydra_cfg.mode == RunMode.MULTIRUN else None
    with contextlib.ExitStack() as held:
        try:  # the run directory to this job alone, before its job.json is written
            held.enter_context(holding(run_dir))
        except ConfigError as error:
            print(f"safetransfer-train: error: {error}", file=sys.stderr, flush=True)
            if num is not None:
                raise
            sys.exit(2)
        return run_held(cfg, hydra_cfg, run_dir, num)


def run_held(cfg: DictConfig, hydra_cfg, run_dir: Path, num: int | None) -> float:
    """The job in its run directory, held: its status in job.json, a stop or a failure in one line."""
    from safetransfer.commands.sweeps import JobStatus
    from safetransfer.common import signals
    from safetransfer.job.run import run_job

    status = JobStatus(run_dir, list(hydra_cfg.overrides.task), num)
    status.write("running")
    try:
        with signals.StopSignals() as stop:
            check_method_choices(hydra_cfg.runtime.choices)
            row = run_job(cfg, run_dir, stop=stop)
    except signals.Preempted as preempted:
        message = str(preempted)
        if num is not None:  # "the same command" would start a new sweep folder: name this one
            from safetransfer.commands.sweeps import continue_command

            message = preempted.text(
                f"continue the sweep with: {continue_command(sys.argv[1:], Path(hydra_cfg.sweep.dir))}"
            )
        status.write("interrupted" if preempted.signum == signal.SIGINT else "preempted", error=message)
        log.warning("%s", message)
        print(f"safetransfer-train: {message}", file=sys.stderr, flush=True)
        stop.forward(preempted.signum)  # under submitit: its handler requeues the job
        sys.exit(128 + preempted.signum)
    except SafetransferError as error:  # bad input, a full disk, a failed download: one line
        status.write("failed", error=one_line(error))
        print(f"safetransfer-train: error: {one_line(error)}", file=sys.stderr, flush=True)
        if num is not None:
            raise  # in a multirun: this job failed, the others go on; the end-of-sweep report lists it
        sys.exit(2)
    except BaseException as error:
        status.write("failed", error=f"{type(error).__name__}: {error}")
        raise
    status.write("finished", **{k: row[k] for k in ("mean", "val_mean", "n_seeds", "seeds", "failed", "key", "table")})
    return row["val_mean"]  # what a sweeper optimises: validation only (None without a held-out split)


def report_of(arguments: list[str]):
    """The report printed when Hydra is done (commands.sweeps.Report), made from the command line
    before Hydra runs: a multirun's folder resolved here and given to Hydra (`hydra.sweep.dir`), so
    that the report names the folder Hydra writes. None where the first job does not compose (Hydra
    then says why) or the config folders are the user's own."""
    from safetransfer.commands.sweeps import Report, planned_jobs

    shown = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")
    cfg = None if any(a in shown or a.startswith(("--cfg=", "--info=")) for a in arguments) else first_job(arguments)
    if cfg is None:  # nothing runs, or Hydra reports what does not compose
        return None
    if not is_multirun(cfg, arguments):
        return Report(cfg, arguments, None)
    try:
        planned = len(planned_jobs(cfg.hydra.sweeper.get("params") or {}, arguments))
    except Exception:  # a sweeper of another kind (Optuna's search spaces): the jobs found are counted
        planned = None
    return Report(cfg, arguments, Path(str(cfg.hydra.sweep.dir)), planned)


def main() -> None:
    arguments = sys.argv[1:]
    if not arguments:
        print(
            "safetransfer-train: no arguments, running the embedded demo "
            "(same as `safetransfer-train experiment=demo`)",
            flush=True,
        )
        arguments = ["experiment=demo"]
    try:
        check_group_choices(arguments)
        check_keys(arguments)
        check_method_presets(arguments)
        report = report_of(swept_source_keys(arguments))
        if report is not None:
            check_sweeper(report.config, arguments)
        check_output_dirs(arguments)
        check_dirs_free(arguments)
    except ConfigError as error:
        print(f"safetransfer-train: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.argv = [sys.argv[0], *swept_source_keys(arguments)]
    given = any(key == "hydra.sweep.dir" for key, _ in output_dirs(arguments))
    if report is not None and report.sweep_dir is not None and not given:
        sys.argv.append(f"hydra.sweep.dir={report.sweep_dir}")  # the folder the report names
    finished = False
    try:
        app()
        finished = True
    finally:  # a multirun stopped by a failed job still gets its table and the list of failures
        if report is not None and (finished or report.sweep_dir is not None):
            report.print()


if __name__ == "__main__":
    main()
