"""Datasets wrapping a target's images: held in memory, or restricted to indices and transformed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from safetransfer.data.images import read_item


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class Transformed(Dataset):
    """`dataset` restricted to `indices`, with `transform` applied to each image."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform):
        self.dataset, self.indices, self.transform = dataset, list(map(int, indices)), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = read_item(self.dataset, self.indices[index])
        return self.transform(image), label
