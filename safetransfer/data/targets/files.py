"""Shared pieces of the targets that read image files listed by official split files."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from safetransfer.common.downloads import fetch_archive
from safetransfer.common.errors import ConfigError
from safetransfer.data.targets.base import Target


class ImageList(Dataset):
    """Images named by path, with their labels; decoded to RGB on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB"), int(self.labels[index])


def check_class_count(name: str, found: int, expected: int | None, origin: str) -> None:
    if expected is not None and found != expected:
        raise ConfigError(
            f"target={name}: {origin} lists {found} classes, but {name} has {expected}; the data "
            f"under target.root is incomplete or another dataset's (set target.expected_classes "
            f"only for a deliberate subset)"
        )


def split_sizes(name: str, train: int, test: int, expected: Sequence[int] | None) -> None:
    if expected is not None and (train, test) != tuple(expected):
        raise ConfigError(
            f"target={name}: the split files give {train} training and {test} test images, "
            f"the official split has {expected[0]} and {expected[1]}; the data under target.root "
            "is incomplete"
        )


class ImageListTarget(Target):
    """A target whose splits are ImageLists held in `_splits` ({"train": ..., "test": ...})."""

    _splits: dict[str, ImageList]

    def train_set(self) -> ImageList:
        return self._splits["train"]

    def test_set(self) -> ImageList:
        return self._splits["test"]

    def train_labels(self) -> np.ndarray:
        return self._splits["train"].labels

    def train_files(self) -> list[str]:
        return [str(path) for path in self._splits["train"].paths]


class ListedTarget(ImageListTarget):
    """A dataset whose official split is given by list files beside its images.

    Subclasses set the dataset's `name`, `title`, `folder` (under target.root), the
    `required` files, the `archives` (url, "md5:<hex>" / "sha1:<hex>", or None where no
    digest is known), the official class count and split sizes, and implement `read_split`.
    """

    name = ""
    title = ""
    folder = ""
    official_classes: int | None = None
    official_split: tuple[int, int] | None = None
    required: tuple[str, ...] = ()
    archives: tuple[tuple[str, str | None], ...] = ()
    layout = ""

    def __init__(
        self,
        root: str,
        name: str | None = None,
        download: bool = False,
        expected_classes=...,
        expected_split=...,
        **sampling,
    ):
        """`expected_classes` / `expected_split` default (`...`) to the official counts; None skips the check."""
        super().__init__(name or type(self).name, **sampling)
        self.root = Path(root).expanduser()
        self.download = download
        self.expected_classes = self.official_classes if expected_classes is ... else expected_classes
        split = self.official_split if expected_split is ... else expected_split
        self.expected_split = tuple(split) if split else None

    @property
    def base(self) -> Path:
        return self.root / self.folder

    #: the archives hold `folder` itself (CUB_200_2011.tgz holds CUB_200_2011/): extracted into the root
    archives_hold_folder = False

    @property
    def destination(self) -> Path:
        """Where the official files are downloaded and extracted."""
        return self.root if self.archives_hold_folder else self.base

    def _present(self) -> bool:
        return all((self.base / f).exists() for f in self.required)

    def _download(self) -> bool:
        return any([fetch_archive(url, self.destination, checksum) for url, checksum in self.archives])

    def check(self) -> None:
        if not self._present():
            if not self.download:
                sources = "; ".join(f"{url} ({checksum})" if checksum else url for url, checksum in self.archives)
                inside = f" (the archive holds {self.folder}/ itself)" if self.archives_hold_folder else ""
                raise ConfigError(
                    f"target.root={self.root}: {self.title} not found; expected "
                    f"{self.base}/{{{','.join(self.required)}}} "
                    f"and {self.base}/{self.layout}: download {sources} and extract into {self.destination}{inside}, "
                    "or set target.download=true"
                )
            self._download()
        check_class_count(self.name, len(self.classes), self.expected_classes, str(self.base))
        split_sizes(self.name, len(self._splits["train"]), len(self._splits["test"]), self.expected_split)

    def fetch(self) -> bool:
        downloaded = False if self._present() else self._download()
        self.check()
        return downloaded

    def read_split(self, split: str) -> tuple[list[Path], list[int]]:
        raise NotImplementedError

    @cached_property
    def _splits(self) -> dict[str, ImageList]:
        return {split: ImageList(*self.read_split(split)) for split in ("train", "test")}
