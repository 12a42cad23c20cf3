"""Images held on the device (data.on_device): a paper cell's decoded uint8 training sample
and test set copied to the GPU once per job, batches gathered there by index. No loader
workers, no host-to-device copy per step.

The batches are the loader path's: the same sampler (data.draws.SeededDraws, the seed's
generator) orders each epoch, and the same DeviceAugment crops, mirrors and normalises them,
so a seed trains on the same pixels either way and resumes the same way (the sampler's
generator is restored, the epoch's batches taken are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

#: data.on_device's choices
ON_DEVICE = ("auto", True, False)
#: auto holds the images on a GPU when they take at most this share of its free memory (split
#: among a job's concurrent seeds, which hold a copy each); the rest is for the training itself
FREE_MEMORY_SHARE = 0.5
#: images copied to the device at a time (bounds the host memory the copy takes)
CHUNK = 1024


def held_bytes(counts: tuple[int, int], train_shape: tuple[int, ...], test_shape: tuple[int, ...]) -> int:
    """The bytes the uint8 training sample (counts[0] images of train_shape) and test set take."""
    return counts[0] * math.prod(train_shape) + counts[1] * math.prod(test_shape)


def fits(nbytes: int, device: torch.device, sharing: int = 1) -> bool:
    """Whether `nbytes` are within FREE_MEMORY_SHARE of the GPU's free memory, split `sharing` ways."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= FREE_MEMORY_SHARE * free / max(1, sharing)


def to_device(images: np.ndarray, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """images[indices] (a memory-mapped uint8 array) as one tensor on `device`, copied a chunk at a time."""
    held = torch.empty((len(indices), *images.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, len(indices), CHUNK):
        chunk = np.ascontiguousarray(images[np.asarray(indices[start : start + CHUNK])])
        held[start : start + len(chunk)].copy_(torch.from_numpy(chunk))
    return held


class ResidentLoader:
    """(images, labels) batches of tensors already on the device: in the sampler's order
    (SeededDraws: its draws of (index, seed) are read for the index only), dropping the last
    short batch, as the training loader does; or in order, every image, as the test loader does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler=None):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler = sampler
        self.generator = None  # the order's generator is the sampler's (engine.Batches reads it there)
        self.drop_last = sampler is not None

    def __len__(self) -> int:
        count = len(self.labels) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            order = torch.arange(len(self.labels), device=self.images.device)
        else:
            order = torch.tensor([index for index, _ in self.sampler], device=self.images.device)
        for batch in range(len(self)):
            chosen = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.images[chosen], self.labels[chosen]
