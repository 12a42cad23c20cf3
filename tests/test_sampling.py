"""Per-class sampling: the rounding rule, stratification, and a draw fixed by its own seed."""

import numpy as np
import pytest

from safetransfer.data.sampling import per_class_count, stratified_sample


@pytest.mark.parametrize(
    "available,rate,expected",
    [
        (30, 15, 5),  # 4.5 rounds half up
        (30, 30, 9),
        (30, 50, 15),
        (30, 100, 30),
        (60, 15, 9),
        (7, 15, 1),  # 1.05
        (3, 15, 1),  # 0.45 would round to 0: at least one image per class
        (80, 30, 24),
        (5, 10, 1),  # 0.5 rounds half up
    ],
)
def test_rounding_rule(available, rate, expected):
    assert per_class_count(available, rate) == expected


def test_stratified_counts_and_membership():
    labels = np.repeat([0, 1, 2], [30, 60, 7])
    np.random.default_rng(5).shuffle(labels)
    chosen = stratified_sample(labels, 15, seed=0)
    assert len(set(chosen)) == len(chosen)
    counts = np.bincount(labels[chosen], minlength=3)
    assert counts.tolist() == [5, 9, 1]
    assert np.all(np.diff(chosen) > 0)


def test_draw_is_fixed_by_its_seed():
    labels = np.repeat(np.arange(4), 50)
    first = stratified_sample(labels, 30, seed=1)
    assert np.array_equal(first, stratified_sample(labels, 30, seed=1))
    assert not np.array_equal(first, stratified_sample(labels, 30, seed=2))
    assert np.array_equal(stratified_sample(labels, 100, seed=3), np.arange(200))


def test_validation_hold_out_is_per_class_and_disjoint():
    from safetransfer.data.sampling import hold_out

    indices = np.arange(100, 140)
    labels = np.repeat([0, 1, 2, 3], [20, 10, 9, 1])
    train, val = hold_out(indices, labels, 0.25, seed=0)
    assert set(train).isdisjoint(val) and sorted(set(train) | set(val)) == list(indices)
    held = {c: int(np.sum(np.isin(indices[labels == c], val))) for c in range(4)}
    assert held == {0: 5, 1: 3, 2: 2, 3: 0}  # 5, 2.5 -> 3, 2.25 -> 2; a one-image class keeps its image
    again = hold_out(indices, labels, 0.25, seed=0)
    assert np.array_equal(again[1], val)


def test_splits_are_disjoint_and_stable_across_training_seeds(compose_cfg):
    from safetransfer.common.registry import build
    from safetransfer.data.preparation import prepare_data

    cfg = compose_cfg(
        "target.sampling_rate=50",
        "target.val_fraction=0.2",
        "target.train_images_per_class=20",
        "target.test_images_per_class=5",
        "train.batch_size=8",
    )
    target = build("target", cfg.target, "target")
    first, second = prepare_data(cfg, target), prepare_data(cfg, target)
    assert np.array_equal(first.train_indices, second.train_indices)  # nothing depends on the training seed
    assert set(first.train_indices).isdisjoint(first.val_indices)
    assert len(first.train_indices) == 6 * 8 and len(first.val_indices) == 6 * 2  # 10 sampled: 2 held out
    assert len(first.test) == 6 * 5
    # test images come from another generator stream than training images: no image is in both
    train_images = {target.train_set()[int(i)][0].numpy().tobytes() for i in first.train_indices}
    assert all(target.test_set()[i][0].numpy().tobytes() not in train_images for i in range(len(first.test)))
    redrawn = prepare_data(cfg, target, seed=7)
    assert not np.array_equal(redrawn.train_indices, first.train_indices)


def test_validation_metrics_are_written(compose_cfg, tmp_path):
    from conftest import TINY
    from safetransfer.common.registry import build
    from safetransfer.data.preparation import prepare_data
    from safetransfer.job.run import run_seed

    cfg = compose_cfg(*TINY, "target.val_fraction=0.3")
    data = prepare_data(cfg, build("target", cfg.target, "target"))
    metrics = run_seed(cfg, 0, data, None, tmp_path)
    assert metrics["val_images"] == 6 * 3 and 0 <= metrics["val_top1"] <= 100
    assert metrics["train_images"] == 6 * 7
