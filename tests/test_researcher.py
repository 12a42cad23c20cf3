"""A researcher's day (issue 25): sweeps over sources as typed, the scratch row named and
compared, where a run's weights came from, and a saved source never silently replaced.

The checkpoint file is torchvision's ImageNet V1 structure (tests/published.py says where it
comes from); every run goes through safetransfer-train's entry function, in this process."""

import hashlib
import json

import pandas as pd
import pytest
import torch

import published
from conftest import TINY, TINY_DEMO_SOURCE

SHORT = [
    *(o for o in TINY if o not in TINY_DEMO_SOURCE),
    "train.iterations=2",
    "optim.scheduler.milestones=[1]",
    "runtime.log_every=0",
    "runtime.diagnostics_every=0",
    "runtime.spectrum_batches=0",
    "results.dir=res",
]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "weights" / published.IMAGENET_V1_FILES["resnet18"]
    path.parent.mkdir()
    published.torchvision_v1_checkpoint(path, "resnet18")
    return path


def _metrics(sweep):
    return {
        json.loads(p.read_text())["config"]["source"]["name"]: json.loads(p.read_text())
        for p in sweep.rglob("seed_0/metrics.json")
    }


@pytest.mark.e2e  # a multirun
def test_a_sweep_over_sources_gives_each_source_its_own_keys(train_in_process, tmp_path, checkpoint):
    """`-m source=file,scratch source.path=...`: source.path belongs to file only; both jobs run,
    each records where its weights came from (the file's sha256, computed here with hashlib)."""
    code, out, err = train_in_process(
        "-m", *SHORT, "source=file,scratch", f"source.path={checkpoint}", "hydra.sweep.dir=sweep"
    )
    assert code == 0, err[-3000:]
    assert "did not finish" not in out
    metrics = _metrics(tmp_path / "sweep")
    assert set(metrics) == {"file", "scratch"}
    assert metrics["file"]["source_checkpoint"] == {
        "name": "file",
        "file": str(checkpoint),
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
    }
    assert metrics["scratch"]["source_checkpoint"]["sha256"] is None
    assert "path" not in metrics["scratch"]["config"]["source"]  # not the scratch job's key
    records = pd.read_csv(tmp_path / "res" / "demo.seeds.csv", keep_default_na=False)
    rows = dict(zip(records["source"], records["method"]))
    assert rows == {f"file:{checkpoint.stem}": "Fine-tuning", "scratch": "From scratch"}
    scratch_row = records[records["source"] == "scratch"].iloc[0]
    assert "source.path" not in json.loads(scratch_row["settings"])


@pytest.mark.e2e  # a multirun
def test_from_scratch_beside_an_explicit_source_runs_from_scratch(train_in_process, tmp_path, checkpoint):
    """`method=fine_tuning,from_scratch source=file`: the from_scratch job trains from scratch
    (it failed with a traceback after every other job had run), is named From scratch, and the
    fine-tuned row is compared with it seed by seed."""
    code, out, err = train_in_process(
        "-m",
        *SHORT,
        "seeds=[0,1]",
        "method=fine_tuning,from_scratch",
        "source=file",
        f"source.path={checkpoint}",
        "hydra.sweep.dir=sweep",
    )
    assert code == 0, err[-3000:]
    metrics = _metrics(tmp_path / "sweep")
    assert set(metrics) == {"file", "scratch"} and metrics["scratch"]["method"] == "From scratch"
    markdown = (tmp_path / "res" / "demo.md").read_text()
    assert "| From scratch " in markdown
    compared = [line for line in markdown.splitlines() if "| Fine-tuning " in line and "From scratch" in line]
    assert len(compared) == 1 and "(2)" in compared[0]  # two common seeds


def test_a_method_preset_contradicted_by_the_command_line_is_refused_before_any_job(train_in_process, tmp_path):
    code, out, err = train_in_process(
        "-m", *SHORT, "method=fine_tuning,l2sp", "regularizer=bss", "hydra.sweep.dir=sweep"
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert "method=fine_tuning sets regularizer=l2, but regularizer=bss is given too" in lines[0]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.e2e  # three pretraining runs: 3 s
def test_a_saved_source_checkpoint_is_not_replaced_unless_asked(train_in_process, tmp_path, checkpoint):
    """pretrain.save_to holding a checkpoint other runs may have started from: refused in one line
    before training; the job that wrote it, rerun into its directory, goes on; overwrite=true replaces it."""
    save_to = tmp_path / "sources" / "resnet18_demo.pt"
    pretrain = [*SHORT, "source=file", f"source.path={checkpoint}", f"pretrain.save_to={save_to}"]
    code, _, err = train_in_process(*pretrain, "hydra.run.dir=first")
    assert code == 0, err[-3000:]
    digest = hashlib.sha256(save_to.read_bytes()).hexdigest()
    code, _, err = train_in_process(*pretrain, "hydra.run.dir=first")  # the same job, rerun: its seed is kept
    assert code == 0, err[-3000:]
    code, _, err = train_in_process(*pretrain, "optim.optimizer.lr=0.02", "hydra.run.dir=second")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"pretrain.save_to={save_to} already holds a source checkpoint" in lines[0]
    assert "pretrain.overwrite=true" in lines[0] and not (tmp_path / "second" / "seed_0").exists()
    assert hashlib.sha256(save_to.read_bytes()).hexdigest() == digest
    code, _, err = train_in_process(
        *pretrain, "optim.optimizer.lr=0.02", "pretrain.overwrite=true", "hydra.run.dir=second"
    )
    assert code == 0, err[-3000:]
    assert hashlib.sha256(save_to.read_bytes()).hexdigest() != digest


def test_an_interrupted_multirun_prints_the_command_that_continues_it(train_in_process, tmp_path, monkeypatch):
    """A sweep of 3 jobs stopped in its first: the message names the sweep folder (rerunning "the
    same command" would start a new folder and retrain everything) and counts all 3 jobs."""
    import shlex
    import signal

    from safetransfer.common.signals import Preempted
    from safetransfer.job import run

    def stopped(*args, **kwargs):
        raise Preempted(signal.SIGTERM, 7, None)

    monkeypatch.setattr(run, "run_job", stopped)
    code, out, err = train_in_process("-m", *SHORT, "target.sampling_rate=30,50,100")
    assert code == 128 + signal.SIGTERM
    sweep = next(tmp_path.glob("multirun/*/*"))
    line = next(line for line in err.splitlines() if "continue the sweep with:" in line)
    words = shlex.split(line.split("continue the sweep with: ")[1].split(";")[0])
    assert words[0] == "safetransfer-train" and words[1] == "-m" and "target.sampling_rate=30,50,100" in words
    assert f"hydra.sweep.dir={sweep}" in words
    assert f"3 of 3 jobs of {sweep.relative_to(tmp_path)} did not finish" in out and "2 jobs not started" in out
    assert "Continue the whole sweep (finished seeds are kept, not rerun): safetransfer-train -m" in out


def test_planned_jobs_are_the_sweepers_product():

    from safetransfer.commands.sweeps import planned_jobs

    jobs = planned_jobs({"method": "fine_tuning,l2sp,from_scratch"}, ["-m", "target.sampling_rate=30,50", "seeds=[0]"])
    assert len(jobs) == 3 * 2 and ["method=fine_tuning", "target.sampling_rate=30", "seeds=[0]"] in jobs


def test_a_replaced_source_checkpoint_never_mixes_into_one_setting(compose_cfg, tmp_path):
    """Seeds fine-tuned from two versions of one source file are two settings in a paper table
    (they were one cell of two seeds), and a finished seed from the old version is trained again."""
    from omegaconf import OmegaConf

    from safetransfer.common.fingerprints import config_key
    from safetransfer.job.run import finished_seed
    from safetransfer.reporting.store import records_under

    cfg = compose_cfg("source=pretrained", "source.dataset=vehicles")
    for seed, digest in ((0, "a" * 64), (1, "b" * 64)):
        path = tmp_path / "runs" / "job" / f"seed_{seed}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(
            json.dumps(
                {
                    "seed": seed,
                    "top1": 50.0,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                    "source_checkpoint": {"name": "pretrained", "file": "x.pt", "sha256": digest},
                }
            )
        )
    records = records_under([tmp_path / "runs"])
    assert sorted(r["setting"] for r in records) == [f"{config_key(cfg)}:{c * 12}" for c in "ab"]
    key = config_key(cfg)
    run = tmp_path / "runs" / "job"
    assert finished_seed(run, 0, key, {"sha256": "a" * 64}) is not None
    assert finished_seed(run, 0, key, {"sha256": "b" * 64, "file": "x.pt"}) is None


def test_the_rerun_command_of_a_source_sweeps_job_passes_the_key_check():
    """A job of `-m source=demo,pretrained source.iterations=4` is rerun alone with its own overrides,
    `++source.iterations=4` among them, beside source=pretrained: accepted (the job leaves it out)."""
    from safetransfer.commands.train import job_configs
    from safetransfer.common.errors import ConfigError

    assert job_configs(["source=pretrained", "++source.dataset=x", "++source.iterations=4", "hydra.mode=RUN"])
    with pytest.raises(ConfigError, match="source.iteratons is not a key"):
        job_configs(["source=pretrained", "++source.iteratons=4"])


@pytest.mark.e2e  # a multirun of two jobs
def test_the_readmes_forced_term_key_in_a_sweep_over_methods_is_left_out_where_the_term_is_not(
    train_in_process, tmp_path
):
    """`-m method=l2sp,fine_tuning ++regularizer.terms.l2sp.alpha=10` ended the fine_tuning job in a
    ConfigAttributeError traceback: that job now leaves the key out (with a note), as a source sweep's
    jobs leave out the source keys theirs does not take; the L2-SP job takes alpha=10."""
    code, out, err = train_in_process(
        "-m",
        *SHORT,
        "source=scratch",
        "method=l2sp,fine_tuning",
        "++regularizer.terms.l2sp.alpha=10",
        "hydra.sweep.dir=sweep",
    )
    assert code == 0, err[-3000:]
    configs = {
        m["method"]: m["config"]
        for m in (json.loads(p.read_text()) for p in tmp_path.glob("sweep/*/seed_0/metrics.json"))
    }
    assert configs["L2-SP"]["regularizer"]["terms"]["l2sp"]["alpha"] == 10
    assert set(configs["From scratch"]["regularizer"]["terms"]) == {"l2"}  # fine_tuning, from scratch
    logs = " ".join(p.read_text() for p in tmp_path.glob("sweep/*/*.log"))  # Hydra's log file of each job
    assert "the regularizer Fine-tuning has no term l2sp" in logs


def test_lwf_under_dtnh_trains_the_source_classifier_beside_the_new_head(train_in_process, tmp_path, checkpoint):
    """method=dtnh_lwf from a torchvision file (its 1000-way classifier is the source head): the job
    runs, is named DTNH (LwF), and the kept source classifier has moved from the file's `fc`."""
    code, out, err = train_in_process(
        *SHORT, "method=dtnh_lwf", "source=file", f"source.path={checkpoint}", "runtime.save_weights=true"
    )
    assert code == 0, err[-3000:]
    (path,) = tmp_path.rglob("seed_0/metrics.json")
    metrics = json.loads(path.read_text())
    assert metrics["method"] == "DTNH (LwF)" and metrics["structure"]["terms"] == ["l2", "lwf"]
    weights = torch.load(path.parent / "model.pt", weights_only=True)["state_dict"]
    source = torch.load(checkpoint, weights_only=True)
    assert weights["source_head.weight"].shape == source["fc.weight"].shape == (1000, 512)
    assert not torch.equal(weights["source_head.weight"], source["fc.weight"])  # trained with the network


@pytest.mark.parametrize("method", ["lwf", "dtnh_co_tuning"])
@pytest.mark.parametrize("source", ["scratch", pytest.param("backbone only", marks=pytest.mark.e2e)])
def test_lwf_or_co_tuning_from_a_source_without_a_classifier_is_one_line(
    train_in_process, tmp_path, checkpoint, method, source
):
    """source=scratch, or a torchvision file without its `fc` (a backbone alone): one line, before training."""
    if source == "scratch":
        chosen = ["source=scratch"]
    else:
        state = {k: v for k, v in torch.load(checkpoint, weights_only=True).items() if not k.startswith("fc.")}
        torch.save(state, tmp_path / "backbone_only.pth")
        chosen = ["source=file", f"source.path={tmp_path / 'backbone_only.pth'}"]
    code, out, err = train_in_process(*SHORT, f"method={method}", *chosen)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "this source has no classifier" in lines[0], err
