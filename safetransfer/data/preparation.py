"""Data preparation: a job's sampled training set, its validation hold-out and its test
set, read through the decoded-image cache where there is one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from safetransfer.common.atomic import atomic_write_json
from safetransfer.common.devices import resolve_device
from safetransfer.common.errors import ConfigError
from safetransfer.common.fingerprints import data_identity
from safetransfer.data.cache import cached_split
from safetransfer.data.datasets import TensorImages, Transformed
from safetransfer.data.resident import fits, held_bytes, to_device
from safetransfer.data.targets.base import Target
from safetransfer.data.transforms import (
    augment_transform,
    crop_options,
    test_transform,
    train_transform,
    views_transform,
)


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    train_indices: np.ndarray
    train_plain: Dataset  # the training images with the test-time transform (for DELTA's attention)
    val: Dataset | None = None
    val_indices: np.ndarray | None = None
    device_augment: bool = False  # train/test hold uint8 images; crop, mirror and normalise happen on the device
    views: int = 1  # augmented views of each training image (Bi-Tuning: 2, its query and key)
    resident: bool = False  # data.on_device: train/test are also held on the device, once per job (held_on)
    held: dict = field(default_factory=dict, repr=False)

    def held_on(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The uint8 training sample and test set, with their labels, on `device` (copied on first use)."""
        key = str(device)
        if key not in self.held:
            train, test = self.train, self.test  # Transformed(cached split, indices), the cached test split
            self.held = {
                key: {
                    "train": (
                        to_device(train.dataset.images, np.asarray(train.indices), device),
                        torch.as_tensor(train.dataset.labels[train.indices], dtype=torch.long, device=device),
                    ),
                    "test": (
                        to_device(test.images, np.arange(len(test)), device),
                        torch.as_tensor(test.labels, dtype=torch.long, device=device),
                    ),
                }
            }
        return self.held[key]

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Data:
        """Ready (already transformed) images held in memory as both splits: the benchmark
        scripts' fixed batches."""
        dataset = TensorImages(images.cpu(), labels.cpu())
        return cls(
            train=dataset,
            test=dataset,
            num_classes=num_classes,
            train_indices=np.arange(len(labels)),
            train_plain=dataset,
            val_indices=np.arange(0),
        )


def augment_on_device(cfg: DictConfig, cached: bool) -> bool:
    """data.augment_on: auto puts the random window, the mirror and the test views on the GPU
    when training there from the cache (targets.augment.DeviceAugment)."""
    choice = cfg.data.augment_on
    if choice == "auto":
        return cached and resolve_device(str(cfg.runtime.device)).type == "cuda"
    return choice == "device" and cached


def hold_on_device(cfg: DictConfig, cached: bool, device_augment: bool, nbytes: int) -> bool:
    """data.on_device: hold the decoded training sample and test set on the device, where they are
    augmented (`device_augment`, augment_on_device's choice). auto: when so, on CUDA, and they take
    at most resident.FREE_MEMORY_SHARE of its free memory (split among concurrent seeds)."""
    choice = cfg.data.on_device
    if choice is True:
        if not cached:
            raise ConfigError(
                "data.on_device=true holds the decoded-image cache on the device, and this target's images are "
                "not cached (data.cache=false, or images held in memory as the demo's): set data.cache=true, "
                "or data.on_device=auto"
            )
        if not device_augment:  # else the loader path's pixels would differ under one key
            raise ConfigError(
                "data.on_device=true augments on the device, and data.augment_on="
                f"{cfg.data.augment_on} augments in the loader workers here (auto augments on the device on CUDA "
                "only): set data.augment_on=device, or data.on_device=auto"
            )
        return True
    if choice is False or not device_augment:
        return False
    sharing = len(cfg.seeds) if cfg.runtime.concurrent_seeds else 1
    return fits(nbytes, resolve_device(str(cfg.runtime.device)), sharing)


def prepare_data(cfg: DictConfig, target: Target, seed: int | None = None) -> Data:
    """The sampled training set (minus the validation hold-out), validation and test sets;
    `seed` redraws the sample (target.resample_per_seed)."""
    indices, val_indices = target.split_train_val(seed)
    check_training_set(len(indices), cfg.train.batch_size)
    geometry = (cfg.data.resize, cfg.data.crop, cfg.data.mean, cfg.data.std)
    train_crop, test_crops, test_resize = crop_options(cfg.data)
    train_set, test_set = target.train_set(), target.test_set()
    cached = bool(cfg.data.cache) and not isinstance(train_set, TensorImages)  # in-memory images need no cache
    test_side = cfg.data.resize if test_crops != 1 else cfg.data.crop
    nbytes = held_bytes((len(indices), len(test_set)), (3, cfg.data.resize, cfg.data.resize), (3, test_side, test_side))
    on_device = augment_on_device(cfg, cached)
    resident = hold_on_device(cfg, cached, on_device, nbytes)
    views = training_views(cfg)
    if cached:
        train, test = cached_data(cfg, train_set, test_set, indices, on_device, views)
    else:
        train = Transformed(train_set, indices, train_transform(*geometry, train_crop, views))
        test = Transformed(test_set, range(len(test_set)), test_transform(*geometry, test_crops, test_resize))
    return Data(
        train=train,
        test=test,
        num_classes=len(target.classes),
        train_indices=indices,
        train_plain=Transformed(train_set, indices, test_transform(*geometry, test_resize=test_resize)),
        val=(
            Transformed(train_set, val_indices, test_transform(*geometry, test_crops, test_resize))
            if len(val_indices)
            else None
        ),
        val_indices=val_indices,
        device_augment=on_device,
        resident=resident,
        views=views,
    )


def training_views(cfg: DictConfig) -> int:
    """How many augmented views of each training image the regularizer's terms read (Term.views)."""
    from safetransfer.common.registry import lookup

    terms = (OmegaConf.select(cfg, "regularizer.terms") or {}).items()  # a data-only config has none
    return max([1, *(lookup("term", node.kind, f"regularizer.terms.{name}").views for name, node in terms)])


def cached_data(
    cfg: DictConfig,
    train_set: Dataset,
    test_set: Dataset,
    indices: np.ndarray,
    on_device: bool = False,
    views: int = 1,
) -> tuple[Dataset, Dataset]:
    """Training and test images read from the decoded-image cache: whole splits are cached
    once per dataset and size, so every sampling rate and seed shares them. With
    `on_device` the loader hands over uint8 images and DeviceAugment does the rest."""
    identity = data_identity(OmegaConf.to_container(cfg.target, resolve=True))
    common = dict(
        resize=cfg.data.resize,
        crop=cfg.data.crop,
        cache_dir=Path(cfg.paths.cache_dir).expanduser(),
        identity=identity,
        num_workers=cfg.runtime.num_workers,
    )
    train_crop, test_crops, test_resize = crop_options(cfg.data)
    train_all = cached_split(train_set, np.arange(len(train_set)), "train", **common)
    test_all = cached_split(
        test_set, np.arange(len(test_set)), "test", **common, test_crops=test_crops, test_resize=test_resize
    )
    if on_device:
        return Transformed(train_all, indices, nn.Identity()), test_all
    crop, mean, std = cfg.data.crop, cfg.data.mean, cfg.data.std
    return (
        Transformed(train_all, indices, augment_transform(crop, mean, std, train_crop, views)),
        Transformed(test_all, range(len(test_all)), views_transform(crop, mean, std, test_crops)),
    )


def save_indices(path: Path, cfg: DictConfig, data: Data) -> None:
    atomic_write_json(
        path,
        {
            "sampling_rate": cfg.target.sampling_rate,
            "sampling_seed": cfg.target.sampling_seed,
            "val_fraction": cfg.target.val_fraction,
            "indices": data.train_indices.tolist(),
            "val_indices": data.val_indices.tolist(),
        },
    )


def seed_data(cfg: DictConfig, target: Target, seed: int, run_dir: Path, data: Data | None) -> Data:
    """The job's data for `seed`, or its own draw (saved beside it) with target.resample_per_seed."""
    if not cfg.target.resample_per_seed and data is not None:
        return data
    data = prepare_data(cfg, target, seed if cfg.target.resample_per_seed else None)
    if cfg.target.resample_per_seed:
        save_indices(run_dir / f"seed_{seed}" / "sampled_train_indices.json", cfg, data)
    return data


def check_classes(target: str, count: int) -> None:
    """A classifier needs two classes: with one, every prediction is right whatever was learnt."""
    if count < 2:
        raise ConfigError(
            f"the target {target} has {count} class{'' if count == 1 else 'es'}; a classifier needs at least 2 "
            "(with one, top-1 is 100 % whatever it learns): give the dataset two or more classes"
        )


def check_training_set(size: int, batch_size: int) -> None:
    if size < batch_size:
        raise ConfigError(
            f"the sampled training set has {size} images, fewer than train.batch_size={batch_size}; "
            "lower train.batch_size or raise target.sampling_rate"
        )
