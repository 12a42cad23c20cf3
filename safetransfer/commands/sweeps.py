"""Multiruns: each job's status file and the report when a sweep ends (the paper-layout
table of all its jobs and the jobs that failed, with the command that reruns each).

Jobs are launched by Hydra's launchers (basic, joblib, submitit); nothing here schedules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from safetransfer.common.atomic import atomic_write_json
from safetransfer.common.overrides import sweep_jobs
from safetransfer.reporting.tables import view_path

log = logging.getLogger(__name__)

STATUS_FILE = "job.json"


class JobStatus:
    """`<job dir>/job.json`: running | finished | failed, the job's overrides and, on failure, the error."""

    def __init__(self, job_dir: Path, overrides: list[str], num: int | None = None):
        self.path = Path(job_dir) / STATUS_FILE
        self.record = {"overrides": list(overrides), "num": num, "job_dir": str(job_dir)}

    def write(self, status: str, **details: Any) -> None:
        self.record.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details)
        atomic_write_json(self.path, self.record)


def job_statuses(sweep_dir: Path) -> list[dict]:
    """The status of every job under a sweep directory, in job order."""
    records = [json.loads(p.read_text()) for p in Path(sweep_dir).rglob(STATUS_FILE)]
    return sorted(records, key=lambda r: (r.get("num") is None, r.get("num") or 0, r["job_dir"]))


def rerun_command(record: dict) -> str:
    """One failed job alone, into its own directory: its finished seeds are kept, the rest run."""
    arguments = [*record["overrides"], "hydra.mode=RUN", f"hydra.run.dir={record['job_dir']}"]
    return "safetransfer-train " + " ".join(shlex.quote(a) for a in arguments)


def duplicate_report(records: list[dict]) -> list[str]:
    """Lines naming finished jobs that resolved to the same config (one key): the table holds
    one row for them, the last to finish."""
    by_key: dict[str, list[dict]] = {}
    for record in records:
        if record["status"] == "finished" and record.get("key"):
            by_key.setdefault(record["key"], []).append(record)
    return [
        f"Jobs {', '.join(str(r.get('num')) for r in same)} resolve to the same config (key {key}): the table "
        f"holds one row for them; their overrides: " + " | ".join(" ".join(r["overrides"]) for r in same)
        for key, same in by_key.items()
        if len(same) > 1
    ]


def planned_jobs(params: dict, arguments: list[str]) -> list[list[str]]:
    """The overrides of every job a multirun launches, in job order, as Hydra's basic sweeper expands
    them: the sweeper's `params`, then the command line's `arguments`, which win."""
    planned = {str(k): f"{k}={v}" for k, v in params.items()}
    for argument in arguments:
        if "=" in argument and not argument.startswith("-"):
            planned[argument.split("=", 1)[0].lstrip("+~")] = argument
    return sweep_jobs(list(planned.values()))


def continue_command(arguments: list[str], sweep_dir: Path) -> str:
    """The command that continues a multirun in its own folder: finished seeds kept, the rest run."""
    kept = [a for a in arguments if not a.startswith(("hydra.sweep.dir=", "+hydra.sweep.dir=", "++hydra.sweep.dir="))]
    return "safetransfer-train " + " ".join(
        shlex.quote(a) for a in [*kept, f"hydra.sweep.dir={Path(sweep_dir).resolve()}"]
    )


def failure_report(sweep_dir: Path, planned: int | None = None, arguments: list[str] | None = None) -> str:
    """Lines naming each failed or unfinished job, its overrides, its error and how to rerun it,
    the jobs not started (of `planned`), the command that continues the sweep (from its
    `arguments`), and jobs that resolved to the same config."""
    records = job_statuses(sweep_dir)
    total = max(planned or 0, len(records))
    failed = [r for r in records if r["status"] != "finished"]
    duplicates = duplicate_report(records)
    if not failed and total == len(records):
        return "\n".join([f"All {total} jobs of {sweep_dir} finished.", *duplicates])
    unfinished = len(failed) + total - len(records)
    lines = [f"{unfinished} of {total} jobs of {sweep_dir} did not finish:"]
    for record in failed:
        reason = record.get("error", "interrupted while running (killed or preempted?)")
        lines += [
            f"- job {record.get('num')} [{' '.join(record['overrides'])}]: {record['status']}: {reason}",
            f"  rerun it alone: {rerun_command(record)}",
        ]
    if total > len(records):
        lines.append(f"- {total - len(records)} job{'s' if total - len(records) > 1 else ''} not started")
    whole = continue_command(arguments, sweep_dir) if arguments is not None else f"... hydra.sweep.dir={sweep_dir}"
    lines.append(f"Continue the whole sweep (finished seeds are kept, not rerun): {whole}")
    return "\n".join([*lines, *duplicates])


def sweep_report(
    config: DictConfig, sweep_dir: Path, planned: int | None = None, arguments: list[str] | None = None
) -> str:
    """The paper layout of each table the sweep's jobs wrote to (with the cells of earlier sweeps
    in it), then the jobs that did not finish."""
    results = Path(config.results.dir)
    parts = []
    for table in dict.fromkeys(r["table"] for r in job_statuses(sweep_dir) if r.get("table")):
        path = view_path(results, table, "paper")
        if path.exists():
            parts.append(f"Paper-layout table {path} (the jobs of {sweep_dir} and all else in {table}):\n")
            parts.append(path.read_text())
    parts.append(failure_report(sweep_dir, planned, arguments))
    return "\n".join(parts)


@dataclass
class Report:
    """What safetransfer-train prints when Hydra is done: the results table of a run, or after a
    multirun (ended normally or by a failed job) the paper layout of its tables and the jobs that
    did not finish. The entry point makes it from the command line before Hydra runs."""

    config: DictConfig  # the first job's config, Hydra's included
    arguments: list[str]  # the command line as typed
    sweep_dir: Path | None  # the multirun's folder (None: a single run)
    planned: int | None = None  # how many jobs the multirun launches (None: a sweeper that decides)

    def print(self) -> None:
        if self.sweep_dir is not None and not self.sweep_dir.is_dir():
            return  # the multirun wrote nothing
        print_results_table(self.config)
        if self.sweep_dir is not None:
            print("\n" + sweep_report(self.config, self.sweep_dir, self.planned, self.arguments), flush=True)


def print_results_table(config: DictConfig) -> None:
    """The job view of `results.table`, if there is one."""
    with contextlib.suppress(Exception):  # interpolations that cannot resolve here: nothing to print
        path = view_path(Path(config.results.dir), str(config.results.table))
        if path.exists():
            print(f"\nResults table {path}:\n\n{path.read_text()}", flush=True)
