"""Result tables: statistics, replace-not-duplicate, concurrent writers, atomic files."""

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safetransfer.common import atomic
from safetransfer.common.atomic import atomic_write_text
from safetransfer.common.errors import StorageError
from safetransfer.reporting import results
from safetransfer.reporting.results import format_cell, make_row, read_table, summarize, write_row

#: the structures (methods.method_structure) of the methods these rows stand for, as a job records them
STRUCTURES = {
    "Fine-tuning": {"regularizer": "Fine-tuning", "terms": ["l2"], "direction": "Sum", "scratch": False},
    "L2-SP": {"regularizer": "L2-SP", "terms": ["head", "l2sp"], "direction": "Sum", "scratch": False},
    "DTNH (L2-SP)": {"regularizer": "L2-SP", "terms": ["head", "l2sp"], "direction": "DTNH", "scratch": False},
    "From scratch": {"regularizer": "Fine-tuning", "terms": ["l2"], "direction": "Sum", "scratch": True},
}


def row(key="k1", method="Fine-tuning", accuracies=(80.0, 82.0, 81.0), source="demo"):
    return make_row(
        backbone="resnet18",
        source=source,
        target="demo",
        sampling_rate=30,
        method=method,
        seeds=list(range(len(accuracies))),
        accuracies=list(accuracies),
        overrides="",
        key=key,
        run_dir="/tmp/run",
        structure=STRUCTURES.get(method),
    )


def test_summarize_is_mean_and_sample_std():
    values = [71.3, 69.8, 72.4, 70.1, 70.9]
    mean, std = summarize(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert std != pytest.approx(np.std(values, ddof=0))
    mean, std = summarize([55.0])
    assert mean == 55.0 and np.isnan(std)


def test_markdown_cell_has_two_decimals():
    assert format_cell(80.0, 1.0) == "80.00 ± 1.00"
    assert format_cell(71.256, 0.3149) == "71.26 ± 0.31"
    assert format_cell(55.0, float("nan")) == "55.00"


def test_rerunning_a_config_replaces_its_row(tmp_path):
    write_row(tmp_path, "t", row("a", accuracies=(50.0, 52.0)))
    write_row(tmp_path, "t", row("b", source="scratch", accuracies=(30.0, 31.0)))
    write_row(tmp_path, "t", row("a", accuracies=(60.0, 62.0, 64.0)))
    frame = read_table(tmp_path, "t")
    assert sorted(frame["key"]) == ["a", "b"]
    replaced = frame[frame["key"] == "a"].iloc[0]
    assert replaced["mean"] == pytest.approx(62.0) and replaced["n_seeds"] == 3
    assert replaced["accuracies"] == "60.0;62.0;64.0"  # full precision in the CSV
    markdown = (tmp_path / "t.md").read_text()
    assert "62.00 ± 2.00" in markdown and "51.00" not in markdown
    assert markdown.count("\n") == 2 + 2  # header, rule and two rows


def _write_many(directory: str, worker: int, count: int) -> None:
    for i in range(count):
        write_row(Path(directory), "shared", row(f"w{worker}-{i}", accuracies=(float(worker), float(i))))


@pytest.mark.e2e  # four real processes
def test_concurrent_jobs_lose_no_row(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), w, 8)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    frame = read_table(tmp_path, "shared")
    assert sorted(frame["key"]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(8))


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    atomic_write_text(path, "old,complete\n")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(StorageError, match=r"writing .*table.csv failed \(disk gone\); the earlier file is kept"):
        atomic_write_text(path, "new,half")
    assert path.read_text() == "old,complete\n"
    assert os.listdir(tmp_path) == ["table.csv"]  # no temporary file left behind


def test_config_key_ignores_seeds_and_runtime(compose_cfg):
    from safetransfer.common.fingerprints import config_key

    base = config_key(compose_cfg())
    assert config_key(compose_cfg("seeds=[0]", "runtime.num_workers=1", "runtime.device=cpu")) == base
    assert config_key(compose_cfg("logger=tensorboard", "runtime.checkpoint_every=7", "launcher=gpus")) == base
    assert config_key(compose_cfg("optim.optimizer.lr=0.02")) != base
    assert config_key(compose_cfg("target.sampling_rate=50")) != base


def test_table_columns_round_trip(tmp_path):
    write_row(tmp_path, "t", row("a"))
    frame = pd.read_csv(tmp_path / "t.csv")
    assert list(frame.columns) == results.ROW_COLUMNS + results.PAIRED_COLUMNS + results.SCRATCH_COLUMNS


def test_each_job_row_is_compared_with_its_reference_row_seed_by_seed(tmp_path):
    """The per-job table: DTNH (L2-SP) against L2-SP and L2-SP against Fine-tuning over the
    seeds both have (unequal seed sets), checked against scipy's paired t-test; a row of
    another sampling rate is not a reference; one common seed gives no interval."""
    from scipy import stats

    def job(key, method, seeds, accuracies, rate=30, overrides=""):
        return make_row(
            backbone="resnet18",
            source="demo",
            target="demo",
            sampling_rate=rate,
            method=method,
            seeds=seeds,
            accuracies=accuracies,
            overrides=overrides,
            key=key,
            run_dir="/tmp/run",
            structure=STRUCTURES.get(method),
        )

    write_row(
        tmp_path,
        "t",
        job("a", "Fine-tuning", [0, 1, 2, 3, 4], [80.0, 82.5, 79.0, 81.0, 80.5], overrides="method=fine_tuning"),
    )
    write_row(tmp_path, "t", job("b", "L2-SP", [0, 1, 2, 3], [76.0, 79.5, 77.0, 76.5], overrides="method=l2sp"))
    write_row(
        tmp_path,
        "t",
        job("c", "DTNH (L2-SP)", [1, 2, 3, 4, 5], [81.0, 80.0, 79.5, 82.0, 70.0], overrides="method=dtnh_l2sp"),
    )
    write_row(tmp_path, "t", job("d", "L2-SP", [0, 1], [60.0, 61.0], rate=100, overrides="method=l2sp"))
    write_row(tmp_path, "t", job("e", "DTNH (L2-SP)", [1, 7], [62.0, 63.0], rate=100, overrides="method=dtnh_l2sp"))
    frame = read_table(tmp_path, "t").set_index("key")

    def expect(ours, reference):
        common = sorted(set(ours) & set(reference))
        d = np.array([ours[s] - reference[s] for s in common])
        test = stats.ttest_rel([ours[s] for s in common], [reference[s] for s in common])
        low, high = test.confidence_interval(0.95)
        return len(common), d.mean(), low, high

    fine, l2sp, dtnh = (
        {s: a for s, a in zip(seeds, accs)}
        for seeds, accs in (
            ([0, 1, 2, 3, 4], [80.0, 82.5, 79.0, 81.0, 80.5]),
            ([0, 1, 2, 3], [76.0, 79.5, 77.0, 76.5]),
            ([1, 2, 3, 4, 5], [81.0, 80.0, 79.5, 82.0, 70.0]),
        )
    )
    for key, reference, ours, theirs in (("b", "Fine-tuning", l2sp, fine), ("c", "L2-SP", dtnh, l2sp)):
        n, mean, low, high = expect(ours, theirs)
        row = frame.loc[key]
        assert row["reference"] == reference and row["paired_n"] == n
        assert row["paired_diff"] == pytest.approx(mean) and row["paired_low"] == pytest.approx(low)
        assert row["paired_high"] == pytest.approx(high)
    assert frame.loc["a", "reference"] == "" or pd.isna(frame.loc["a", "reference"])  # Fine-tuning: no reference
    assert frame.loc["e", "reference"] == "L2-SP" and frame.loc["e", "paired_n"] == 1  # the rate-100 L2-SP only
    assert np.isnan(frame.loc["e", "paired_diff"])
    markdown = (tmp_path / "t.md").read_text()
    assert "1 common seed: no interval" in markdown
    n, mean, low, high = expect(l2sp, fine)
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] ({n}) *" in markdown  # L2-SP is below Fine-tuning on every seed


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp creates 0600 whatever the umask; results on a shared disk must be readable as
    the umask allows (metrics.json, tables, job.json and checkpoints go through this)."""
    from safetransfer.common.atomic import atomic_torch_save, atomic_write_json

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        atomic_write_json(tmp_path / "metrics.json", {"top1": 1.0})
        atomic_torch_save({"w": 1}, tmp_path / "checkpoint.pt")
        write_row(tmp_path, "t", row("a"))
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("metrics.json", "checkpoint.pt", "t.csv", "t.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.parametrize(
    "override, left_out",
    [
        ("runtime.device=cuda", True),
        ("+search.seeds=[0]", True),
        ("seeds=[0,1]", True),
        ("launcher=gpus", True),
        ("hydra/launcher=joblib", True),
        ("~logger", True),
        ("method=l2sp", False),
        ("target.sampling_rate=15", False),
        ("regularizer.terms.l2sp.alpha=0.01", False),
        ("seedsx=1", False),
    ],
)
def test_a_row_leaves_out_the_overrides_of_keys_outside_its_key(override, left_out):
    from safetransfer.reporting.results import runtime_only

    assert runtime_only(override) is left_out


def test_a_grid_is_compared_with_its_reference_and_a_missing_pair_says_why(tmp_path):
    """An L2-SP grid (alpha 0.01, 0.1) beside one Fine-tuning row: each L2-SP row is compared with
    Fine-tuning (which has no alpha); DTNH (L2-SP) at alpha 0.1 with L2-SP at 0.1 only; a DTNH row
    without alpha matches both L2-SP rows and says the pair is ambiguous; a row of another lr has no
    reference and says so. The settings that differ are columns of the Markdown table."""

    def job(key, method, accuracies, overrides):
        return make_row(
            backbone="resnet18",
            source="demo",
            target="demo",
            sampling_rate=30,
            method=method,
            seeds=[0, 1, 2],
            accuracies=accuracies,
            overrides=overrides,
            key=key,
            run_dir="/tmp/run",
            structure=STRUCTURES.get(method),
        )

    write_row(tmp_path, "t", job("f", "Fine-tuning", [80.0, 81.0, 82.0], "method=fine_tuning"))
    write_row(tmp_path, "t", job("a", "L2-SP", [70.0, 72.0, 71.0], "method=l2sp regularizer.terms.l2sp.alpha=0.01"))
    write_row(tmp_path, "t", job("b", "L2-SP", [75.0, 76.0, 78.0], "method=l2sp regularizer.terms.l2sp.alpha=0.1"))
    write_row(
        tmp_path, "t", job("d", "DTNH (L2-SP)", [76.0, 77.0, 79.0], "method=dtnh_l2sp regularizer.terms.l2sp.alpha=0.1")
    )
    write_row(tmp_path, "t", job("e", "DTNH (L2-SP)", [60.0, 61.0, 62.0], "method=dtnh_l2sp"))
    write_row(
        tmp_path,
        "t",
        job("g", "L2-SP", [50.0, 51.0, 52.0], "method=l2sp regularizer.terms.l2sp.alpha=0.1 optim.optimizer.lr=0.1"),
    )
    frame = read_table(tmp_path, "t").set_index("key")
    assert frame.loc["a", "reference"] == "Fine-tuning" and frame.loc["a", "paired_diff"] == pytest.approx(-10.0)
    assert frame.loc["b", "reference"] == "Fine-tuning" and frame.loc["b", "paired_diff"] == pytest.approx(-4.666666)
    assert frame.loc["d", "reference"] == "L2-SP" and frame.loc["d", "paired_diff"] == pytest.approx(1.0)
    assert pd.isna(frame.loc["e", "reference"]) and "2 rows of L2-SP without DTNH" in frame.loc["e", "paired_note"]
    assert "ambiguous" in frame.loc["e", "paired_note"]
    assert (
        pd.isna(frame.loc["g", "reference"])
        and "no row of plain fine-tuning (Fine-tuning or L2) from demo" in frame.loc["g", "paired_note"]
    )
    markdown = (tmp_path / "t.md").read_text()
    header = markdown.splitlines()[0]
    assert "| l2sp.alpha " in header and "| optimizer.lr " in header and "overrides" not in header
    assert "none: 2 rows of L2-SP without DTNH" in markdown
