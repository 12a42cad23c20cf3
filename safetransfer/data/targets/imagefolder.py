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
from safetransfer.common.registry import register
from safetransfer.data.targets.base import Target

log = logging.getLogger(__name__)


def nested(a: str, b: str) -> bool:
    """Whether one of two real paths is the other or lies inside it."""
    common = os.path.commonpath([a, b])
    return common in (a, b)


LAYOUT = "<root>/train/<class>/<image> and <root>/test/<class>/<image>"


class LinkSafeImageFolder(ImageFolder):
    """torchvision's ImageFolder, whose walk follows every folder link: one back into the tree
    (`ln -s . train/ants/loop`) reads the same images again at each turn of the loop (40
    training images became 840). Here a folder link is not followed when it leads into the
    split's tree or to a folder holding it (the dataset's root: the test images would come
    in), nor to a folder this class folder's walk has read already, holds or is inside of (a
    loop out there); a class folder may still link to where its images lie. `skipped` lists
    the links not followed and the image files under each. Otherwise the images and their
    order are torchvision's."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        def valid(path: str) -> bool:
            return is_valid_file(path) if is_valid_file is not None else has_file_allowed_extension(path, extensions)

        top = os.path.realpath(directory)
        self.skipped: list[tuple[str, str, int]] = []
        instances = []
        for name in sorted(class_to_idx):
            found, walked, read = 0, [], set()  # read: the real paths of the folders walked
            for folder, folders, files in os.walk(os.path.join(directory, name), followlinks=True):
                walked.append((folder, files))
                read.add(os.path.realpath(folder))
                kept = []
                for sub in sorted(folders):
                    path = os.path.join(folder, sub)
                    real = os.path.realpath(path)
                    if os.path.islink(path) and any(nested(real, other) for other in (top, *read)):
                        files_there = sum(valid(f) for _, _, fs in os.walk(real) for f in fs)
                        self.skipped.append((path, real, files_there))
                        continue
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
                "%s: %d folder link%s not followed: %s lead%s back into the dataset or to a folder read already "
                "(%s); the %d image files under them are not read through them",
                directory,
                len(self.skipped),
                "" if len(self.skipped) == 1 else "s",
                "it" if len(self.skipped) == 1 else "they",
                "s" if len(self.skipped) == 1 else "",
                ", ".join(f"{link} -> {real}" for link, real, _ in self.skipped[:3]),
                sum(n for _, _, n in self.skipped),
            )
        return instances


@register("target", "imagefolder")
class ImageFolderTarget(Target):
    def __init__(self, root: str, name: str = "imagefolder", test_dir: str = "test", **sampling):
        """`test_dir`: the test split's folder under root (`val` in torchvision's hymenoptera layout)."""
        super().__init__(name, **sampling)
        self.root, self.test_dir = Path(root).expanduser(), str(test_dir)

    def check(self) -> None:
        for split in ("train", self.test_dir):
            if not (self.root / split).is_dir():
                other = [d for d in ("val", "valid", "validation", "test") if d != split and (self.root / d).is_dir()]
                hint = f"; its test images are in {other[0]}/? set target.test_dir={other[0]}" if other else ""
                raise MissingData(
                    f"target.root={self.root}: missing directory {self.root / split}; "
                    f"expected {LAYOUT} (set target.root=/path/to/your/dataset){hint}"
                )
        train_classes, test_classes = self._train.classes, self._split(self.test_dir).classes
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
        return self._split(self.test_dir)

    def train_labels(self) -> np.ndarray:
        return np.asarray(self._train.targets)
