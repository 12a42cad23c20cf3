"""The real console entrypoint in a subprocess: a tiny end-to-end run and every bad-input message."""

import json

import pandas as pd
import pytest

from conftest import TINY, TINY_DEMO_SOURCE, table_rows


@pytest.mark.e2e  # two multiruns of two jobs each: the long one (multiruns are also tested in-process)
def test_end_to_end_multirun_writes_the_table(cli, tmp_path):
    """The demo experiment, shrunk: a command-line sweep over two sampling rates, two seeds each.

    `method=fine_tuning` on the command line replaces the demo's own sweep over methods.
    """
    arguments = [
        "experiment=demo",
        "method=fine_tuning",
        *[o for o in TINY if not o.startswith("seeds")],
        "seeds=[0,1]",
        *TINY_DEMO_SOURCE,
        "target.sampling_rate=50,100",
        "results.dir=res",
    ]
    result = cli(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = table_rows(tmp_path / "res", "demo")
    assert sorted(frame["sampling_rate"]) == [50, 100]
    assert set(frame["n_seeds"]) == {2} and set(frame["method"]) == {"Fine-tuning"}
    assert set(frame["source"]) == {"demo"}
    records = pd.read_csv(tmp_path / "res" / "demo.seeds.csv")
    for _, row in frame.iterrows():
        per_seed = row["accuracies"]
        assert row["mean"] == pytest.approx(sum(per_seed) / 2, abs=0.01)
        run_dir = records[records["setting"] == row["setting"]]["run_dir"].iloc[0]
        seed_dirs = sorted((tmp_path / run_dir).glob("seed_*/metrics.json"))
        assert len(seed_dirs) == 2
        metrics = [json.loads(p.read_text()) for p in seed_dirs]
        assert [m["top1"] for m in metrics] == per_seed  # the store keeps full precision
        assert {m["train_images"] for m in metrics} == {6 * 10 * row["sampling_rate"] // 100}
    markdown = (tmp_path / "res" / "demo.md").read_text()
    assert markdown.count(" ± ") == 2 and "Results table" in result.stdout

    # rerunning the same configs replaces their records instead of adding new ones
    again = cli(*arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "res" / "demo.seeds.csv")) == 4


def test_single_run_from_the_command_line(cli, tmp_path):
    result = cli(
        *TINY,
        "seeds=[5]",
        "backbone=resnet18",
        "source=scratch",
        "target=demo",
        "regularizer=l2",
        "direction=sum",
        "results.dir=out",
        "results.table=mine",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frame = table_rows(tmp_path / "out", "mine")
    assert len(frame) == 1 and frame.loc[0, "seeds"] == [5] and frame.loc[0, "source"] == "scratch"
    assert "seeds" not in frame.loc[0, "setting"]  # the seeds are not part of a setting


@pytest.mark.parametrize(
    "arguments,expected",
    [
        (
            ["regularizer=l3"],
            "regularizer=l3 is not a known choice; allowed: bi_tuning, bss, co_tuning, delta, delta_bss, head, "
            "knowdist, knowdist_bss, l2, l2_bss, l2sp, l2sp_bss, lwf",
        ),
        (["backbone=resnet34"], "backbone=resnet34 is not a known choice; allowed: resnet18, resnet50"),
        (
            ["-m", "source=demo,imagenett"],
            "source=imagenett is not a known choice; allowed: demo, file, imagenet, places365, "
            "pretrained, scratch, stanford_dogs",
        ),
        (
            ["regularizer=l2sp", "regularizer.terms.l2sp.alpha=-1"],
            "regularizer.terms.l2sp.alpha=-1 must be a finite number >= 0",
        ),
        (
            ["regularizer=l2sp", "regularizer.terms.l2sp.alpha=nan"],
            "regularizer.terms.l2sp.alpha=nan must be a finite number",
        ),
        (["regularizer=l2_bss", "regularizer.terms.bss.k=8"], "regularizer.terms.bss.k=8 must be an integer in [1, 7]"),
        (["direction=dtnh", "direction.granularity=layer"], "direction.granularity=layer is not one of global, tensor"),
        (["target.sampling_rate=0"], "target.sampling_rate=0 is outside (0, 100]"),
        (["target.sampling_rate=150"], "target.sampling_rate=150 is outside (0, 100]"),
        (["seeds=[]"], "seeds=[] must be a non-empty list of integers"),
        (["train.batch_size=0"], "train.batch_size=0 must be an integer >= 1"),
        (  # the schema's types (safetransfer/job/schema.py), for every value: one line with the key
            ["train.batch_size=abc"],
            "train.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (["runtime.keep_checkpoints=maybe"], "runtime.keep_checkpoints=maybe: Value 'maybe' is not a valid bool"),
        (["train.iteratons=10"], "train.iteratons is not a key; did you mean train.iterations?"),
        (
            ["+train.iteratons=10"],
            "train.iteratons is not a key (a + would add a key nothing reads); did you mean train.iterations?",
        ),
        (["optim.optimizer.lr=-1"], "optim.optimizer.lr=-1 must be a finite number > 0"),
        (["optim.optimizer.lr=nan"], "optim.optimizer.lr=nan must be a finite number > 0"),
        (["optim.optimizer.momentum=1.5"], "optim.optimizer.momentum=1.5 must be a finite number in [0, 1)"),
        (["optim.head_lr_mult=0"], "optim.head_lr_mult=0 must be a finite number > 0"),
        (
            ["target=imagefolder", "target.root=/no/such/dataset"],
            "target.root=/no/such/dataset: missing directory /no/such/dataset/train; "
            "expected <root>/train/<class>/<image>",
        ),
        (["train.batch_size=500"], "fewer than train.batch_size=500"),
        (["runtime.device=tpu"], "runtime.device=tpu is not one of auto, cpu, cuda, cuda:N"),
        (["results.dir=/proc/forbidden"], "results.dir=/proc/forbidden"),
        (["results.table=../../escaped"], "results.table=../../escaped is not a table name: it holds a path"),
        (["results.table=/some/other/place"], "results.table=/some/other/place is not a table name: it holds a path"),
        (["results.table=" + "t" * 300], "is not a table name: it is 300 bytes long, more than 180"),
        (
            ["results.published=dtnh_table9"],
            "results.published=dtnh_table9 is not a published table; known: bss_table2",
        ),
        (["seeds=[-1]"], "seeds=[-1] must hold integers in [0, 2^32)"),
        (["target.sampling_seed=-1"], "target.sampling_seed=-1 must be an integer in [0, 2^32)"),
        (["train.batch_size=1"], "train.batch_size=1 is too small: BatchNorm needs two or more images a batch"),
        (
            ["regularizer=l2sp", "regularizer.terms.l2sp.alpha=1e308"],
            "regularizer.terms.l2sp.alpha=1e+308 is beyond float32's range",
        ),
        (  # an optimising sweeper sees the validation split only: without one there is nothing to optimise
            ["-m", "hydra/sweeper=optuna", "regularizer=l2sp", "regularizer.terms.l2sp.alpha=interval(0.01, 1)"],
            "hydra/sweeper=optuna optimises each job's mean validation top-1, and these jobs hold out no validation "
            "split (target.val_fraction=0.0)",
        ),
        (["hydra.run.dir=/proc/forbidden/run"], "hydra.run.dir=/proc/forbidden/run is not a writable directory"),
        (["hydra.run.dir=" + "r" * 300], "hydra.run.dir=" + "r" * 300 + " is not a writable directory (File name"),
        (
            ["regularizer=l2sp", "++regularizer.terms.l2sp._target_=os.system"],
            "regularizer.terms.l2sp._target_=os.system names code to run",
        ),
        (["-m", "hydra.sweeper._target_=os.getcwdb"], "hydra.sweeper._target_=os.getcwdb names code to run"),
        (["hydra.callbacks.x._target_=os.getcwdb"], "hydra.callbacks.x._target_=os.getcwdb names code to run"),
        (["direction.kind=orthogonal"], "direction.kind=orthogonal is not a known direction; allowed: dtnh, sum"),
        (  # malformed overrides: Hydra's grammar refuses them (they were its multi-line message and exit 1)
            ["train.iterations=["],
            "train.iterations=[ is not an override Hydra can read (no viable alternative at input '['); quote",
        ),
        (["results.table=🙂"], "results.table=🙂 is not an override Hydra can read (a character it does not take"),
    ],
)
def test_bad_input_is_one_clear_line_before_training(cli, tmp_path, arguments, expected):
    given = {a.split("=")[0] for a in arguments}
    shrink = [o for o in TINY if o.split("=")[0] not in given and not ("target" in given and o.startswith("target."))]
    result = cli(*shrink, *arguments)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("safetransfer-train: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("seed_*")), "training started before the input was checked"


@pytest.mark.e2e
def test_no_arguments_means_the_demo(tmp_path):
    """Without arguments main() composes experiment=demo (checked without training, via --cfg)."""
    import subprocess
    import sys

    code = (
        "import sys; from safetransfer.commands import train; sys.argv=['safetransfer-train'];"
        "train.app = lambda: print('ARGV', sys.argv[1:]); train.main()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert "ARGV ['experiment=demo', 'hydra.sweep.dir=multirun/" in result.stdout  # the folder its report names
    assert "running the embedded demo" in result.stdout


def test_dtnh_run_never_steps_further_from_g_J_than_the_sum(cli, tmp_path):
    """On a short real run with direction=dtnh, Angle 1 <= Angle 3 on every logged row."""
    result = cli(
        *[o for o in TINY if not o.startswith("train.iterations")],
        "train.iterations=6",
        *TINY_DEMO_SOURCE,
        "regularizer=l2sp_bss",
        "direction=dtnh",
        "runtime.diagnostics_every=1",
        "results.dir=res",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logs = list(tmp_path.rglob("seed_0/log.csv"))
    assert len(logs) == 1
    rows = pd.read_csv(logs[0])
    assert len(rows) == 6 and rows["angle_d_J"].notna().all()
    assert (rows["angle_d_J"] <= rows["angle_sum_J"] + 1e-6).all()
    assert (rows["angle_d_J"] <= 90 + 1e-6).all()
    conflicting = rows[rows["conflict"] == 1]
    assert (conflicting["angle_d_J"] < conflicting["angle_sum_J"] + 1e-6).all()
    assert table_rows(tmp_path / "res", "demo").loc[0, "method"] == "DTNH (L2-SP+BSS)"


def test_resample_per_seed_saves_each_seeds_draw(cli, tmp_path):
    result = cli(
        *[o for o in TINY if not o.startswith("seeds")],
        "seeds=[0,1]",
        "target.sampling_rate=50",
        "target.resample_per_seed=true",
        "target.val_fraction=0.2",
        "results.dir=res",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    draws = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("seed_*/sampled_train_indices.json"))]
    assert len(draws) == 2 and draws[0]["indices"] != draws[1]["indices"]
    for draw in draws:
        assert set(draw["indices"]).isdisjoint(draw["val_indices"]) and len(draw["val_indices"]) == 6


def test_a_dataset_of_one_class_is_refused_in_one_line(cli, tmp_path):
    """With one class every prediction is right: top-1 100 % whatever was learnt."""
    import numpy as np
    from PIL import Image

    for split, count in (("train", 10), ("test", 3)):
        folder = tmp_path / "one" / split / "only_class"
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((40, 40, 3), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    shrink = [o for o in TINY if not o.startswith("target.")]
    result = cli(
        *shrink, "source=scratch", "target=imagefolder", f"target.root={tmp_path / 'one'}", "train.batch_size=4"
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the target one has 1 class; a classifier needs at least 2" in lines[0], result.stderr
    assert not list(tmp_path.rglob("seed_*"))


@pytest.mark.parametrize(
    "arguments",
    [
        ["regularizer=l2sp", "regularizer.terms.l2sp.alpha=1"],  # a key its group choice brings
        ["-m", "regularizer=l2sp,l2sp_bss", "regularizer.terms.l2sp.alpha=1"],  # ... in each swept choice
        ["method=dtnh_l2sp", "regularizer.terms.l2sp.decay=0.9"],  # a method preset's regularizer
        pytest.param(  # a key the preset adds (26 compositions: 2.5 s, in the e2e tier)
            ["experiment=dtnh_tables", "schedule.cifar10.iterations=5"], marks=pytest.mark.e2e
        ),
        ['+search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.1,1"]'],  # a map meant to take new keys
        ["++train.iterations=5", "hydra.job.chdir=true"],  # forced, existing; Hydra's own keys
    ],
)
def test_known_keys_pass_the_key_check(arguments):
    from safetransfer.commands.train import job_configs

    assert job_configs(arguments)


def test_a_key_one_swept_choice_lacks_is_refused_naming_that_job():
    """Hydra would compose the job regularizer=l2 with regularizer.terms.l2sp.alpha and fail there."""
    from safetransfer.commands.train import job_configs
    from safetransfer.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^regularizer.terms.l2sp.alpha is not a key of the job regularizer=l2; "):
        job_configs(["-m", "regularizer=l2sp,l2", "regularizer.terms.l2sp.alpha=1"])


def test_a_cache_dir_that_cannot_be_a_directory_is_one_line_before_training(cli, tmp_path):
    """A path below a regular file (root ignores chmod, so this is how a test makes one unwritable)."""
    (tmp_path / "afile").write_text("x")
    result = cli(*TINY, "paths.cache_dir=afile/cache")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("safetransfer-train: error: paths.cache_dir=afile/cache is not a writable directory")
    assert not list(tmp_path.rglob("seed_*"))


def test_every_seed_failing_is_one_line_naming_the_first_failure(cli):
    """alpha=1e30 makes every seed's first step overflow: it was a NonFiniteError traceback."""
    result = cli(*TINY, "seeds=[0,1]", "regularizer.terms.l2.alpha=1e30")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("safetransfer-train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "every seed failed, nothing is written to the table; seed 0: iteration 1 (epoch 0)" in lines[0]
    assert "Omega term l2" in lines[0] and "alpha=1e+30" in lines[0] and "failed.json" in lines[0]


@pytest.mark.parametrize("group", ["hydra/launcher=basic", "hydra/job_logging=disabled", "hydra/sweeper=optuna"])
def test_hydras_own_groups_are_taken_on_the_command_line(cli, group):
    """Hydra documents `hydra/<group>=<choice>` overrides; the key check before Hydra leaves them to it."""
    result = cli(group, "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    expected = {
        "hydra/launcher=basic": "BasicLauncher",
        "hydra/job_logging=disabled": "disable_existing_loggers: false",
        "hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    }[group]
    assert expected in result.stdout


def test_a_file_that_names_code_to_run_is_refused_and_nothing_runs(cli, tmp_path, monkeypatch):
    """An experiment file of the user's own (--config-dir, where Hydra alone knows the keys) that gives
    a term a `_target_`: refused in one line naming the registered kinds; the named function never runs."""
    import os

    called = []
    monkeypatch.setattr(os, "getcwdb", lambda *a: called.append(a))
    folder = tmp_path / "mine" / "experiment"
    folder.mkdir(parents=True)
    (folder / "evil.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /regularizer: l2sp\n"
        "regularizer:\n  terms:\n    l2sp:\n      _target_: os.getcwdb\n"
    )
    result = cli("--config-dir", str(tmp_path / "mine"), "experiment=evil", *TINY)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "safetransfer-train: error: regularizer.terms.l2sp._target_=os.getcwdb names code to run; a config names "
        "a regularizer term by its registered name: "
        "regularizer.terms.l2sp.kind=<bi_tuning, bss, co_tuning, delta, head, knowdist, l2, l2sp, lwf>"
    )
    assert not called


def test_a_full_disk_under_the_run_folder_is_one_line_before_hydra_writes(train_in_process, tmp_path, monkeypatch):
    """Hydra writes .hydra/config.yaml into the run folder before any of ours runs: on a full disk that
    was its ENOSPC traceback. The folder Hydra will make is tried first (a byte written and synced)."""
    import errno
    import os

    fsync = os.fsync

    def full(fd):  # the disk holding the run folders is full (the results' and the cache's are not)
        if "/outputs/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, out, err = train_in_process(*TINY)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("safetransfer-train: error: hydra.run.dir=outputs/")
    assert "is not a writable directory (No space left on device)" in lines[0]
    assert not (tmp_path / "outputs").exists()  # the trial's folders removed
