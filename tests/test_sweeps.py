"""Multiruns through the real CLI: a grid search giving a paper-layout table chosen on
validation, a failed job reported with the command that reruns it, finished seeds kept
on a rerun, GPU leases, and a sweep through submitit's local executor."""

import json
import shlex
import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY, TINY_DEMO_SOURCE
from safetransfer.commands.sweeps import job_statuses
from safetransfer.common.devices import lease_device

#: the tiny demo: one seed pair, 10 training images per class, 30 % of them held out for validation
TINY_SWEEP = [
    "experiment=demo",
    *[o for o in TINY if not o.startswith("seeds")],
    "seeds=[0,1]",
    *TINY_DEMO_SOURCE,
    "target.sampling_rate=100",
    "results.dir=res",
]


def metrics_of(sweep):
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/seed_*/metrics.json"))]


#: long enough (20 iterations at lr 0.03) for the settings to part: with DTNH, validation picks
#: alpha=10 while the test split would have picked alpha=0.01 (torch 2.14, CPU)
GRID = ["train.iterations=20", "optim.scheduler.milestones=[15]", "optim.optimizer.lr=0.03", "runtime.log_every=10"]


@pytest.mark.e2e  # eight jobs of 20 iterations: the long one; the table logic is also tested in-process
def test_grid_search_gives_a_paper_layout_table_chosen_on_validation(cli, tmp_path):
    replaced = {o.split("=")[0] for o in GRID}
    arguments = [
        *[o for o in TINY_SWEEP if o.split("=")[0] not in replaced],
        *GRID,
        "target.val_fraction=0.3",
        "method=l2sp,dtnh_l2sp",
        "regularizer.terms.l2sp.alpha=0.01,10.0",
        "results.table=grid",
        "hydra.sweep.dir=sweep",
    ]
    result = cli(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = metrics_of(tmp_path / "sweep")
    assert len(runs) == 8 and all("val_top1" in m for m in runs)

    # the choice, computed here from the seeds' own files: best mean validation accuracy per method
    frame = pd.DataFrame(
        [
            {
                "method": "DTNH (L2-SP)" if m["config"]["direction"]["kind"] == "dtnh" else "L2-SP",
                "alpha": m["config"]["regularizer"]["terms"]["l2sp"]["alpha"],
                "val": m["val_top1"],
                "test": m["top1"],
            }
            for m in runs
        ]
    )
    table = pd.read_csv(tmp_path / "res" / "grid_paper.csv", keep_default_na=False).set_index("column")
    assert set(table["target"]) == {"demo"} and len(table) == 2
    decided = 0
    for method, group in frame.groupby("method"):
        means = group.groupby("alpha")[["val", "test"]].mean()
        best = means["val"].idxmax()
        if (means["val"] == means["val"].max()).sum() == 1:  # a clear winner (a tie keeps the first setting)
            decided += 1
            assert table.loc[method, "chosen"] == f"l2sp.alpha={best}"
            assert table.loc[method, "mean"] == pytest.approx(means.loc[best, "test"])
            assert table.loc[method, "val_mean"] == pytest.approx(means.loc[best, "val"])
        assert table.loc[method, "settings_tried"] == 2 and table.loc[method, "seeds"] == 2
    assert decided >= 1, frame  # the choice was exercised, not only ties
    markdown = (tmp_path / "res" / "grid_paper.md").read_text()
    assert "(of 2 settings)" in markdown and markdown in result.stdout
    assert "All 4 jobs of" in result.stdout
    assert {r["status"] for r in job_statuses(tmp_path / "sweep")} == {"finished"}

    # the same sweep again into the same directory: every seed is kept, none is trained again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*/seed_*/metrics.json")}
    again = cli(*arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.stderr.count("finished earlier") + again.stdout.count("finished earlier") == 8


def test_failed_job_is_reported_with_its_rerun_command(cli, tmp_path):
    result = cli(*TINY_SWEEP, "method=fine_tuning", "target.sampling_rate=100,150", "hydra.sweep.dir=sweep")
    assert result.returncode != 0
    assert "target.sampling_rate=150 is outside (0, 100]" in result.stderr  # the job's own one line
    statuses = {r["num"]: r for r in job_statuses(tmp_path / "sweep")}
    assert statuses[0]["status"] == "finished" and statuses[1]["status"] == "failed"
    assert len(metrics_of(tmp_path / "sweep")) == 2  # the good job's seeds are all there
    report = result.stdout[result.stdout.index("1 of 2 jobs") :]
    assert "Continue the whole sweep (finished seeds are kept, not rerun): safetransfer-train " in report
    assert "job 1 [" in report and "target.sampling_rate=150" in report
    command = next(line for line in report.splitlines() if "rerun it alone:" in line).split("rerun it alone: ")[1]
    words = shlex.split(command)
    assert words[0] == "safetransfer-train" and "target.sampling_rate=150" in words and "hydra.mode=RUN" in words
    assert f"hydra.run.dir={statuses[1]['job_dir']}" in words
    assert (tmp_path / "res" / "demo_paper.md").exists()  # the table of what finished


def test_leases_give_each_holder_its_own_gpu_and_make_the_next_wait(tmp_path):
    order = []
    with lease_device(2, tmp_path) as first, lease_device(2, tmp_path) as second:
        assert {first, second} == {"cuda:0", "cuda:1"}

        def third():
            with lease_device(2, tmp_path, poll_s=0.05) as device:
                order.append(("third", device))

        waiting = threading.Thread(target=third)
        waiting.start()
        time.sleep(0.5)
        assert not order  # both devices are held: the third job waits
        order.append(("released", first))
    waiting.join(timeout=10)
    assert order[0][0] == "released" and order[1][0] == "third"


@pytest.mark.e2e
def test_two_job_sweep_through_submitit_local_executor(cli_process, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = cli_process(
        *TINY_SWEEP, "seeds=[0]", "launcher=submitit_local", "method=fine_tuning,l2sp", "hydra.sweep.dir=sweep"
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    runs = metrics_of(tmp_path / "sweep")
    assert sorted(m["config"]["regularizer"]["name"] for m in runs) == ["Fine-tuning", "L2-SP"]
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # the jobs went through submitit
    table = pd.read_csv(tmp_path / "res" / "demo_paper.csv").set_index("column")
    for m in runs:
        column = "Fine-tuning" if m["config"]["regularizer"]["name"] == "Fine-tuning" else "L2-SP"
        assert table.loc[column, "mean"] == pytest.approx(m["top1"])
    assert np.all(table["seeds"].to_numpy() == 1)


@pytest.mark.parametrize("table", ["dtnh_table2", "dtnh_table3", "dtnh_table4", "bss_table2"])
def test_reproduce_script_launches_the_tables_preset(tmp_path, table):
    """scripts/reproduce.sh, an alias of safetransfer-reproduce (which makes Table IV's source
    itself), with stand-ins that record their arguments: nothing but safetransfer-reproduce runs."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.sh"
    for command in ("safetransfer-train", "safetransfer-reproduce"):
        fake = tmp_path / "bin" / command
        fake.parent.mkdir(exist_ok=True)
        fake.write_text(f'#!/bin/sh\necho "{command} $*" >> {tmp_path / "calls"}\n')
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(script), table, "paths.data_root=/data"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"safetransfer-reproduce {table} paths.data_root=/data"]
    (tmp_path / "calls").unlink()
    subprocess.run(["bash", str(script), table, "--plan"], env=env, check=True)
    assert (tmp_path / "calls").read_text().splitlines() == [f"safetransfer-reproduce {table} --plan"]  # no training

    wrong = subprocess.run(["bash", str(script), "dtnh_table5"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "TABLE is one of: dtnh_table2 dtnh_table3 dtnh_table4 bss_table2" in wrong.stderr


@pytest.mark.e2e
def test_two_job_sweep_through_the_joblib_launcher(cli_process, tmp_path):
    """launcher=gpus on a machine without GPUs: one joblib worker, the device given on the command line."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    result = cli_process(
        *TINY_SWEEP,
        "seeds=[0]",
        "launcher=gpus",
        "runtime.device=cpu",
        "method=fine_tuning,l2sp",
        "hydra.sweep.dir=sweep",
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Joblib.Parallel" in result.stdout + result.stderr  # Hydra's joblib launcher ran the jobs
    assert {r["status"] for r in job_statuses(tmp_path / "sweep")} == {"finished"}
    assert len(metrics_of(tmp_path / "sweep")) == 2


def test_slurm_preset_sets_the_submitit_slurm_launcher(compose_cfg):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=dtnh_table2", "launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0
    assert cfg.runtime.num_workers < launcher.cpus_per_task  # workers + the main process fit the allocation


def test_a_method_that_fixes_a_group_refuses_an_explicit_other_choice_before_any_job(cli, tmp_path):
    """method=l2sp with regularizer=l2 on the command line would train Fine-tuning under L2-SP's
    name: refused in one line before any job starts (the job failed only when its turn came)."""
    result = cli(
        *[o for o in TINY_SWEEP if o != "seeds=[0,1]"],
        "seeds=[0]",
        "method=fine_tuning,l2sp",
        "regularizer=l2",
        "hydra.sweep.dir=sweep",
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "method=l2sp sets regularizer=l2sp, but regularizer=l2 is given too" in lines[0]
    assert not (tmp_path / "sweep").exists()


def test_jobs_of_one_sweep_that_resolve_to_one_config_are_reported(tmp_path):
    from safetransfer.commands.sweeps import failure_report

    for num, (overrides, key) in enumerate(
        [(["method=l2sp"], "abc"), (["regularizer=l2sp"], "abc"), (["method=fine_tuning"], "def")]
    ):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / "job.json").write_text(
            json.dumps(
                {
                    "num": num,
                    "overrides": overrides,
                    "job_dir": str(tmp_path / str(num)),
                    "status": "finished",
                    "key": key,
                }
            )
        )
    report = failure_report(tmp_path)
    assert "All 3 jobs" in report
    assert (
        "Jobs 0, 1 resolve to the same config (key abc): the table holds one row for them; their overrides: "
        "method=l2sp | regularizer=l2sp"
        in report
        and "key def" not in report
    )


def test_reproduce_script_finds_the_quick_starts_environment_unactivated(tmp_path):
    """`bash scripts/reproduce.sh TABLE --plan` right after the Quick start (its .venv not
    activated) runs .venv/bin/safetransfer-reproduce; with no such command anywhere, one line."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repository = tmp_path / "repo"
    (repository / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "scripts" / "reproduce.sh", repository / "scripts")
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}  # no safetransfer command on it
    missing = subprocess.run(
        ["bash", str(repository / "scripts" / "reproduce.sh"), "dtnh_table2", "--plan"],
        env=bare,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "safetransfer-reproduce not found: activate the environment" in missing.stderr
    for command in ("safetransfer-train", "safetransfer-reproduce"):
        fake = repository / ".venv" / "bin" / command
        fake.parent.mkdir(parents=True, exist_ok=True)
        fake.write_text(f'#!/bin/sh\necho "$0 $*" >> {tmp_path / "calls"}\n')
        fake.chmod(0o755)
    found = subprocess.run(
        ["bash", str(repository / "scripts" / "reproduce.sh"), "dtnh_table2", "--plan"],
        env=bare,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"{repository / '.venv' / 'bin' / 'safetransfer-reproduce'} dtnh_table2 --plan"
    ]


@pytest.mark.e2e  # a sweeper plugin's whole search: three trials of two seeds
def test_an_optuna_search_optimises_validation_top1_never_test(cli, tmp_path, monkeypatch):
    """Each Optuna trial's value is what the job returned: the mean val_top1 of its seeds, read back
    here from their metrics.json, and not their test top-1 (the trials below are chosen so that the
    two differ, or the assertion could not tell them apart)."""
    import optuna

    studies = []
    create_study = optuna.create_study

    def keep(*args, **kwargs):  # the sweeper's study, in memory, to read each trial's value
        studies.append(create_study(*args, **kwargs))
        return studies[-1]

    monkeypatch.setattr(optuna, "create_study", keep)
    arguments = [
        "-m",
        *[o for o in TINY_SWEEP if not o.startswith(("experiment=", "source"))],
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=0",
        "regularizer.terms.l2sp.alpha=tag(log, interval(0.001, 10))",
        "method=l2sp",
        "source=scratch",
        "target.val_fraction=0.3",
        "hydra.sweep.dir=sweep",
    ]
    result = cli(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    (study,) = studies
    trials = [t for t in study.trials if t.value is not None]
    assert len(trials) == 3
    runs = pd.DataFrame(
        {
            "alpha": m["config"]["regularizer"]["terms"]["l2sp"]["alpha"],
            "val": m["val_top1"],
            "test": m["top1"],
        }
        for m in metrics_of(tmp_path / "sweep")
    )
    means = runs.groupby("alpha")[["val", "test"]].mean()
    assert len(means) == 3
    differs = 0
    for trial in trials:
        expected = means.loc[trial.params["regularizer.terms.l2sp.alpha"]]
        assert trial.value == pytest.approx(expected["val"])
        differs += expected["val"] != pytest.approx(expected["test"])
    assert differs >= 1  # the value could have been told apart from the test top-1
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(means["val"].max())
