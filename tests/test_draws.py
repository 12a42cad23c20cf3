"""Seeded draws (safetransfer.data.draws): a seed's batches and augmentations do not depend on
the number of loader workers."""

import torch

from conftest import TINY
from safetransfer.data.preparation import prepare_data
from safetransfer.data.targets.demo import DemoTarget
from safetransfer.job.build import build_seed
from safetransfer.job.run import run_seed
from safetransfer.training.engine import Batches


def _data(cfg):
    # the demo's in-memory images go through the PIL-free v2 transform in the loader: random crop + mirror
    return prepare_data(cfg, DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50))


def _batches(cfg, seed, count):
    built = build_seed(cfg, seed, _data(cfg), None)
    batches = Batches(built.parts.loader)
    return [next(batches)[1] for _ in range(count)]


def test_workers_0_and_2_give_the_same_batches_and_augmentations(compose_cfg):
    # 30 training images, batch 8: 3 batches an epoch, so 5 batches cross into a second epoch
    plain = _batches(compose_cfg(*TINY, "runtime.num_workers=0"), 0, 5)
    workers = _batches(compose_cfg(*TINY, "runtime.num_workers=2"), 0, 5)
    for (a, labels_a), (b, labels_b) in zip(plain, workers):
        assert torch.equal(labels_a, labels_b) and torch.equal(a, b)
    # the draws are random: another seed gives other crops of the same images, and the second
    # epoch's crops of an image are not its first epoch's
    other = _batches(compose_cfg(*TINY, "runtime.num_workers=0"), 1, 1)
    assert not torch.equal(other[0][0], plain[0][0])
    assert not all(torch.equal(x, y) for x, y in zip(plain[0][0], plain[3][0]))


def test_workers_0_and_2_give_the_same_weights_after_a_few_steps(compose_cfg, tmp_path):
    states = []
    for workers in (0, 2):
        cfg = compose_cfg(
            *TINY,
            f"runtime.num_workers={workers}",
            "train.iterations=4",
            "runtime.log_every=0",
            "runtime.diagnostics_every=0",
            "runtime.spectrum_batches=0",
        )
        metrics = run_seed(cfg, 0, _data(cfg), None, tmp_path / f"workers{workers}")
        states.append(metrics["test_loss"])
    assert states[0] == states[1]
