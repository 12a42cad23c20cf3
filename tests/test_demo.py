"""The embedded demo: generated domains, and (slow) the full no-argument run."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import table_rows
from safetransfer.data import domains


def test_domains_are_deterministic_and_balanced():
    images, labels, classes = domains.make_domain("target", 5, 32, seed=7)
    again, _, _ = domains.make_domain("target", 5, 32, seed=7)
    assert torch.equal(images, again)
    assert images.shape == (5 * len(classes), 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [5] * len(classes)
    assert not torch.equal(images, domains.make_domain("target", 5, 32, seed=8)[0])


def test_source_and_target_label_sets_differ():
    assert set(domains.SOURCE_CLASSES).isdisjoint(domains.TARGET_CLASSES)
    assert len(domains.SOURCE_CLASSES) == 12 and len(domains.TARGET_CLASSES) == 6


def test_shapes_cover_what_their_level_says():
    """A filled circle of radius r covers about pi r^2 pixels; an outline far fewer."""
    generator = torch.Generator().manual_seed(0)
    filled = domains.render(
        torch.zeros(1, dtype=torch.long), outline=False, grating=None, palette="cool", size=64, generator=generator
    )
    assert filled.shape == (1, 3, 64, 64)
    coords = torch.arange(8, dtype=torch.float32)
    level = domains._shape_level("circle", coords.view(1, -1) / 4 - 1, coords.view(-1, 1) / 4 - 1)
    inside = (level <= 1).sum().item()
    assert abs(inside - 3.14159 * 16) < 8  # radius 4 pixels on an 8 x 8 grid of pixel corners


@pytest.mark.slow
def test_full_demo_shows_transfer_beyond_the_seeds_spread(tmp_path):
    result = _train(tmp_path)
    check_demo_table(table_rows(tmp_path / "results", "demo"))
    assert "Results table" in result.stdout


def check_demo_table(frame):
    """Five rows of five seeds; every transferred row beats the scratch row beyond the seeds' spread."""
    assert set(frame["n_seeds"]) == {5}
    assert sorted(frame["method"]) == ["DTNH (L2-SP)", "Fine-tuning", "From scratch", "L2-SP", "L2-SP+BSS"]
    transferred, scratch = frame[frame["source"] == "demo"], frame[frame["source"] == "scratch"].iloc[0]
    assert len(transferred) == 4
    assert ((transferred["mean"] - transferred["std"]) > scratch["mean"] + scratch["std"] + 10).all()


def _train(tmp_path, *arguments) -> subprocess.CompletedProcess:
    """`safetransfer-train *arguments` in tmp_path, with a cache of its own there."""
    env = {**os.environ, "SAFETRANSFER_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "safetransfer.commands.train", *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_strong_pull_hurts_and_dtnh_removes_little_of_it(tmp_path):
    """What the README says of DTNH on the demo: L2-SP with alpha 10 ends below Fine-tuning
    seed by seed (paired 95 % interval below -5 points), and DTNH (L2-SP) cannot undo it
    because g_J and g_Omega are nearly orthogonal at batch 32 (angle_J_Omega 75-105 degrees
    on most rows): its projection removes cos^2 < 0.1 of the pull."""
    import glob
    import math

    from scipy import stats

    _train(tmp_path, "-m", "experiment=demo", "method=fine_tuning", "runtime.eval_every=0")
    _train(
        tmp_path,
        "-m",
        "experiment=demo",
        "method=l2sp,dtnh_l2sp",
        "++regularizer.terms.l2sp.alpha=10",
        "runtime.eval_every=0",
        "runtime.log_every=10",
    )
    frame = table_rows(tmp_path / "results", "demo").set_index("method")
    seeds = {m: dict(zip(frame.loc[m, "seeds"], frame.loc[m, "accuracies"])) for m in frame.index}
    gap = [seeds["L2-SP"][s] - seeds["Fine-tuning"][s] for s in seeds["Fine-tuning"]]
    assert len(gap) == 5
    assert stats.ttest_1samp(gap, 0.0).confidence_interval(0.95).high < -5, gap

    angles = pd.concat(pd.read_csv(f) for f in glob.glob(str(tmp_path / "multirun/*/*/1/seed_*/log.csv")))
    assert len(angles) == 30  # DTNH's job: 5 seeds x 6 diagnostics rows
    near_right = angles["angle_J_Omega"].between(75, 105)
    assert near_right.mean() >= 0.8, angles["angle_J_Omega"].describe()
    removed = angles["angle_J_Omega"].map(lambda a: math.cos(math.radians(a)) ** 2 if a > 90 else 0.0)
    assert removed.median() < 0.1
