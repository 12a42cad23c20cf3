"""`safetransfer-train`: the Hydra entrypoint.

With no arguments it runs the embedded demo (`experiment=demo`). Otherwise it composes
conf/config.yaml with the command-line overrides, fine-tunes once per seed and writes
the job's records to the results table. Before Hydra runs anything, the jobs the command line
describes are composed here once and checked: a bad choice, key or value is one line.
"""

from __future__ import annotations

import contextlib
import difflib
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
#: maps meant to take new keys with `+`, e.g. +search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.1,1"]
OPEN_MAPS = ("search.grids", "bss_lists")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: at most this many combinations of the swept groups are composed before Hydra runs
COMPOSED_JOBS = 64


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


class UnknownKey(ConfigError):
    """An override of a key the composed config does not have (`key`: the first node missing)."""

    def __init__(self, key: str):
        super().__init__(f"{key} is not a key")
        self.key = key


def compose(overrides: list[str]) -> DictConfig:
    """The config (Hydra's included) these overrides compose to. An unknown group choice or a value of
    the wrong type (the schema, safetransfer/job/schema.py) is a ConfigError naming it; an unknown key
    raises UnknownKey; what else Hydra refuses passes (Hydra reports it itself)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    try:
        with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as error:
        group, _, choice = str(error.missing_cfg_file).rpartition("/")
        if not error.options:
            raise
        raise ConfigError(f"{group}={choice} is not a known choice; allowed: {', '.join(error.options)}") from None
    except ConfigCompositionException as error:
        cause = error.__cause__
        if isinstance(cause, ValidationError):
            raise ConfigError(f"{cause.full_key}={cause.value}: {str(cause.msg).splitlines()[0]}") from None
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            raise UnknownKey(cause.full_key) from None
        raise


def _dotted_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items() if isinstance(node, dict) else ():
        keys |= {f"{prefix}{key}", *_dotted_keys(value, f"{prefix}{key}.")}
    return keys


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether `dotted` names a node of `cfg`, a missing value (???) included."""
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None, throw_on_resolution_failure=False) if parent_key else cfg
    return isinstance(parent, DictConfig) and leaf in list(parent.keys())


def not_a_key(key: str, cfg: DictConfig, added: bool = False, where: str = "") -> ConfigError:
    """The one line refusing `key`, naming the closest keys of `cfg`."""
    known = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
    best = max(scores.values(), default=0)
    close = sorted((k for k, r in scores.items() if r >= max(0.6, best - 0.03)), key=lambda k: -scores[k])[:3]
    hint = f"did you mean {' or '.join(close)}?" if close else "`safetransfer-train --cfg job` prints every key"
    why = " (a + would add a key nothing reads)" if added else ""
    return ConfigError(f"{key} is not a key{where}{why}; {hint}")


def source_keys() -> set[str]:
    """The keys of every source config shipped with the package."""
    folder = resources.files(CONFIG_PACKAGE).joinpath("source")
    return {str(k) for name in group_options("source") or [] for k in OmegaConf.load(str(folder / f"{name}.yaml"))}


def swept_source_keys(arguments: list[str]) -> list[str]:
    """In a sweep over sources (source=pretrained,demo,scratch), `source.dataset=x` belongs to some
    of them only: it is force-added (`++`) so that Hydra composes every job, and each job keeps
    only the keys its source takes (sources.own_keys)."""
    overrides = parse_overrides(arguments) or []
    swept = any(o.key_or_group == "source" and len(group_values(o) or []) > 1 for o in overrides)
    if not swept:
        return arguments
    return [f"++{a}" if a.startswith("source.") and "=" in a else a for a in arguments]


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


def check_method_choices(choices) -> None:
    """A method preset fixes groups (method=l2sp: regularizer=l2sp, ...); a choice given on the
    command line wins over it and would make the job another method under the method's name."""
    method = choices.get("method")
    for group, value in method_groups(method).items() if method else ():
        if choices.get(group) != value:
            raise ConfigError(
                f"method={method} sets {group}={value}, but {group}={choices.get(group)} is given too and would "
                f"win, training another method under this one's name: drop {group}=... or run method={method} "
                "in a command of its own"
            )


def is_hydras(override) -> bool:
    key = override.key_or_group
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def first_value(override) -> str | None:
    """An override as its job takes it: a comma sweep at its first value; None for a search space
    (interval, range), which the sweeper chooses."""
    from hydra.core.override_parser.types import ChoiceSweep, Override

    value = override.value()
    if isinstance(value, ChoiceSweep) and value.list:
        return f"{override.get_key_element()}={Override._get_value_element_as_str(value.list[0])}"
    return None if override.is_sweep_override() else override.input_line


def job_configs(arguments: list[str]) -> list[DictConfig]:
    """The configs (Hydra's included) of the first job the command line describes and of each other
    combination of the config groups its multirun sweeps (the sweeper's own `params` included), composed
    once before Hydra runs and checked: a group choice, a key, a value's type, a method preset
    contradicted. A key added with `+` must be one some job has (nothing would read it), except under
    OPEN_MAPS. Empty where Hydra judges the command line itself (its own config folders, a syntax error)."""
    from safetransfer.commands.sweeps import planned_jobs

    overrides = parse_overrides(arguments)
    if overrides is None:
        return []
    for override in overrides:
        if override.key_or_group.split(".")[-1] == "_target_" and not override.is_delete():
            raise ConfigError(
                f"{override.input_line.lstrip('+~')} names code to run; a config names what it builds by a registered "
                "name (`kind`), and Hydra's own parts by their groups (hydra/launcher=..., hydra/sweeper=...)"
            )
    added = [o for o in overrides if (o.is_add() or o.is_force_add()) and not is_hydras(o) and not o.is_delete()]
    added_keys = {o.input_line.split("=")[0] for o in added}
    kept = [a for a in arguments if "=" in a and not a.startswith("-")]
    groups = [o.key_or_group for o in overrides if group_options(o.key_or_group) is not None]
    jobs = [[first for first in map(first_value, parse_overrides(kept)) if first]]
    configs: list[DictConfig] = []
    composed: list[list[str]] = []  # each config's overrides

    def choices(job: list[str]) -> list[str]:  # a job's group choices (its overrides of config groups)
        return [a for a in job if a.split("=")[0] in groups]

    while jobs and len(configs) < COMPOSED_JOBS:
        job = jobs.pop(0)
        where = "" if not configs else f" of the job {' '.join(choices(job))}"
        try:
            cfg = compose(job)
        except UnknownKey as unknown:  # Hydra names the first node missing: the key is the override's
            keys = [a.split("=")[0].lstrip("~") for a in job]
            key = next((k for k in keys if k == unknown.key or k.startswith(f"{unknown.key}.")), unknown.key)
            raise not_a_key(key, compose(choices(job)), where=where) from None
        except ConfigError:
            raise
        except Exception:  # Hydra reports what else is wrong with the composition, at that job
            break
        check_method_choices(cfg.hydra.runtime.choices)
        if not configs and is_multirun(cfg, arguments):  # the other combinations of the swept groups
            with contextlib.suppress(Exception):  # a sweeper's search space: the first job alone
                planned = planned_jobs(cfg.hydra.sweeper.get("params") or {}, kept)
                groups += [str(k) for k in cfg.hydra.sweeper.get("params") or {} if group_options(str(k))]
                combos = {frozenset(choices(p)): p for p in planned}
                jobs = [p for choice, p in combos.items() if choice != frozenset(choices(job))]  # first: composed
        configs.append(cfg)
        composed.append(job)
    for override in added if configs else ():  # a key a job has without the `+` overrides (composed if need be)
        key = override.key_or_group
        if key.rpartition(".")[0] in OPEN_MAPS:
            continue
        if override.is_force_add() and key.startswith("source.") and key.split(".")[1] in source_keys():
            continue  # a source sweep's key, in a rerun of one of its jobs: the job keeps what its source takes
        bases = [[a for a in job if a.split("=")[0] not in added_keys] for job in composed]
        if not any(_has_key(compose(base), key) for base in bases):
            raise not_a_key(key, compose(bases[0]), added=True)
    return configs


def output_dirs(arguments: list[str]) -> list[tuple[str, Path]]:
    """(key, folder) of each hydra.run.dir / hydra.sweep.dir the command line gives as a plain path."""
    found = []
    for argument in arguments:
        key, _, value = argument.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            found.append((key, Path(value).expanduser()))
    return found


def check_output_dirs(dirs: list[tuple[str, Path]]) -> None:
    """hydra.run.dir and hydra.sweep.dir (`dirs`: (key, folder)) can be made and written, a full disk
    included (Hydra makes them before any of ours runs, and its refusal is a traceback), and are not
    another job's: Hydra would write this job's .hydra/ files over the running job's. Tried by making
    them, then removing what the trial made: a refused command leaves nothing."""
    from safetransfer.job.lock import check_free

    for key, path in dirs:
        whole = Path(os.path.abspath(path))  # `..` resolved as the file system will
        made = []
        with contextlib.suppress(OSError):  # a name too long to look up: check_writable says so
            made = [folder for folder in (whole, *whole.parents) if not folder.exists()]  # deepest first
        try:
            check_writable(path, key, "safetransfer-runs")
        finally:
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:
                    break
        if path.is_dir():
            for job_dir in [path] if key == "hydra.run.dir" else sorted(p for p in path.iterdir() if p.is_dir()):
                check_free(job_dir)


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
def app(cfg: DictConfig) -> float | None:
    """One job in its run directory, held (safetransfer/job/lock.py): its status in job.json, a stop
    or a failure in one line. Returns what a sweeper optimises: the mean validation top-1 of its seeds
    (None without a held-out split), never the test split's."""
    from safetransfer.commands.sweeps import JobStatus, continue_command
    from safetransfer.common import signals
    from safetransfer.job.lock import holding
    from safetransfer.job.run import run_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    num = hydra_cfg.job.get("num") if hydra_cfg.mode == RunMode.MULTIRUN else None
    status = None
    try:
        with holding(run_dir), signals.StopSignals() as stop:  # the folder to this job alone, before job.json
            status = JobStatus(run_dir, list(hydra_cfg.overrides.task), num)
            status.write("running")
            check_method_choices(hydra_cfg.runtime.choices)
            row = run_job(cfg, run_dir, stop=stop)
    except signals.Preempted as preempted:
        message = str(preempted)
        if num is not None:  # "the same command" would start a new sweep folder: name this one
            message = preempted.text(
                f"continue the sweep with: {continue_command(sys.argv[1:], Path(hydra_cfg.sweep.dir))}"
            )
        status.write("interrupted" if preempted.signum == signal.SIGINT else "preempted", error=message)
        log.warning("%s", message)
        print(f"safetransfer-train: {message}", file=sys.stderr, flush=True)
        stop.forward(preempted.signum)  # under submitit: its handler requeues the job
        sys.exit(128 + preempted.signum)
    except SafetransferError as error:  # bad input, a full disk, a failed download, a held folder: one line
        if status is not None:  # None: another job holds the folder, and its job.json
            status.write("failed", error=one_line(error))
        print(f"safetransfer-train: error: {one_line(error)}", file=sys.stderr, flush=True)
        if num is not None:
            raise  # in a multirun: this job failed, the others go on; the end-of-sweep report lists it
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        if status is not None:
            status.write("interrupted", error=SECOND_STOP)
        stop_now()
    except BaseException as error:
        if status is not None:
            status.write("failed", error=f"{type(error).__name__}: {error}")
        raise
    status.write("finished", **{k: row[k] for k in ("mean", "val_mean", "n_seeds", "seeds", "failed", "key", "table")})
    return row["val_mean"]


SECOND_STOP = (
    "stopped at once by a second SIGINT: no checkpoint of this moment, each seed's last checkpoint is kept; "
    "rerun the same command to continue from them"
)


def stop_now() -> None:
    """A second Ctrl-C, wherever it lands: one line and 128 + SIGINT, never a traceback."""
    with contextlib.suppress(KeyboardInterrupt):  # a third, while saying so
        print(f"safetransfer-train: {SECOND_STOP}", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


#: the exit codes of a job stopped by a signal (common/signals.py)
STOPPED_CODES = tuple(128 + s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2))


#: options that show something and run no job
SHOWN = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")


def main() -> None:
    from safetransfer.commands.sweeps import Report, planned_jobs

    arguments = sys.argv[1:]
    if not arguments:
        print(
            "safetransfer-train: no arguments, running the embedded demo "
            "(same as `safetransfer-train experiment=demo`)",
            flush=True,
        )
        arguments = ["experiment=demo"]
    report = None
    try:
        arguments = swept_source_keys(arguments)
        configs = job_configs(arguments)
        if configs and not any(a in SHOWN or a.startswith(("--cfg=", "--info=")) for a in arguments):
            from safetransfer.job.run import resolved

            for job in configs:  # the one pass of checks (job/checks.py) over each job composed, before Hydra
                resolved(OmegaConf.masked_copy(job, [str(k) for k in job if k != "hydra"]))
            cfg, sweep_dir, planned = configs[0], None, None
            check_sweeper(cfg, arguments)
            if is_multirun(cfg, arguments):  # its folder resolved here and given to Hydra: the report names it
                sweep_dir = Path(str(cfg.hydra.sweep.dir))
                with contextlib.suppress(Exception):  # a sweeper that decides (Optuna): the jobs found are counted
                    planned = len(planned_jobs(cfg.hydra.sweeper.get("params") or {}, arguments))
            report = Report(cfg, arguments, sweep_dir, planned)
        dirs = output_dirs(arguments)
        if report is not None and not dirs:  # the folder Hydra will make, as resolved here
            run_dir = report.sweep_dir or Path(str(report.config.hydra.run.dir))
            dirs = [("hydra.sweep.dir" if report.sweep_dir else "hydra.run.dir", run_dir)]
        check_output_dirs(dirs)
    except ConfigError as error:
        print(f"safetransfer-train: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.argv = [sys.argv[0], *arguments]
    given = any(key == "hydra.sweep.dir" for key, _ in output_dirs(arguments))
    if report is not None and report.sweep_dir is not None and not given:
        sys.argv.append(f"hydra.sweep.dir={report.sweep_dir}")  # the folder the report names
    finished = False
    try:
        app()
        finished = True
    except KeyboardInterrupt:  # a second Ctrl-C outside a job's own handling (Hydra's, the report's)
        stop_now()
    except SystemExit as exiting:
        if exiting.code in STOPPED_CODES:  # stopping: a further Ctrl-C must not kill the exit half-way
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # (Python's finalization keeps SIG_IGN)
        raise
    finally:  # a multirun stopped by a failed job still gets its table and the list of failures
        if report is not None and (finished or report.sweep_dir is not None):
            report.print()


if __name__ == "__main__":
    main()
