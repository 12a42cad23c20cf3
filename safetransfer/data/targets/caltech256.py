"""Caltech-256 under the L2-SP protocol (the DTNH paper's Caltech 30 / Caltech 60): per
class, 30 or 60 random images for training and 20 other images for testing, the clutter
class (257.clutter) excluded, the draw fixed by `split_seed`. torchvision's Caltech256
class finds (and downloads) the files; images are converted to RGB (some are grayscale).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torchvision

from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import register
from safetransfer.data.targets.files import ImageList, ImageListTarget, check_class_count

URL = "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"
CLUTTER = "257.clutter"


@register("target", "caltech256")
class Caltech256(ImageListTarget):
    read_caches = ("_files", "_splits")  # fetch: torchvision's download from CaltechDATA, its md5 checked

    def __init__(
        self,
        root: str,
        name: str = "caltech256_30",
        train_per_class: int = 30,
        test_per_class: int = 20,
        split_seed: int = 0,
        download: bool = False,
        expected_classes: int | None = 256,
        **sampling,
    ):
        super().__init__(name, **sampling)
        self.root, self.download = Path(root).expanduser(), download
        self.train_per_class, self.test_per_class = train_per_class, test_per_class
        self.split_seed, self.expected_classes = split_seed, expected_classes

    @cached_property
    def _files(self):
        try:
            return torchvision.datasets.Caltech256(str(self.root), download=self.download)
        except (RuntimeError, ValueError, OSError) as error:
            raise ConfigError(
                f"target.root={self.root}: Caltech-256 not found ({error}); expected "
                f"{self.root}/caltech256/256_ObjectCategories/<NNN.name>/<NNN_XXXX>.jpg; from {URL}"
                + ("" if self.download else ", or set target.download=true")
            ) from None

    @cached_property
    def _splits(self) -> dict[str, ImageList]:
        files = self._files
        folder = Path(files.root) / "256_ObjectCategories"
        labels, numbers = np.asarray(files.y), np.asarray(files.index)
        rng = np.random.default_rng(self.split_seed)
        chosen = {"train": ([], []), "test": ([], [])}
        for label, category in enumerate(self.classes):
            original = files.categories.index(category)
            members = np.flatnonzero(labels == original)
            needed = self.train_per_class + self.test_per_class
            if len(members) < needed:
                raise ConfigError(
                    f"target={self.name}: class {category} has {len(members)} images, fewer than "
                    f"{self.train_per_class} + {self.test_per_class}; the data is incomplete"
                )
            order = rng.permutation(members)
            for split, picked in (
                ("train", order[: self.train_per_class]),
                ("test", order[self.train_per_class : needed]),
            ):
                for i in sorted(picked):
                    chosen[split][0].append(folder / category / f"{original + 1:03d}_{numbers[i]:04d}.jpg")
                    chosen[split][1].append(label)
        return {split: ImageList(paths, split_labels) for split, (paths, split_labels) in chosen.items()}

    @property
    def classes(self) -> list[str]:
        return [c for c in self._files.categories if c != CLUTTER]

    def check(self) -> None:
        check_class_count(self.name, len(self.classes), self.expected_classes, str(self.root / "caltech256"))
        self._splits  # noqa: B018 (draws the split now, so that a short class fails before training)
