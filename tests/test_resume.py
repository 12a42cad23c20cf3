"""Fault injection at tiny scale on the CPU: SIGKILL and SIGTERM mid-seed then a rerun
(equal to an uninterrupted run), damaged and unwritable checkpoints, NaN injection."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_DEMO_SOURCE
from safetransfer.job.run import run_job
from safetransfer.training.checkpoints import load_checkpoint, save_checkpoint
from safetransfer.training.engine import NonFiniteError
from safetransfer.training.regularizers.base import Term

#: one seed of 40 iterations, a log row and a chance to be killed at each, a checkpoint every 5
LONG = [
    *[o for o in TINY if not o.startswith(("train.iterations", "optim.scheduler"))],
    *TINY_DEMO_SOURCE,
    "train.iterations=40",
    "optim.scheduler.milestones=[30]",
    "runtime.checkpoint_every=5",
    "regularizer=l2sp",
    "results.dir=res",
]


def start(tmp_path, run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "safetransfer.commands.train", *LONG, *extra, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(process, timeout=1800):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_iteration(log_path: Path, iteration: int, process, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, finish(process)[2][-3000:]
        if log_path.exists():
            rows = log_path.read_text().splitlines()
            if len(rows) > 1 and rows[-1].split(",")[0].isdigit() and int(rows[-1].split(",")[0]) >= iteration:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{log_path} never reached iteration {iteration}")


def curve(run_dir: Path):
    with open(run_dir / "seed_0" / "log.csv") as handle:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


def outcome(run_dir: Path):
    metrics = json.loads((run_dir / "seed_0" / "metrics.json").read_text())
    return metrics["top1"], metrics["test_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reference")
    code, _, err = finish(start(tmp_path, "reference"))
    assert code == 0, err[-3000:]
    assert not (tmp_path / "reference" / "seed_0" / "checkpoint.pt").exists()  # removed once the seed finished
    return outcome(tmp_path / "reference"), curve(tmp_path / "reference")


@pytest.mark.e2e
def test_sigkill_mid_seed_then_rerun_ends_exactly_like_an_uninterrupted_run(tmp_path, uninterrupted):
    process = start(tmp_path, "run")
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 17, process)
    process.kill()  # SIGKILL: no chance to write anything
    process.wait()
    state = torch.load(tmp_path / "run" / "seed_0" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] % 5 == 0 and 15 <= state["iteration"] < 40

    code, out, err = finish(start(tmp_path, "run"))
    assert code == 0, err[-3000:]
    assert f"resumed after iteration {state['iteration']} of 40" in out + err
    (top1, test_loss), rows = uninterrupted
    assert outcome(tmp_path / "run") == (top1, test_loss)  # bit for bit
    assert curve(tmp_path / "run") == rows  # the whole log, rows before and after the kill


@pytest.mark.e2e
def test_sigterm_writes_a_checkpoint_and_exits_cleanly_then_the_rerun_continues(tmp_path, uninterrupted):
    process = start(tmp_path, "run", "runtime.checkpoint_every=0")  # only the signal makes a checkpoint
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 12, process)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 128 + signal.SIGTERM
    line = next(x for x in err.splitlines() if x.startswith("safetransfer-train: stopped by SIGTERM"))
    state = torch.load(tmp_path / "run" / "seed_0" / "checkpoint.pt", weights_only=True)
    assert f"after iteration {state['iteration']}: checkpoint written to" in line and "rerun the same command" in line
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "preempted"
    assert not (tmp_path / "run" / "seed_0" / "metrics.json").exists()

    code, out, err = finish(start(tmp_path, "run", "runtime.checkpoint_every=0"))
    assert code == 0, err[-3000:]
    assert outcome(tmp_path / "run") == uninterrupted[0]
    assert curve(tmp_path / "run") == uninterrupted[1]


@pytest.mark.e2e
def test_ctrl_c_is_a_stop_like_sigterm_one_line_and_status_interrupted(tmp_path):
    """SIGINT (Ctrl-C) was a 53-line KeyboardInterrupt traceback and job.json "failed"."""
    process = start(tmp_path, "run", "runtime.checkpoint_every=0")
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 12, process)
    process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    assert code == 128 + signal.SIGINT
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = next(x for x in err.splitlines() if x.startswith("safetransfer-train: stopped by SIGINT"))
    assert "checkpoint written to" in line and "rerun the same command" in line
    assert (tmp_path / "run" / "seed_0" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "interrupted"


@pytest.mark.e2e
@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path, concurrent):
    """Ctrl-C twice (`kill -INT $P; sleep 0.3; kill -INT $P`) was a KeyboardInterrupt traceback, exit 1
    and job.json "failed": now one line, 130, "interrupted", and the rerun goes on from a checkpoint."""
    extra = ["seeds=[0,1]", "runtime.concurrent_seeds=true"] if concurrent else []
    process = start(tmp_path, "run", *extra)
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 12, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    code, out, err = finish(process)
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("safetransfer-train:")]
    assert len(lines) == 1 and ("second SIGINT" in lines[0] or "stopped by SIGINT" in lines[0]), err[-3000:]
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "interrupted"
    code, out, err = finish(start(tmp_path, "run", *extra))
    assert code == 0, err[-3000:]


def test_a_damaged_checkpoint_is_set_aside_and_the_seed_starts_over(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"key": "k", "iteration": 5})
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert load_checkpoint(path, "k") is None
    assert (tmp_path / "checkpoint.pt.damaged").exists() and not path.exists()
    assert "cannot be read" in caplog.text and "starts from iteration 0" in caplog.text


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from safetransfer.common.errors import StorageError

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"key": "k", "iteration": 5})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match="No space left on device.*previous checkpoint is kept"):
        save_checkpoint(path, {"key": "k", "iteration": 10})
    monkeypatch.undo()
    assert load_checkpoint(path, "k")["iteration"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


class Poison(Term):
    """A feature term that turns NaN at iteration `at` of seed `seed`."""

    def __init__(self, seed: int, at: int, alpha: float = 0.5):
        super().__init__()
        self.poisoned_seed, self.at, self.alpha, self.calls = seed, at, alpha, 0

    def value(self, model, features):
        self.calls += 1
        bad = torch.initial_seed() == self.poisoned_seed and self.calls >= self.at
        return self.alpha * features.pooled.pow(2).mean() * (float("nan") if bad else 1.0)


def test_nan_stops_the_seed_names_iteration_and_term_and_stays_out_of_the_table(compose_cfg, tmp_path, monkeypatch):
    from safetransfer.job import build
    from safetransfer.reporting.store import read
    from safetransfer.training.regularizers import Omega

    monkeypatch.setattr(build, "create_omega", lambda cfg: Omega({"poison": Poison(seed=1, at=3)}))
    cfg = compose_cfg(*TINY, "seeds=[0,1,2]", "train.iterations=5", "optim.scheduler.milestones=[4]")
    row = run_job(cfg, tmp_path / "job")
    failure = json.loads((tmp_path / "job" / "seed_1" / "failed.json").read_text())
    assert "iteration 3 " in failure["error"] and "Omega term poison is nan" in failure["error"]
    assert "alpha=0.5" in failure["error"]
    assert not (tmp_path / "job" / "seed_1" / "metrics.json").exists()
    finished = [json.loads((tmp_path / "job" / f"seed_{s}" / "metrics.json").read_text())["top1"] for s in (0, 2)]
    assert row["n_seeds"] == 2 and row["mean"] == pytest.approx(sum(finished) / 2)
    records = read(tmp_path / "results", "demo")
    assert list(records["seed"]) == [0, 2] and list(records["top1"]) == finished  # the failed seed is not in it

    # a rerun keeps both finished seeds and does not retry the failed one
    again = run_job(cfg, tmp_path / "job")
    assert again["seeds"] == [0, 2] and again["failed"] == [1]


def test_every_seed_failing_fails_the_job(compose_cfg, tmp_path, monkeypatch):
    from safetransfer.job import build
    from safetransfer.training.regularizers import Omega

    monkeypatch.setattr(build, "create_omega", lambda cfg: Omega({"poison": Poison(seed=0, at=1)}))
    with pytest.raises(NonFiniteError, match="every seed failed"):
        run_job(compose_cfg(*TINY, "train.iterations=3", "optim.scheduler.milestones=[2]"), tmp_path / "job")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk (8-bit RGB) declaring width x height pixels, then IEND:
    what PIL reads to size an image before it decodes any pixel (the PNG specification's layout)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "workers,damage", [(0, "truncated"), (2, "truncated"), pytest.param(0, "bomb", marks=pytest.mark.e2e)]
)  # the bomb: 5 s, in the e2e tier
def test_an_image_that_cannot_be_decoded_is_one_line_naming_it(cli, tmp_path, workers, damage):
    """A JPEG cut short mid-file; a PNG declaring 50000 x 50000 pixels (PIL's decompression-bomb
    error, a traceback before)."""
    from fixtures import make_cub200

    make_cub200(tmp_path / "data")
    broken = sorted((tmp_path / "data" / "CUB_200_2011" / "images").rglob("*.jpg"))[1]
    if damage == "truncated":
        broken.write_bytes(broken.read_bytes()[:300])  # truncated mid-file
    else:
        broken.write_bytes(png_declaring(50000, 50000))
    result = cli(
        "seeds=[0]",
        "train.iterations=2",
        "optim.scheduler.milestones=[1]",
        "train.batch_size=4",
        "data.resize=36",
        "data.crop=32",
        "runtime.device=cpu",
        f"runtime.num_workers={workers}",
        "source=scratch",
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[12,9]",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "results.dir=res",
    )
    assert result.returncode == 2
    lines = [x for x in result.stderr.splitlines() if x.startswith("safetransfer-train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    kind = "OSError" if damage == "truncated" else "DecompressionBombError"
    assert f"{broken} cannot be read as an image ({kind}:" in lines[0] and "replace the file" in lines[0]
    assert not list((tmp_path / "cache").rglob("*.npy"))  # no half-built cache left to trust


def _processes_with(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's process through /proc")
@pytest.mark.e2e
def test_submitit_requeues_a_signalled_job_which_continues_from_its_checkpoint(tmp_path, uninterrupted):
    """launcher=submitit_local: SIGUSR2 (submitit's preemption signal) to the running job
    -> checkpoint, submitit requeues it, the requeued job resumes and ends like an uninterrupted run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "safetransfer.commands.train",
            "-m",
            *LONG,
            "launcher=submitit_local",
            "runtime.checkpoint_every=0",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_iteration(tmp_path / "sweep" / "0" / "seed_0" / "log.csv", 12, process)
    jobs = _processes_with(f"submitit.core._submit {tmp_path / 'sweep'}")
    assert len(jobs) == 1, jobs
    os.kill(jobs[0], signal.SIGUSR2)
    code, out, err = finish(process)
    assert code == 0, (out[-2000:], err[-3000:])
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep").rglob("*") if p.suffix in (".out", ".err", ".log"))
    assert "stopped by SIGUSR2 after iteration" in logs and "Requeued job" in logs, logs[-3000:]
    assert "resumed after iteration" in logs
    assert outcome(tmp_path / "sweep" / "0") == uninterrupted[0]
    assert json.loads((tmp_path / "sweep" / "0" / "job.json").read_text())["status"] == "finished"


@pytest.mark.e2e  # about 5 s, the longest of the default tier: moved to keep its time budget's margin
def test_a_term_value_that_overflows_is_caught_on_a_logged_row(compose_cfg, tmp_path, monkeypatch):
    """An Omega value of inf whose gradient stays finite: found where the values are computed (log rows)."""
    from safetransfer.job import build
    from safetransfer.training.regularizers import Omega

    class InfValue(Term):
        closed_form = True

        def __init__(self):
            super().__init__()
            self.alpha = 2.0

        def value(self, model, features):
            return torch.tensor(float("inf"))

        def add_gradient(self, params, grads):
            pass

    monkeypatch.setattr(build, "create_omega", lambda cfg: Omega({"huge": InfValue()}))
    cfg = compose_cfg(*TINY, "train.iterations=4", "runtime.log_every=2", "optim.scheduler.milestones=[3]")
    with pytest.raises(NonFiniteError, match="every seed failed"):
        run_job(cfg, tmp_path / "job")
    error = json.loads((tmp_path / "job" / "seed_0" / "failed.json").read_text())["error"]
    assert "iteration 2 (epoch 0): Omega term huge is inf (alpha=2, decay^epoch=1)" in error


@pytest.mark.parametrize("name", ["metrics.json", "failed.json"])
def test_a_damaged_record_of_a_seed_makes_the_rerun_train_it_again(compose_cfg, tmp_path, caplog, name):
    """A truncated metrics.json (or failed.json) left by a crash: the rerun names the file and
    treats the seed as unfinished (it stopped with a JSONDecodeError that named nothing)."""
    from safetransfer.common.fingerprints import config_key
    from safetransfer.job.run import failed_seed, finished_seed

    key = config_key(compose_cfg())
    path = tmp_path / "seed_0" / name
    path.parent.mkdir(parents=True)
    path.write_text('{"seed": 0, "top1": 7')
    assert finished_seed(tmp_path, 0, key) is None and failed_seed(tmp_path, 0, key) is None
    assert str(path) in caplog.text


def test_a_temporary_file_left_by_a_killed_write_is_removed_when_the_seed_starts(compose_cfg, tmp_path):
    """SIGKILL during a checkpoint's write leaves `.checkpoint.pt.<random>.tmp` (18 MB for a
    ResNet-18) that no rerun removed."""
    stale = tmp_path / "job" / "seed_0" / ".checkpoint.pt.k2j3h4.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * 1000)
    run_job(compose_cfg(*TINY, "train.iterations=2", "optim.scheduler.milestones=[1]"), tmp_path / "job")
    assert not stale.exists() and (tmp_path / "job" / "seed_0" / "metrics.json").exists()
    assert not list((tmp_path / "job").rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["iteration,loss_J\n5,0.1\nx", "\x00\xff\x00", "loss_J\n0.3\n"])
def test_a_damaged_log_csv_does_not_stop_a_resumed_seed(tmp_path, caplog, damage):
    from safetransfer.training.train_log import _LogWriter

    path = tmp_path / "log.csv"
    path.write_bytes(damage.encode("latin-1"))
    writer = _LogWriter(path, ["iteration", "loss_J"], keep_until=5)
    writer.write({"iteration": 6, "loss_J": 0.5})
    writer.close()
    assert path.read_text().splitlines()[-1] == "6,0.5" and str(path) in caplog.text


# ---------------------------------------------------------------- concurrent seeds under signals

CONCURRENT = ("seeds=[0,1]", "runtime.concurrent_seeds=true")


def seed_processes(parent: int) -> list[int]:
    """The job's seed processes: children of `parent` started by multiprocessing's spawn (not
    its resource tracker), from /proc, in the order they were started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == parent and b"spawn_main" in command:
                found.append((int(fields[19]), int(entry.name)))  # by start time
    return [pid for _, pid in sorted(found)]


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def outcomes(run_dir: Path) -> list:
    return [json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text())["test_loss"] for s in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted_concurrent(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("concurrent")
    code, _, err = finish(start(tmp_path, "reference", *CONCURRENT))
    assert code == 0, err[-3000:]
    return outcomes(tmp_path / "reference")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the seed processes through /proc")
@pytest.mark.e2e
def test_sigterm_to_the_main_process_alone_stops_concurrent_seeds_and_the_rerun_continues(
    tmp_path, uninterrupted_concurrent
):
    """`kill PID` (what timeout and container stops send) reached the main process only: the
    seeds trained to the end and the job exited 0. Now the stop is forwarded to each seed."""
    process = start(tmp_path, "run", *CONCURRENT, "runtime.checkpoint_every=0")
    wait_for_iteration(tmp_path / "run" / "seed_1" / "log.csv", 8, process)
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 8, process)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process, timeout=300)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("safetransfer-train: stopped by SIGTERM"))
    assert "seed 0 after iteration" in line and "seed 1 after iteration" in line and "Traceback" not in err
    for seed in (0, 1):
        assert (tmp_path / "run" / f"seed_{seed}" / "checkpoint.pt").exists()
        assert not (tmp_path / "run" / f"seed_{seed}" / "metrics.json").exists()
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "preempted"
    code, _, err = finish(start(tmp_path, "run", *CONCURRENT, "runtime.checkpoint_every=0"))
    assert code == 0, err[-3000:]
    assert outcomes(tmp_path / "run") == uninterrupted_concurrent


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the seed processes through /proc")
@pytest.mark.e2e
def test_the_last_line_says_what_each_seed_kept_when_one_is_killed_during_a_stop(tmp_path):
    """SIGTERM to a concurrent job and kill -9 of one seed said "after iteration 0: no checkpoint
    (runtime.checkpoint_every=0)" with checkpoints every 2 iterations and the other seed checkpointed."""
    process = start(tmp_path, "run", *CONCURRENT, "runtime.checkpoint_every=2")
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 8, process)
    wait_for_iteration(tmp_path / "run" / "seed_1" / "log.csv", 8, process)
    seeds = seed_processes(process.pid)
    assert len(seeds) == 2, seeds
    process.send_signal(signal.SIGTERM)
    os.kill(seeds[1], signal.SIGKILL)
    code, _, err = finish(process, timeout=300)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("safetransfer-train: stopped by SIGTERM"))
    assert "no checkpoint (runtime.checkpoint_every=0)" not in line, line
    assert "seed 0 after iteration" in line and "checkpoint written to" in line, line
    assert "seed 1's process ended (signal 9) before it reported, its last checkpoint" in line or (
        "seed 1 after iteration" in line  # it stopped before the kill reached it
    ), line


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the seed processes through /proc")
@pytest.mark.e2e
def test_sigkill_of_the_main_process_stops_the_seed_processes(tmp_path, uninterrupted_concurrent):
    """The seed processes outlived a SIGKILLed job for ever (0.9 GB each); now each sees its
    parent gone, checkpoints and exits, and the rerun continues from those checkpoints."""
    process = start(tmp_path, "run", *CONCURRENT, "runtime.checkpoint_every=0")
    wait_for_iteration(tmp_path / "run" / "seed_0" / "log.csv", 8, process)
    wait_for_iteration(tmp_path / "run" / "seed_1" / "log.csv", 8, process)
    seeds = seed_processes(process.pid)
    assert len(seeds) == 2, seeds
    process.kill()
    _, _, err = finish(process)  # the seeds write to the same pipe: read until they have closed it
    assert "BrokenPipeError" not in err and "Traceback" not in err, err[-3000:]  # they had no one to report to
    deadline = time.time() + 120
    while any(alive(pid) for pid in seeds) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in seeds), "seed processes outlived the job"
    assert all((tmp_path / "run" / f"seed_{s}" / "checkpoint.pt").exists() for s in (0, 1))
    code, _, err = finish(start(tmp_path, "run", *CONCURRENT, "runtime.checkpoint_every=0"))
    assert code == 0, err[-3000:]
    assert "resumed after iteration" in err
    assert outcomes(tmp_path / "run") == uninterrupted_concurrent


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the seed processes through /proc")
@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_after_one_seed_finished_stops_the_job_and_one_seed_left_resumes_exactly(
    tmp_path, uninterrupted_concurrent, signum
):
    """The hang: seed 1 held back (SIGSTOP) until seed 0 finished, then a signal to the whole
    process group (Ctrl-C in a terminal, `kill -TERM -PGID`). The job waited for ever. Now it
    stops; the rerun has one seed left, which runs with the threads it had (an exact resume)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "safetransfer.commands.train", *LONG, *CONCURRENT, "hydra.run.dir=run"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    wait_for_iteration(tmp_path / "run" / "seed_1" / "log.csv", 3, process)
    seeds = seed_processes(process.pid)
    assert len(seeds) == 2, seeds
    held_back = seeds[1]  # the second started: seed 1
    os.kill(held_back, signal.SIGSTOP)
    try:
        deadline = time.time() + 600
        while (
            not (tmp_path / "run" / "seed_0" / "metrics.json").exists()
            and not (tmp_path / "run" / "seed_1" / "metrics.json").exists()
        ):
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.1)
    finally:
        os.kill(held_back, signal.SIGCONT)
    os.killpg(process.pid, signum)
    code, _, err = finish(process, timeout=300)
    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    assert not any(alive(pid) for pid in seeds)
    finished = [s for s in (0, 1) if (tmp_path / "run" / f"seed_{s}" / "metrics.json").exists()]
    assert finished == [0]

    code, _, err = finish(start(tmp_path, "run", *CONCURRENT))
    assert code == 0, err[-3000:]
    assert outcomes(tmp_path / "run") == uninterrupted_concurrent


@pytest.mark.parametrize("name", ["spectrum.json", "metrics.json", "demo.seeds.csv"])
def test_a_full_disk_while_writing_a_result_is_one_line_and_keeps_what_is_finished(cli, tmp_path, monkeypatch, name):
    """spectrum.json, metrics.json or the table's store (demo.seeds.csv) hitting a full disk gave 2-4 chained
    tracebacks. The disk is full (fsync fails with ENOSPC) only for the temporary file of `name`."""
    import tempfile

    full, real_mkstemp, real_fsync = set(), tempfile.mkstemp, os.fsync
    armed = [True]  # the disk is full once: a rerun finds room

    def mkstemp(*args, prefix="", **kwargs):
        fd, path = real_mkstemp(*args, prefix=prefix, **kwargs)
        if armed[0] and prefix == f".{name}.":
            full.add(fd)
        return fd, path

    def fsync(fd):
        if fd in full:
            full.clear()
            armed[0] = False
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fsync", fsync)
    result = cli(*TINY, "runtime.spectrum_batches=1", "results.dir=res", "hydra.run.dir=run")
    code, err = result.returncode, result.stderr
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("safetransfer-train: error:")]
    assert len(lines) == 1 and f"{name} failed (No space left on device)" in lines[0] and "free space in" in lines[0]
    assert json.loads((tmp_path / "run" / "job.json").read_text())["status"] == "failed"
    assert not list(tmp_path.rglob("*.tmp"))
    if name == "demo.seeds.csv":  # the seed finished before the table: kept, and a rerun only writes the table
        finished = tmp_path / "run" / "seed_0" / "metrics.json"
        written = finished.stat().st_mtime_ns
        again = cli(*TINY, "runtime.spectrum_batches=1", "results.dir=res", "hydra.run.dir=run")
        assert again.returncode == 0 and (tmp_path / "res" / "demo.seeds.csv").exists()
        assert finished.stat().st_mtime_ns == written  # kept, not trained again


@pytest.mark.e2e  # a second process holds the run directory
def test_a_second_job_on_a_run_directory_in_use_is_refused_and_touches_nothing(cli, tmp_path):
    """Two identical commands shared a run directory: the second removed the first's checkpoint
    temporary file as stale and both wrote log.csv. Now the second is refused in one line, before
    it writes anything; once the holder has ended, the directory is free (and its stale files go)."""
    run = tmp_path / "run"
    (run / "seed_0").mkdir(parents=True)
    in_flight = run / "seed_0" / ".checkpoint.pt.abcd1234.tmp"  # the holder's write, in progress
    in_flight.write_bytes(b"half")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from safetransfer.job.lock import holding\n"
            f"with holding({str(run)!r}):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli(*TINY, f"hydra.run.dir={run}")
        assert result.returncode == 2
        lines = [x for x in result.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and f"{run} is in use by another job (pid {holder.pid} on" in lines[0], lines
        assert in_flight.exists() and not (run / "job.json").exists() and not (run / "seed_0" / "log.csv").exists()
        assert not (run / ".hydra").exists()  # refused before Hydra writes the job's config beside the holder's
    finally:
        holder.kill()
        holder.wait()
    result = cli(*TINY, f"hydra.run.dir={run}")  # the holder died: its lock went with it
    assert result.returncode == 0, result.stderr[-3000:]
    assert not in_flight.exists() and (run / "seed_0" / "metrics.json").exists()


@pytest.mark.parametrize("state", ["lock is a folder", "lock is a looping link", "holder is a folder"])
def test_a_run_folders_lock_in_an_odd_state_is_one_line(tmp_path, train_in_process, state):
    """Tracebacks before: IsADirectoryError, ELOOP, and a StorageError advising to free space."""
    from safetransfer.job.lock import HOLDER, LOCK

    run = tmp_path / "run"
    run.mkdir()
    name = LOCK if state.startswith("lock") else HOLDER
    if "folder" in state:
        (run / name).mkdir()
    else:
        (run / name).symlink_to(run / name)
    code, out, err = train_in_process(*TINY, *TINY_DEMO_SOURCE, "hydra.run.dir=run")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"safetransfer-train: error: {run / name} cannot serve to hold the run folder")
    assert "remove it, or run in another folder" in lines[0]
    assert not (run / "seed_0").exists()


def test_stale_temporaries_in_the_cache_and_the_results_folder_are_removed_under_their_lock(tmp_path, caplog):
    """A killed cache build left `<file>.<pid>.tmp` (split-sized) in the cache, a killed table
    write `.<table>.seeds.csv.XXXXXXXX.tmp` in results/; they were never removed. The next build or
    write of the same file, holding that file's lock, removes them."""
    from safetransfer.common.atomic import built_once
    from safetransfer.reporting.store import COLUMNS, append

    cached = tmp_path / "cache" / "thing.pt"
    cached.parent.mkdir()
    left = [cached.parent / "thing.pt.4242.tmp", cached.parent / ".thing.pt.x1y2z3.tmp"]
    other = cached.parent / "other.pt.4242.tmp"  # another file's: not this lock's to remove
    for path in [*left, other]:
        path.write_bytes(b"x" * 100)
    caplog.set_level("INFO")
    assert built_once(cached, lambda: {"a": torch.ones(1)}, "a thing")["a"].item() == 1.0
    assert not any(p.exists() for p in left) and other.exists()
    assert f"removed {left[0]}, left by an interrupted write" in caplog.text

    results = tmp_path / "results"
    results.mkdir()
    stale = [results / ".demo.seeds.csv.q9w8e7r6.tmp", results / ".demo.md.a1b2c3d4.tmp"]
    for path in stale:
        path.write_text("half a table")
    append(results, "demo", [{**dict.fromkeys(COLUMNS, ""), "setting": "k1", "seed": 0, "top1": 1.0}])
    assert not stale[0].exists() and (results / "demo.seeds.csv").exists()


def test_a_stop_while_the_cache_is_decoded_or_the_demo_source_pretrained_ends_it_at_once(tmp_path):
    """SIGTERM during the demo source's pretraining took effect 122 s later, and a cache being
    decoded ignored it until it was whole. Both now look at the stop request every batch or step:
    Preempted, saying what was under way, and nothing half made is kept."""
    from omegaconf import OmegaConf

    from fixtures import make_cub200
    from safetransfer.common.signals import Preempted, StopSignals
    from safetransfer.data.preparation import cached_data
    from safetransfer.data.targets.cub200 import CUB200
    from safetransfer.sources.demo import DemoSource

    make_cub200(tmp_path / "data", classes=3, train_per_class=4, test_per_class=2)
    target = CUB200(str(tmp_path / "data"), expected_classes=3)
    cfg = OmegaConf.create(
        {
            "target": {"name": "cub200", "root": str(tmp_path / "data")},
            "data": {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.2] * 3, "cache": True},
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "runtime": {"num_workers": 0},
        }
    )
    with StopSignals() as stop:
        stop.requested = signal.SIGTERM  # as its handler sets it
        with pytest.raises(Preempted) as caught:
            cached_data(cfg, target.train_set(), target.test_set(), np.arange(12))
        assert "stopped by SIGTERM while decoding the image cache into" in str(caught.value)
        assert not [p for p in (tmp_path / "cache" / "decoded").iterdir() if not p.name.endswith(".lock")]

        source = DemoSource(str(tmp_path / "cache"), iterations=10_000, images_per_class=2, batch_size=8)
        start = time.perf_counter()
        with pytest.raises(Preempted, match="stopped by SIGTERM while pretraining the demo source model: none"):
            source.backbone_state("resnet18")
        assert time.perf_counter() - start < 60  # one step, not 10,000
        assert not source.cache_path("resnet18").exists()
