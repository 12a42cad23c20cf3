"""Bring your own data: root/train/<class>/<image> and root/test/<class>/<image>."""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path

import numpy as np
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from safetransfer.common.errors import ConfigError, MissingData
from safetransfer.data.targets.base import Target

log = logging.getLogger(__name__)

LAYOUT = "<root>/train/<class>/<image> and <root>/test/<class>/<image>"


class LinkSafeImageFolder(ImageFolder):
    """torchvision's ImageFolder, whose walk follows every folder link: one back into the tree
    (`ln -s . train/ants/loop`) reads the same images again at each turn of the loop (40
    training images became 840). Here a link to a folder inside the split's tree is not
    followed (its images are read where they lie), and a link to one outside it is followed
    once per class folder (a class folder may link to where its images lie; a loop out there
    is cut at its second turn); `skipped` lists the links not followed and the image files under
    each. Otherwise the images and their order are torchvision's."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        def valid(path: str) -> bool:
            return is_valid_file(path) if is_valid_file is not None else has_file_allowed_extension(path, extensions)

        top = os.path.realpath(directory)
        self.skipped: list[tuple[str, str, int]] = []
        instances = []
        for name in sorted(class_to_idx):
            found, walked, followed = 0, [], set()
            for folder, folders, files in os.walk(os.path.join(directory, name), followlinks=True):
                walked.append((folder, files))
                kept = []
                for sub in sorted(folders):
                    path = os.path.join(folder, sub)
                    real = os.path.realpath(path)
                    inside = os.path.commonpath([top, real]) == top
                    if os.path.islink(path) and (inside or real in followed):
                        files_there = sum(valid(f) for _, _, fs in os.walk(real) for f in fs)
                        self.skipped.append((path, real, files_there))
                        continue
                    followed.add(real)
                    kept.append(sub)
                folders[:] = kept
            for folder, files in sorted(walked):  # torchvision's order: the folders' paths sorted, then the names
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if valid(path):
                        instances.append((path, class_to_idx[name]))
                        found += 1
            if not found and not allow_empty:
                raise FileNotFoundError(f"found no valid image file for the class folder {name} in {directory}")
        if self.skipped:
            log.warning(
                "%s: %d folder link%s not followed, back into the tree or followed already (%s); the %d image "
                "files there are read once, where they lie",
                directory,
                len(self.skipped),
                "" if len(self.skipped) == 1 else "s",
                ", ".join(f"{link} -> {real}" for link, real, _ in self.skipped[:3]),
                sum(n for _, _, n in self.skipped),
            )
        return instances


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

    def _split(self, split: str) -> LinkSafeImageFolder:
        try:
            return LinkSafeImageFolder(str(self.root / split))
        except FileNotFoundError as error:
            raise ConfigError(f"target.root={self.root}: {error}; expected {LAYOUT}") from None

    @cached_property
    def _train(self) -> LinkSafeImageFolder:
        return self._split("train")

    @property
    def classes(self):
        return self._train.classes

    def train_set(self) -> LinkSafeImageFolder:
        return self._train

    def test_set(self) -> LinkSafeImageFolder:
        return self._split("test")

    def train_labels(self) -> np.ndarray:
        return np.asarray(self._train.targets)
