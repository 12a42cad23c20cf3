"""A decoded-image cache: each image is decoded and resized once, stored as uint8 in a
memory-mapped .npy file, and read from there by every later seed and run.

Training images are stored resized to resize x resize (the random crop and mirror are
applied afterwards, on tensors); test images are stored after their deterministic
resize and centre crop. The file's name is a hash of the dataset's config, the split,
the indices and the sizes, so any change of these makes a new file; it is written to a
temporary name and renamed, under a lock, so a crash never leaves a file a later run
would trust.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from safetransfer.common.atomic import built_once, remove_stale_temporaries
from safetransfer.common.errors import StorageError
from safetransfer.common.fingerprints import fingerprint
from safetransfer.common.signals import check_stop
from safetransfer.data.images import read_item
from safetransfer.data.transforms import decode_transform

log = logging.getLogger(__name__)


def cache_key(identity: dict, split: str, indices: np.ndarray, geometry: dict) -> str:
    return fingerprint(
        {"identity": identity, "split": split, "geometry": geometry}, 24, np.asarray(indices, dtype=np.int64).tobytes()
    )


class _Decoded(Dataset):
    def __init__(self, dataset: Dataset, indices, transform):
        self.dataset, self.indices, self.transform = dataset, list(map(int, indices)), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = read_item(self.dataset, self.indices[i])
        return self.transform(image).as_subclass(torch.Tensor), label


class CachedImages(Dataset):
    """uint8 images (3, H, W) and labels read from the memory-mapped cache."""

    def __init__(self, images_path: Path, labels: np.ndarray):
        self.images = np.load(images_path, mmap_mode="r")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])  # a copy: the map is read-only


def cached_split(
    dataset: Dataset,
    indices: np.ndarray,
    split: str,
    resize: int,
    crop: int,
    cache_dir: Path,
    identity: dict,
    num_workers: int = 0,
    test_crops: int = 1,
    test_resize: str = "square",
) -> CachedImages:
    """The images `indices` of `dataset`, decoded once into the cache (built on first use)."""
    geometry = {"resize": resize, "crop": crop}
    if split != "train" and test_crops != 1:
        geometry["test_crops"] = test_crops
    if split != "train" and test_crops == 1 and test_resize != "shorter_side":  # the earlier files' transform
        geometry["test_resize"] = test_resize
    key = cache_key(identity, split, indices, geometry)
    folder = Path(cache_dir) / "decoded"
    images_path, labels_path = folder / f"{key}.images.npy", folder / f"{key}.labels.npy"

    def read(_: Path) -> CachedImages:
        """The cached split; a truncated file, not a .npy or the wrong length raises."""
        cached = CachedImages(images_path, np.load(labels_path))
        if len(cached.images) != len(indices) or len(cached.labels) != len(indices):
            raise ValueError(f"{len(cached.images)} images and {len(cached.labels)} labels, expected {len(indices)}")
        return cached

    def write(_: None, __: Path) -> None:  # decoded straight into a memory-mapped file, batch by batch
        remove_stale_temporaries(labels_path)  # built_once removed the images' (both under its lock)
        build(
            dataset,
            indices,
            decode_transform(split, resize, crop, test_crops, test_resize),
            images_path,
            labels_path,
            num_workers,
        )

    return built_once(images_path, lambda: None, "the decoded split", read, write)


#: bytes kept free beyond what the cache's files take (the logs, checkpoints and results written beside them)
HEADROOM = 64 * 2**20


def reserve(path: Path, nbytes: int) -> None:
    """Refuse, in one line, to start a file of `nbytes` where the disk has not that much free."""
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + HEADROOM:
        raise StorageError(
            f"the decoded-image cache needs {nbytes / 2**20:.1f} MiB in {path.parent} and {free / 2**20:.1f} MiB "
            "are free: free space there, point paths.cache_dir at a disk with room, or set data.cache=false",
            "No space left on device",
        )


def claim(path: Path) -> None:
    """Allocate the memory-mapped file's blocks now: a write into a mapped page the disk has no room
    for is not an error but a SIGBUS that kills the job ("Bus error") with nothing said."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a filesystem without it: written as mapped
            return
        raise StorageError(
            f"the decoded-image cache could not allocate {path} ({error.strerror}): free space in {path.parent}, "
            "point paths.cache_dir at a disk with room, or set data.cache=false",
            error.strerror,
        ) from None


def build(dataset: Dataset, indices, transform, images_path: Path, labels_path: Path, num_workers: int) -> None:
    start = time.perf_counter()
    loader = DataLoader(_Decoded(dataset, indices, transform), batch_size=64, num_workers=num_workers)
    images_tmp = images_path.with_name(images_path.name + f".{os.getpid()}.tmp")
    labels = np.empty(len(indices), dtype=np.int64)
    array = None
    try:
        position = 0
        for batch, batch_labels in loader:
            check_stop(f"decoding the image cache into {images_path.parent}")
            if array is None:
                shape = (len(indices), *batch.shape[1:])
                reserve(images_tmp, int(np.prod(shape)) + len(indices) * 8)
                array = np.lib.format.open_memmap(images_tmp, mode="w+", dtype=np.uint8, shape=shape)
                claim(images_tmp)
            array[position : position + len(batch)] = batch.numpy()
            labels[position : position + len(batch)] = batch_labels.numpy()
            position += len(batch)
        array.flush()
        del array
        with open(labels_path.with_name(labels_path.name + ".tmp"), "wb") as handle:
            np.save(handle, labels)
        os.replace(images_tmp, images_path)
        os.replace(labels_path.with_name(labels_path.name + ".tmp"), labels_path)
    except BaseException as error:
        images_tmp.unlink(missing_ok=True)
        labels_path.with_name(labels_path.name + ".tmp").unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:  # a full disk while writing the labels
            raise StorageError(
                f"writing the decoded-image cache in {images_path.parent} failed ({error.strerror}): free space "
                "there, point paths.cache_dir at a disk with room, or set data.cache=false",
                error.strerror,
            ) from None
        raise
    log.info("decoded %d images once into %s (%.1f s)", len(indices), images_path, time.perf_counter() - start)
