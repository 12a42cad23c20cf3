"""Seeded draws: the training data's order and every image's augmentation fixed by the
training seed alone, whatever the number of loader workers (runtime.num_workers).

A loader worker draws its random crops and mirrors from its own RNG stream, seeded per
worker: the same seed then gives other crops with 0, 2 or 4 workers, and a resumed run
cannot restore the workers' streams. Here the sampler draws the epoch's order and one
number per epoch from the seed's generator, and hands the dataset (index, draw) pairs;
each image's transform runs with the CPU RNG seeded from its draw (the epoch's number plus
its position in the epoch). Which process runs the transform no longer matters, and a
resumed epoch (its generator restored, safetransfer.training.engine.Batches) replays the same draws.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

SEED_SPACE = 2**62


class SeededDraws(Sampler):
    """A random order of `size` items per epoch, each as (index, draw seed); `generator` fixes both."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator
        self.order: list[int] = []  # the current epoch's order (the last drawn): which items each batch holds

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order = torch.randperm(self.size, generator=self.generator).tolist()
        epoch = int(torch.randint(SEED_SPACE, (1,), generator=self.generator))
        return iter([(index, (epoch + position) % SEED_SPACE) for position, index in enumerate(order)])


class Seeded(Dataset):
    """`dataset[index]` with the CPU RNG seeded from the draw: the item's random transform is
    a function of (index, draw), in any process. Other RNGs (CUDA, the caller's) are untouched."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, draw = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw)
            return self.dataset[index]
