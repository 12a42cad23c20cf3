"""Target datasets, their per-class sampling and the image transforms.

A target is one small module with a `Target` subclass plus one YAML in conf/target/.
It gives its official train and test splits as datasets of (image, label) pairs, the
image a PIL image or a uint8 (3, H, W) tensor; sampling and transforms are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from safetransfer.errors import ConfigError
from safetransfer.fingerprints import SAMPLING_KEYS
from safetransfer.targets.cache import decode_transform
from safetransfer.targets.images import read_item

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Target:
    """A target dataset with its official split and a sampling rate in percent."""

    def __init__(
        self,
        name: str,
        sampling_rate: float = 100,
        sampling_seed: int = 0,
        val_fraction: float = 0.0,
        resample_per_seed: bool = False,
        sample_list: str | None = None,
        sample_list_dir: str | None = None,
    ):
        self.name = name
        self.sampling_rate = sampling_rate
        self.sampling_seed = sampling_seed
        self.val_fraction = val_fraction
        self.resample_per_seed = resample_per_seed
        self.sample_list = sample_list  # None | "bss" | a path (see targets/sample_lists.py)
        self.sample_list_dir = sample_list_dir

    #: whether the target reads files at all (the demo's are generated: nothing to fetch)
    reads_files = True

    def check(self) -> None:
        """Raise ConfigError when the data is missing or inconsistent, before training."""

    #: the cached properties holding what was read from disk (dropped before a download), for a
    #: target whose `download` flag makes its dataset class download the files
    read_caches: tuple[str, ...] = ()

    def fetch(self) -> bool:
        """Make sure the data is present and complete, downloading (and verifying) what is missing
        where the target can; returns whether anything was downloaded. Raises MissingData for data
        that cannot be downloaded, DownloadError or ConfigError for the rest."""
        try:
            self.check()
            return False
        except ConfigError:
            if not self.read_caches or getattr(self, "download", True):
                raise
        self.download = True  # the dataset class's own download, its checksums checked
        for cached in self.read_caches:
            self.__dict__.pop(cached, None)
        self.check()
        return True

    @property
    def classes(self) -> Sequence[str]:
        raise NotImplementedError

    def train_set(self) -> Dataset:
        raise NotImplementedError

    def test_set(self) -> Dataset:
        raise NotImplementedError

    def train_labels(self) -> np.ndarray:
        """The label of every training image, in dataset order (for stratified sampling)."""
        raise NotImplementedError

    def train_files(self) -> Sequence[str]:
        """The file of every training image, in dataset order (to match a sample list)."""
        raise ConfigError(f"target={self.name} has no image files to match a list against; set target.sample_list=null")

    def listed_train_indices(self) -> np.ndarray:
        """The training images named by target.sample_list."""
        from safetransfer.targets import sample_lists

        if self.sample_list == "bss":
            path = sample_lists.bss_list(self.name, self.sampling_rate, Path(self.sample_list_dir or "."))
        else:
            path = Path(str(self.sample_list)).expanduser()
        return sample_lists.listed_indices(
            sample_lists.read_list(path), self.train_files(), self.train_labels(), f"target.sample_list={path}"
        )

    def sampled_train_indices(self, seed: int | None = None) -> np.ndarray:
        """The sampled training images (before any validation hold-out), drawn with
        `sampling_seed`, or with `seed` when given (target.resample_per_seed); the images of
        target.sample_list when one is given."""
        if self.sample_list:
            return self.listed_train_indices()
        return stratified_sample(self.train_labels(), self.sampling_rate, self.sampling_seed if seed is None else seed)

    def split_train_val(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices: `val_fraction` of each class of the sampled set held out."""
        sampled = self.sampled_train_indices(seed)
        if not self.val_fraction:
            return sampled, np.array([], dtype=np.int64)
        return hold_out(
            sampled,
            self.train_labels()[sampled],
            self.val_fraction,
            (self.sampling_seed if seed is None else seed) + 1_000_003,
        )


def per_class_count(available: int, rate: float) -> int:
    """Images kept from a class of `available` images at `rate` percent.

    Rounded half up, and never below one image per class.
    """
    return min(available, max(1, int(np.floor(available * rate / 100 + 0.5))))


def stratified_sample(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of `rate` percent of each class's images, the draw fixed by `seed`."""
    labels = np.asarray(labels)
    if rate >= 100:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=per_class_count(len(members), rate), replace=False))
    return np.sort(np.concatenate(chosen))


def hold_out(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` per class: round-half-up(fraction x n_c) go to validation, but at least
    one image of each class stays for training (none is held out of a one-image class)."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = indices[labels == label]
        count = min(len(members) - 1, int(np.floor(len(members) * fraction + 0.5)))
        chosen = rng.permutation(len(members))
        held.append(members[chosen[:count]])
        kept.append(members[chosen[count:]])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held)).astype(np.int64)


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


TRAIN_CROPS = ("random_crop", "random_resized_crop")
TEST_CROPS = (1, 10)


def crop_options(data) -> tuple[str, int]:
    """(data.train_crop, data.test_crops), their defaults where a config has neither."""
    return data.get("train_crop", TRAIN_CROPS[0]), data.get("test_crops", TEST_CROPS[0])


def train_transform(
    resize: int, crop: int, mean: Sequence[float], std: Sequence[float], train_crop: str = "random_crop"
) -> v2.Compose:
    """Resize to resize x resize, random crop (or random resized crop), random mirror, normalise."""
    return v2.Compose([decode_transform("train", resize, crop), augment_transform(crop, mean, std, train_crop)])


def test_transform(
    resize: int, crop: int, mean: Sequence[float], std: Sequence[float], test_crops: int = 1
) -> v2.Compose:
    """1 crop: shorter side to resize, centre crop, normalise. 10 crops: resize x resize, the
    four corners and the centre, each also mirrored, stacked as (10, 3, crop, crop)."""
    return v2.Compose(
        [decode_transform("test", resize, crop, test_crops), views_transform(crop, mean, std, test_crops)]
    )


def augment_transform(
    crop: int, mean: Sequence[float], std: Sequence[float], train_crop: str = "random_crop"
) -> v2.Compose:
    """The random part of the training transform, on uint8 images already resized to a square.
    random_crop: a crop x crop window (the DTNH protocol); random_resized_crop: torchvision's
    RandomResizedCrop(crop), scale (0.08, 1) and aspect ratio (3/4, 4/3) of that square, as the
    BSS authors' released code (ResizeImage(256) then RandomResizedCrop(224))."""
    window = v2.RandomResizedCrop(crop, antialias=True) if train_crop == "random_resized_crop" else v2.RandomCrop(crop)
    return v2.Compose([window, v2.RandomHorizontalFlip(), normalize_transform(mean, std)])


def views_transform(crop: int, mean: Sequence[float], std: Sequence[float], test_crops: int = 1):
    """The test-time views of an image already resized (and centre-cropped for one view)."""
    if test_crops == 1:
        return normalize_transform(mean, std)
    return v2.Compose([v2.TenCrop(crop), stack_views, normalize_transform(mean, std)])


def stack_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """TenCrop's tuple of views as one (views, 3, H, W) tensor."""
    return torch.stack([v.as_subclass(torch.Tensor) for v in views])


def normalize_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAMPLING_KEYS",
    "ConfigError",
    "Target",
    "hold_out",
    "TensorImages",
    "Transformed",
    "per_class_count",
    "stratified_sample",
    "test_transform",
    "train_transform",
    "augment_transform",
    "normalize_transform",
    "views_transform",
    "TRAIN_CROPS",
    "TEST_CROPS",
    "crop_options",
]
