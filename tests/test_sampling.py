"""Per-class sampling: the rounding rule, stratification, and a draw fixed by its own seed."""

import numpy as np
import pytest

from safetransfer.targets import per_class_count, stratified_sample


@pytest.mark.parametrize("available,rate,expected", [
    (30, 15, 5),     # 4.5 rounds half up
    (30, 30, 9),
    (30, 50, 15),
    (30, 100, 30),
    (60, 15, 9),
    (7, 15, 1),      # 1.05
    (3, 15, 1),      # 0.45 would round to 0: at least one image per class
    (80, 30, 24),
    (5, 10, 1),      # 0.5 rounds half up
])
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
