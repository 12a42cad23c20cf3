"""Targets read by torchvision's own dataset classes (their download and checksum code
included): CIFAR-10, Flowers-102, Oxford-IIIT Pet, FGVC-Aircraft. (Stanford Cars, whose
downloads are gone, has a module of its own: targets/stanford_cars.py.)

Each YAML names the torchvision class and the split arguments of its official train
and test splits; the expected class count and split sizes are checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torchvision

from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import register
from safetransfer.data.targets.base import Target
from safetransfer.data.targets.files import check_class_count, split_sizes

#: where each dataset comes from and how torchvision expects it under target.root
ORIGINS = {
    "CIFAR10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-batches-py/{data_batch_1,...,data_batch_5,test_batch,batches.meta}",
    ),
    "Flowers102": (
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat, setid.mat)",
        "flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}",
    ),
    "OxfordIIITPet": (
        "https://www.robots.ox.ac.uk/~vgg/data/pets/data/ (images.tar.gz, annotations.tar.gz)",
        "oxford-iiit-pet/{images/<name>.jpg,annotations/trainval.txt,annotations/test.txt}",
    ),
    "FGVCAircraft": (
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
        "fgvc-aircraft-2013b/data/{images/<id>.jpg,variants.txt,images_variant_trainval.txt,images_variant_test.txt}",
    ),
}


def dataset_labels(dataset) -> np.ndarray:
    """The labels torchvision's classes keep, without decoding any image."""
    for attribute in ("targets", "_labels"):
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    return np.asarray([label for _, label in dataset._samples], dtype=np.int64)


def dataset_files(dataset, name: str) -> list[str]:
    """The image files torchvision's classes keep, in dataset order."""
    for attribute in ("_image_files", "_images"):
        if hasattr(dataset, attribute):
            return [str(path) for path in getattr(dataset, attribute)]
    if hasattr(dataset, "_samples"):
        return [str(path) for path, _ in dataset._samples]
    raise ConfigError(f"target={name} keeps no image files to match a list against; set target.sample_list=null")


@register("target", "torchvision")
class TorchvisionTarget(Target):
    read_caches = ("_splits",)  # fetch: torchvision's own download, its md5s checked

    def __init__(
        self,
        name: str,
        dataset: str,
        root: str,
        train: Mapping,
        test: Mapping,
        download: bool = False,
        expected_classes: int | None = None,
        expected_split: Sequence[int] | None = None,
        **sampling,
    ):
        super().__init__(name, **sampling)
        if dataset not in ORIGINS:
            raise ValueError(f"dataset={dataset!r}; known: {', '.join(ORIGINS)}")
        self.dataset, self.root, self.download = dataset, Path(root).expanduser(), download
        self.split_arguments = {"train": dict(train), "test": dict(test)}
        self.expected_classes = expected_classes
        self.expected_split = tuple(expected_split) if expected_split else None

    def _open(self, split: str):
        cls = getattr(torchvision.datasets, self.dataset)
        try:
            return cls(str(self.root), download=self.download, **self.split_arguments[split])
        except (RuntimeError, ValueError, OSError) as error:  # missing files, a failed or refused download
            url, layout = ORIGINS[self.dataset]
            raise ConfigError(
                f"target.root={self.root}: {self.name} not found or incomplete ({error}); expected "
                f"{self.root}/{layout}; from {url}" + ("" if self.download else ", or set target.download=true")
            ) from None

    @cached_property
    def _splits(self) -> dict:
        return {split: self._open(split) for split in ("train", "test")}

    def check(self) -> None:
        train, test = self._splits["train"], self._splits["test"]
        check_class_count(self.name, len(self.classes), self.expected_classes, str(self.root))
        found = len(np.unique(np.concatenate([dataset_labels(train), dataset_labels(test)])))
        if found != len(self.classes):
            raise ConfigError(
                f"target={self.name}: the split files use {found} labels but name {len(self.classes)} "
                f"classes; the data under target.root={self.root} is incomplete"
            )
        split_sizes(self.name, len(train), len(test), self.expected_split)

    @property
    def classes(self) -> list[str]:
        return list(self._splits["train"].classes)

    def train_set(self):
        return self._splits["train"]

    def test_set(self):
        return self._splits["test"]

    def train_labels(self) -> np.ndarray:
        return dataset_labels(self._splits["train"])

    def train_files(self) -> list[str]:
        return dataset_files(self._splits["train"], self.name)
