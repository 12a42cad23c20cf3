import os
import signal
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

# Tests never touch the user's cache; the demo source model is rebuilt at tiny scale.
os.environ.setdefault(
    "SAFETRANSFER_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "safetransfer")
)

#: overrides that shrink any config to a few seconds on a CPU
TINY = [
    "seeds=[0]",
    "train.iterations=3",
    "train.batch_size=8",
    "optim.scheduler.milestones=[2]",
    "data.resize=36",
    "data.crop=32",
    "runtime.num_workers=0",
    "runtime.log_every=1",
    "runtime.diagnostics_every=0",  # the angles cost more than the tiny step: on only in the tests about them
    "runtime.device=cpu",
    "target.train_images_per_class=10",
    "target.test_images_per_class=4",
]
TINY_DEMO_SOURCE = ["source=demo", "source.iterations=4", "source.images_per_class=4", "source.batch_size=8"]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real config tree with overrides, results going to a temporary directory."""

    def _compose(*overrides: str):
        with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
            return compose("config", overrides=[f"results.dir={tmp_path / 'results'}", *overrides])

    return _compose


@pytest.fixture
def cli(train_in_process):
    """`safetransfer-train ARGUMENTS` as its console entry point runs it, but in this process (no
    interpreter start-up): a CompletedProcess with its exit code, stdout and stderr."""
    import subprocess

    def _run(*arguments: str):
        code, out, err = train_in_process(*arguments)
        return subprocess.CompletedProcess(["safetransfer-train", *arguments], code, out, err)

    return _run


@pytest.fixture
def cli_process(tmp_path):
    """Run the real console entrypoint in a subprocess, in a temporary working directory (for the
    `e2e` tests: what only a process shows, such as launchers starting processes of their own).
    No fixed timeout: a busy machine is slow, not broken."""
    import subprocess

    def _run(*arguments: str, timeout: float | None = None):
        return subprocess.run(
            [sys.executable, "-m", "safetransfer.commands.train", *arguments],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    return _run


@pytest.fixture
def train_in_process(tmp_path, monkeypatch, capsys):
    """Run `safetransfer-train ARGUMENTS` through its entry function in this process (no
    interpreter start-up), in a temporary working directory: (exit code, stdout, stderr)."""
    from safetransfer.commands import train

    monkeypatch.chdir(tmp_path)

    def _run(*arguments: str):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["safetransfer-train", *arguments])
        handler = signal.getsignal(signal.SIGINT)
        try:
            train.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            signal.signal(signal.SIGINT, handler)  # a stopped job's process ignores further Ctrl-C
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def table_rows(results_dir, table: str):
    """One row per setting of a table's store (results/<table>.seeds.csv): its cell, the mean and sample
    std of its seeds' test top-1, their number, and the seeds and accuracies as lists (a groupby here)."""
    import pandas as pd

    records = pd.read_csv(Path(results_dir) / f"{table}.seeds.csv", dtype={"setting": str, "key": str})
    grouped = records.sort_values("seed").groupby("setting", sort=False)
    return grouped.agg(
        backbone=("backbone", "first"),
        source=("source", "first"),
        target=("target", "first"),
        sampling_rate=("sampling_rate", "first"),
        method=("method", "first"),
        key=("key", "first"),
        mean=("top1", "mean"),
        std=("top1", "std"),
        n_seeds=("seed", "size"),
        seeds=("seed", list),
        accuracies=("top1", list),
    ).reset_index()


class StopAt:
    """A stop request (as common.signals.StopSignals gives it) seen from the `at`-th check on."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    @property
    def requested(self):
        self.calls += 1
        return signal.SIGTERM if self.calls >= self.at else None


def log_rows(seed_dir: Path) -> list[dict]:
    """A seed's log.csv rows without their wall-clock column (the rest is the same in a resumed run)."""
    import csv

    with open(seed_dir / "log.csv") as handle:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]
