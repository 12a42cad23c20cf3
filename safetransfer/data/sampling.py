"""Per-class sampling of a target's training images (the papers' 15/30/50/100 %) and the
validation hold-out, each draw fixed by its seed."""

from __future__ import annotations

import numpy as np


def per_class_count(available: int, rate: float) -> int:
    """Images kept from a class of `available` images at `rate` percent.

    Rounded half up, and never below one image per class.
    """
    return min(available, max(1, int(np.floor(available * rate / 100 + 0.5))))


def stratified_sample(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of `rate` percent of each class's images, the draw fixed by `seed`."""
    labels = np.asarray(labels)
    if rate >= 100:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=per_class_count(len(members), rate), replace=False))
    return np.sort(np.concatenate(chosen))


def hold_out(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` per class: round-half-up(fraction x n_c) go to validation, but at least
    one image of each class stays for training (none is held out of a one-image class)."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = indices[labels == label]
        count = min(len(members) - 1, int(np.floor(len(members) * fraction + 0.5)))
        chosen = rng.permutation(len(members))
        held.append(members[chosen[:count]])
        kept.append(members[chosen[count:]])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held)).astype(np.int64)
