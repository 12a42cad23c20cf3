"""Checks of a composed config, run before any training: each failure is one line."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from safetransfer.common.atomic import check_writable
from safetransfer.common.downloads import check_mirror
from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import build
from safetransfer.data.augment import AUGMENT_ON
from safetransfer.data.resident import ON_DEVICE
from safetransfer.data.transforms import TEST_CROPS, TEST_RESIZES, TRAIN_CROPS, crop_options
from safetransfer.reporting import store
from safetransfer.reporting.store import check_table_name
from safetransfer.reporting.tables import published_values
from safetransfer.training.engine import PRECISIONS, milestone_iterations
from safetransfer.training.train_log import LOGGERS, PROGRESS

ON_DEVICE_TEXT = tuple(str(choice).lower() for choice in ON_DEVICE)
#: seeds (training and sampling) are seeds of NumPy's and Python's generators: in [0, 2^32)
SEED_LIMIT = 2**32


def check_config(cfg: DictConfig) -> None:
    """The one pass over a composed config: ranges and rules across keys (the types are the schema's,
    safetransfer/job/schema.py; a group node's own keys are checked by the class it builds)."""
    seeds = cfg.seeds
    if len(seeds) == 0:
        raise ConfigError(f"seeds={list(seeds)} must be a non-empty list of integers, e.g. seeds=[0,1,2,3,4]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={list(seeds)} repeats a seed; give each seed once")
    if not all(0 <= s < SEED_LIMIT for s in seeds):  # NumPy's and Python's seeding refuse the others
        raise ConfigError(f"seeds={list(seeds)} must hold integers in [0, 2^32), e.g. seeds=[0,1,2,3,4]")
    sampling_seed = cfg.target.get("sampling_seed", 0)
    if not isinstance(sampling_seed, int) or isinstance(sampling_seed, bool) or not 0 <= sampling_seed < SEED_LIMIT:
        raise ConfigError(f"target.sampling_seed={sampling_seed} must be an integer in [0, 2^32), e.g. 0")

    for key in cfg.source.keys():  # `key in cfg` would skip missing values
        if OmegaConf.is_missing(cfg.source, key):
            example = "/path/to/checkpoint.pth" if key == "path" else "<value>"
            raise ConfigError(f"source={cfg.source.name} needs source.{key}: set source.{key}={example}")

    rate = cfg.target.sampling_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 100:
        raise ConfigError(
            f"target.sampling_rate={rate} is outside (0, 100]; give a percentage such as 15, 30, 50 or 100"
        )

    fraction = cfg.target.val_fraction
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise ConfigError(
            f"target.val_fraction={fraction} is outside [0, 1); e.g. target.val_fraction=0.2 holds out "
            "20 % of each class's sampled training images"
        )

    for key, example in (
        ("train.batch_size", 48),
        ("train.iterations", 8000),
        ("data.crop", 224),
        ("data.resize", 256),
    ):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be an integer >= 1 (e.g. {key}={example})")
    if cfg.train.batch_size < 2:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is too small: BatchNorm needs two or more images a batch "
            "in training; e.g. train.batch_size=48"
        )
    if cfg.data.crop > cfg.data.resize:
        raise ConfigError(
            f"data.crop={cfg.data.crop} is larger than data.resize={cfg.data.resize}; "
            "the crop is taken from the resized image, so set data.crop <= data.resize"
        )
    train_crop, test_crops, test_resize = crop_options(cfg.data)
    on_device = cfg.data.get("on_device", "auto")
    for key, value, allowed in (
        ("data.test_resize", test_resize, TEST_RESIZES),
        ("data.train_crop", train_crop, TRAIN_CROPS),
        ("data.test_crops", test_crops, TEST_CROPS),
        ("data.augment_on", cfg.data.augment_on, AUGMENT_ON),
        ("data.on_device", str(on_device).lower() if isinstance(on_device, bool) else on_device, ON_DEVICE_TEXT),
        ("train.precision", cfg.train.precision, PRECISIONS),
        ("logger", cfg.logger, LOGGERS),
        ("runtime.progress", cfg.runtime.progress, PROGRESS),  # the loop's own check would come only in training
    ):
        if value not in allowed:
            raise ConfigError(f"{key}={value} is not a known choice; allowed: {', '.join(map(str, allowed))}")
    for key, meaning in (
        ("log_every", "0 logs only the last iteration"),
        ("checkpoint_every", "iterations between checkpoints; 0: none"),
        ("num_workers", "0 loads in the main process"),
    ):
        if cfg.runtime[key] < 0:
            raise ConfigError(f"runtime.{key}={cfg.runtime[key]} must be >= 0 ({meaning})")
    for key, what in (("diagnostics_every", "angles are"), ("eval_every", "the evaluation is")):
        every, log_every = cfg.runtime[key], cfg.runtime.log_every
        if every < 0 or (every and (not log_every or every % log_every)):
            raise ConfigError(
                f"runtime.{key}={every} must be 0 or a multiple of runtime.log_every={log_every} "
                f"({what} written on log rows)"
            )
    if not cfg.paths.download_timeout_s > 0 or cfg.paths.download_retries < 0:
        raise ConfigError(
            f"paths.download_timeout_s={cfg.paths.download_timeout_s} must be > 0 and paths.download_retries="
            f"{cfg.paths.download_retries} >= 0 (e.g. 30 and 3)"
        )
    check_mirror(cfg.paths.mirror)
    if cfg.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logger=tensorboard needs the tensorboard package: pip install tensorboard (or use logger=csv)"
        )
    check_regularizer(cfg)
    build("direction", cfg.direction, "direction")
    build("normalization", cfg.normalization, "normalization")
    check_on_device(cfg.data)
    check_optimizer(cfg.optim)
    milestones = list(cfg.optim.scheduler.get("milestones", []))  # a scheduler without milestones has none
    if any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in milestones):
        raise ConfigError(
            f"optim.scheduler.milestones={milestones} must hold fractions of the run in (0, 1), e.g. "
            "[0.75], or iterations, e.g. [6000]"
        )
    if any(m > cfg.train.iterations for m in milestone_iterations(milestones, cfg.train.iterations)):
        raise ConfigError(
            f"optim.scheduler.milestones={milestones} lie beyond train.iterations="
            f"{cfg.train.iterations}; the lr is divided at these iterations: give fractions of the run "
            f"(optim.scheduler.milestones=[0.75]) or iterations up to {cfg.train.iterations}"
        )
    check_device(str(cfg.runtime.device))
    check_table_name(str(cfg.results.table), "results.table")
    store.read(Path(cfg.results.dir), str(cfg.results.table))  # a store that cannot be read: before training
    if cfg.results.published:
        published_values(str(cfg.results.published))
    check_writable(Path(cfg.results.dir), "results.dir")
    check_writable(Path(str(cfg.paths.cache_dir)).expanduser(), "paths.cache_dir", ".cache/safetransfer")


def check_regularizer(cfg: DictConfig) -> None:
    """Each term of Omega built from its config (the term checks its own coefficients and settings),
    then checked against an outline of the backbone and the batch size (the modules a feature-space
    term reads, BSS's k below both sizes of the batch x features matrix)."""
    from safetransfer.training.backbones import check_backbone_name, outline

    try:
        check_backbone_name(cfg.backbone.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not cfg.regularizer.terms:
        raise ConfigError("regularizer.terms is empty; choose a regularizer, e.g. regularizer=l2")
    model = outline(cfg.backbone.name)
    fixed = getattr(model.backbone, "image_size", None)  # a vision transformer's position embeddings
    if isinstance(fixed, int) and cfg.data.crop != fixed:
        raise ConfigError(
            f"backbone.name={cfg.backbone.name} takes {fixed} x {fixed} images only, not data.crop={cfg.data.crop}: "
            f"set data.crop={fixed} (and data.resize >= {fixed})"
        )
    for name, node in cfg.regularizer.terms.items():
        term = build("term", node, f"regularizer.terms.{name}")
        try:
            term.check_backbone(model, cfg.train.batch_size)
        except ValueError as error:
            raise ConfigError(f"regularizer.terms.{name}.{error}") from None


def check_optimizer(optim: DictConfig) -> None:
    """The SGD settings: lr and head_lr_mult finite and > 0, momentum and weight_decay finite in range."""
    ranges = {
        "optimizer.lr": (0, math.inf, "> 0", "e.g. optim.optimizer.lr=0.01"),
        "head_lr_mult": (0, math.inf, "> 0", "e.g. optim.head_lr_mult=10"),
        "optimizer.momentum": (0, 1, "in [0, 1)", "e.g. optim.optimizer.momentum=0.9"),
        "optimizer.weight_decay": (0, math.inf, ">= 0", "e.g. optim.optimizer.weight_decay=0"),
    }
    for key, (low, high, allowed, example) in ranges.items():
        value = OmegaConf.select(optim, key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        inside = number and (low < value < high if allowed == "> 0" else low <= value < high)
        if not inside:
            raise ConfigError(f"optim.{key}={value} must be a finite number {allowed} ({example})")


def check_on_device(data: DictConfig) -> None:
    """data.on_device=true needs the decoded cache and the augmentation on the device."""
    choice = data.get("on_device", "auto")
    if choice is True and data.augment_on == "workers":
        raise ConfigError(
            "data.on_device=true gathers batches on the device, where they are augmented: it cannot take "
            "data.augment_on=workers; set data.augment_on=device (auto augments on the device on CUDA only), "
            "or data.on_device=auto"
        )
    if choice is True and not data.cache:
        raise ConfigError("data.on_device=true holds the decoded-image cache on the device: set data.cache=true")


def check_device(spec: str) -> None:
    if spec in ("auto", "cpu"):
        return
    if spec == "cuda" or spec.startswith("cuda:") or spec == "lease":
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={spec} but CUDA is not available here; use runtime.device=auto or cpu")
        index = int(spec.split(":")[1]) if spec.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return
    raise ConfigError(
        f"runtime.device={spec} is not one of auto, cpu, cuda, cuda:N, lease (a GPU no other job on this machine holds)"
    )
