"""Shared pieces of the targets that read image files listed by official split files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from safetransfer.errors import ConfigError


class ImageList(Dataset):
    """Images named by path, with their labels; decoded to RGB on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), int(self.labels[index])


def fetch_archive(url: str, root: Path, md5: str | None, key: str = "target.root") -> None:
    """Download and extract an official archive into `root`, checking its md5 where one is pinned."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, download_root=str(root), md5=md5)
    except Exception as error:  # no network, a moved file, a bad checksum
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"could not download {url} into {key}={root} ({reason}); download and extract it "
                          "there by hand") from None


def check_class_count(name: str, found: int, expected: int | None, origin: str) -> None:
    if expected is not None and found != expected:
        raise ConfigError(f"target={name}: {origin} lists {found} classes, but {name} has {expected}; the data "
                          f"under target.root is incomplete or another dataset's (set target.expected_classes "
                          f"only for a deliberate subset)")


def split_sizes(name: str, train: int, test: int, expected: Sequence[int] | None) -> None:
    if expected is not None and (train, test) != tuple(expected):
        raise ConfigError(f"target={name}: the split files give {train} training and {test} test images, "
                          f"the official split has {expected[0]} and {expected[1]}; the data under target.root "
                          "is incomplete")
