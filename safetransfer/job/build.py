"""Building one seed's pieces from a config (timm-style factories), in the order they
depend on each other: the seed's RNGs, the network on its device (cuDNN autotuning and
the channels-last layout on CUDA), Omega bound to it (frozen source copies follow the
layout), torch.compile after the bind (the frozen copies stay eager), the optimizer and
its schedule, the loaders and the on-device augmentation. run_seed and the benchmark
scripts build through `build_seed`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from safetransfer.common.devices import resolve_device
from safetransfer.common.fingerprints import term_identity
from safetransfer.common.registry import build
from safetransfer.data.augment import DeviceAugment
from safetransfer.data.draws import Seeded, SeededDraws
from safetransfer.data.preparation import Data
from safetransfer.data.resident import ResidentLoader
from safetransfer.data.transforms import crop_options
from safetransfer.sources.base import SourceWeights
from safetransfer.training.backbones import TransferNet
from safetransfer.training.directions import Direction
from safetransfer.training.engine import Evaluator, Loop, Parts, milestone_iterations
from safetransfer.training.regularizers import BindContext, Omega
from safetransfer.training.train_log import TrainLog, log_columns


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_omega(cfg: DictConfig) -> Omega:
    return Omega(
        {name: build("term", term, f"regularizer.terms.{name}") for name, term in cfg.regularizer.terms.items()}
    )


def create_direction(cfg: DictConfig) -> Direction:
    return build("direction", cfg.direction, "direction")


def create_model(cfg: DictConfig, num_classes: int, source: SourceWeights | None) -> TransferNet:
    """The backbone with the source's weights and the normalization asked for (StochNorm's layers
    take over BatchNorm's weights and statistics), and a new head."""
    model = TransferNet(cfg.backbone.name, num_classes)
    if source is not None:
        model.backbone.load_state_dict(source.backbone)
    build("normalization", cfg.normalization, "normalization").convert(model.backbone)
    return model


def create_optimizer(cfg: DictConfig, model: TransferNet) -> tuple[torch.optim.Optimizer, object]:
    """SGD over two groups, the new head at head_lr_mult times the backbone's lr; and its schedule."""
    lr = cfg.optim.optimizer.lr
    groups = model.parameter_groups()
    optimizer = build(
        "optimizer",
        cfg.optim.optimizer,
        "optim.optimizer",
        params=[
            {"params": groups["backbone"], "lr": lr},
            {"params": groups["head"], "lr": lr * cfg.optim.head_lr_mult},
        ],
    )
    schedule = OmegaConf.to_container(cfg.optim.scheduler, resolve=True)
    if "milestones" in schedule:
        schedule["milestones"] = milestone_iterations(schedule["milestones"], cfg.train.iterations)
    return optimizer, build("scheduler", schedule, "optim.scheduler", optimizer=optimizer)


def training_order(size: int, seed: int) -> SeededDraws:
    """The training images' order and draws, epoch by epoch, from the seed alone (loader or device-held)."""
    return SeededDraws(size, torch.Generator().manual_seed(seed))


def create_loader(dataset: Dataset, cfg: DictConfig, *, train: bool, seed: int, device: torch.device) -> DataLoader:
    """The training loader draws its order and each image's augmentation from the seed alone
    (safetransfer.data.draws): 0, 2 or 4 workers give the same batches, and a resumed run (a fresh
    loader, the sampler's generator restored by safetransfer.training.checkpoints) replays them exactly."""
    workers = cfg.runtime.num_workers
    # a generator of its own for the workers' base seed, which the global RNG would otherwise give
    common = dict(
        batch_size=cfg.train.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    if not train:
        return DataLoader(dataset, shuffle=False, **common)
    return DataLoader(
        Seeded(dataset),
        sampler=training_order(len(dataset), seed),
        drop_last=True,
        persistent_workers=workers > 0,
        **common,
    )


def bind_context(
    cfg: DictConfig, data: Data, device: torch.device, source: SourceWeights | None, seed: int = 0
) -> BindContext:
    """What regularizer terms may use before training; `identity` keys their caches."""
    return BindContext(
        device=device,
        train_data=data.train_plain,
        train_augmented=lambda: augmented_pass(cfg, data, device, seed),
        batch_size=cfg.train.batch_size,
        cache_dir=Path(cfg.paths.cache_dir).expanduser(),
        identity=term_identity(cfg),
        source_head=source.head if source is not None else None,
        source_classes=source.classes if source is not None else None,
    )


def augmented_pass(cfg: DictConfig, data: Data, device: torch.device, seed: int):
    """The training images in their order, each under one draw of the training augmentation (in the loader
    with the seeded global RNG, or on the device with a generator of its own, seeded from the seed), as
    batches on the device; the first view where the terms read two."""
    augment = None
    if data.device_augment:
        train_crop, _, _ = crop_options(cfg.data)
        augment = DeviceAugment(cfg.data.crop, cfg.data.mean, cfg.data.std, seed + 1, device, train_crop=train_crop)
    for images, _ in DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=False):
        images = images.to(device)
        images = augment(images) if augment is not None else images
        yield images[:, 0] if images.dim() == 5 else images


def compile_network(model: TransferNet) -> None:
    """runtime.compile: torch.compile in place (state_dict keys unchanged). The compiled
    backward keeps its buffers (no donation): DTNH and the angle diagnostics take two backward
    passes through one graph (retain_graph), which donated buffers refuse."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    model.compile()


@dataclass
class Seed:
    """One seed's pieces: what the loop steps, how long, and what it is evaluated on."""

    parts: Parts
    loop: Loop
    test_loader: DataLoader
    test_batches: DeviceAugment | None  # finishes test batches on the device, or None
    val_loader: DataLoader | None
    evaluator: Evaluator  # during training: the validation split if any (never choose on test)


def build_seed(cfg: DictConfig, seed: int, data: Data, source: SourceWeights | None, on_pace=None) -> Seed:
    """The seed's pieces, built in the order the module docstring gives; `on_pace` (see
    engine.Loop) hears the measured time per iteration after the first few steps."""
    device = resolve_device(str(cfg.runtime.device))
    seed_everything(seed)
    model = create_model(cfg, data.num_classes, source).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms for these shapes
        if cfg.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)  # before bind: frozen source copies follow
    omega = create_omega(cfg)
    omega.bind(model, bind_context(cfg, data, device, source, seed))
    if cfg.runtime.compile:
        compile_network(model)  # after bind, so the frozen copies stay eager
    optimizer, scheduler = create_optimizer(cfg, model)
    train_batches = test_batches = None
    if data.device_augment:
        train_crop, test_crops, _ = crop_options(cfg.data)
        geometry = (cfg.data.crop, cfg.data.mean, cfg.data.std, seed, device)
        train_batches = DeviceAugment(*geometry, train_crop=train_crop, views=data.views)
        test_batches = DeviceAugment(*geometry, train=False, test_crops=test_crops)
    if data.resident:  # data.on_device: batches gathered from images held on the device
        held = data.held_on(device)
        train_loader = ResidentLoader(*held["train"], cfg.train.batch_size, training_order(len(data.train), seed))
        test_loader = ResidentLoader(*held["test"], cfg.train.batch_size)
    else:
        train_loader = create_loader(data.train, cfg, train=True, seed=seed, device=device)
        test_loader = create_loader(data.test, cfg, train=False, seed=seed, device=device)
    parts = Parts(model, omega, create_direction(cfg), optimizer, scheduler, train_loader, device, train_batches)
    loop = Loop(
        iterations=cfg.train.iterations,
        precision=cfg.train.precision,
        log_every=cfg.runtime.log_every,
        diagnostics_every=cfg.runtime.diagnostics_every,
        eval_every=cfg.runtime.eval_every,
        check_finite=cfg.runtime.check_finite,
        on_pace=on_pace,
    )
    val_loader = create_loader(data.val, cfg, train=False, seed=seed, device=device) if data.val is not None else None
    evaluator = (
        Evaluator("test", model, test_loader, device, cfg.train.precision, test_batches)
        if val_loader is None
        else Evaluator("val", model, val_loader, device, cfg.train.precision)
    )
    return Seed(parts, loop, test_loader, test_batches, val_loader, evaluator)


def train_log(cfg: DictConfig, built: Seed, seed_dir: Path, desc: str) -> TrainLog:
    """The seed's log.csv (and TensorBoard events with logger=tensorboard), with the columns its run records."""
    loop, omega = built.loop, built.parts.omega
    columns = log_columns(
        list(omega.terms),
        omega.diagnostic_names(),
        built.evaluator.split if loop.eval_every else None,
        diagnostics=bool(loop.diagnostics_every),
    )
    return TrainLog(
        seed_dir / "log.csv",
        columns,
        built.parts.device,
        total=loop.iterations,
        desc=desc,
        progress=cfg.runtime.progress,
        tensorboard=seed_dir / "tensorboard" if cfg.logger == "tensorboard" else None,
    )
