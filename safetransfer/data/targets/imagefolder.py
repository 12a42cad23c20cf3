"""Bring your own data: root/train/<class>/<image> and root/test/<class>/<image>."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from torchvision.datasets import ImageFolder

from safetransfer.common.errors import ConfigError, MissingData
from safetransfer.data.targets.base import Target

LAYOUT = "<root>/train/<class>/<image> and <root>/test/<class>/<image>"


class ImageFolderTarget(Target):
    def __init__(self, root: str, name: str = "imagefolder", **sampling):
        super().__init__(name, **sampling)
        self.root = Path(root).expanduser()

    def check(self) -> None:
        for split in ("train", "test"):
            if not (self.root / split).is_dir():
                raise MissingData(
                    f"target.root={self.root}: missing directory {self.root / split}; "
                    f"expected {LAYOUT} (set target.root=/path/to/your/dataset)"
                )
        train_classes, test_classes = self._train.classes, self._split("test").classes
        if train_classes != test_classes:
            raise ConfigError(
                f"target.root={self.root}: train/ and test/ hold different classes "
                f"(only in train: {sorted(set(train_classes) - set(test_classes))}, "
                f"only in test: {sorted(set(test_classes) - set(train_classes))}); give both the same class folders"
            )

    def _split(self, split: str) -> ImageFolder:
        try:
            return ImageFolder(str(self.root / split))
        except FileNotFoundError as error:
            raise ConfigError(f"target.root={self.root}: {error}; expected {LAYOUT}") from None

    @cached_property
    def _train(self) -> ImageFolder:
        return self._split("train")

    @property
    def classes(self):
        return self._train.classes

    def train_set(self) -> ImageFolder:
        return self._train

    def test_set(self) -> ImageFolder:
        return self._split("test")

    def train_labels(self) -> np.ndarray:
        return np.asarray(self._train.targets)
