"""One job: a config, its seeds run one after another, one row in the results table.

Factories turn the config into objects (timm style); `run_job` is what the Hydra
entrypoint calls.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from safetransfer.backbones import TransferNet
from safetransfer.checks import check_classes, check_config, check_training_set
from safetransfer.directions import Direction
from safetransfer.methods import method_name
from safetransfer.engine import Evaluator, NonFiniteError, evaluate, fit, test_forward
from safetransfer.regularizers import BindContext, Omega
from safetransfer.atomic import atomic_write_json, read_json
from safetransfer.results import config_key, make_row, write_row
from safetransfer.search import apply_chosen
from safetransfer.sources import save_source_checkpoint
from safetransfer.resume import CHECKPOINT, StopSignals, load_checkpoint
from safetransfer.runtime import job_device, resolve_device
from safetransfer.targets import (Target, TensorImages, Transformed, augment_transform, crop_options,
                                  test_transform, train_transform, views_transform)
from safetransfer.targets.cache import DeviceAugment, cached_split

log = logging.getLogger(__name__)

FAILED = "failed.json"  # in a seed's directory: it stopped on a NaN or inf, and why


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_omega(cfg: DictConfig) -> Omega:
    return Omega({name: instantiate(term) for name, term in cfg.regularizer.terms.items()})


def create_direction(cfg: DictConfig) -> Direction:
    return instantiate(cfg.direction)


def create_model(cfg: DictConfig, num_classes: int, source_state: dict | None) -> TransferNet:
    model = TransferNet(cfg.backbone.name, num_classes)
    if source_state is not None:
        model.backbone.load_state_dict(source_state)
    return model


def create_optimizer(cfg: DictConfig, model: TransferNet) -> tuple[torch.optim.Optimizer, object]:
    """SGD over two groups, the new head at head_lr_mult times the backbone's lr; and its schedule."""
    lr = cfg.optim.optimizer.lr
    groups = model.parameter_groups()
    optimizer = instantiate(cfg.optim.optimizer)([
        {"params": groups["backbone"], "lr": lr},
        {"params": groups["head"], "lr": lr * cfg.optim.head_lr_mult},
    ])
    return optimizer, instantiate(cfg.optim.scheduler)(optimizer)


def create_loader(dataset: Dataset, cfg: DictConfig, *, train: bool, seed: int, device: torch.device) -> DataLoader:
    # the generator fixes the shuffling and, through each worker's base seed, the augmentation
    # with persistent workers the order comes from a generator of its own, so that a resumed
    # run (a fresh loader) replays it exactly (see safetransfer.resume)
    workers = cfg.runtime.num_workers
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if train and workers else None
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=train and sampler is None, sampler=sampler,
        drop_last=train, num_workers=workers, generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda", persistent_workers=train and workers > 0)


@dataclass
class Data:
    train: Dataset
    test: Dataset
    num_classes: int
    train_indices: np.ndarray
    train_plain: Dataset  # the training images with the test-time transform (for DELTA's attention)
    val: Dataset | None = None
    val_indices: np.ndarray | None = None
    on_device: bool = False  # train/test hold uint8 images; crop, mirror and normalise happen on the device


def augment_on_device(cfg: DictConfig, cached: bool) -> bool:
    """data.augment_on: auto puts crop and mirror on the GPU when training there from the cache.
    The device path implements the plain random crop and one centre test crop only."""
    if crop_options(cfg.data) != ("random_crop", 1):
        return False
    choice = cfg.data.augment_on
    if choice == "auto":
        return cached and resolve_device(str(cfg.runtime.device)).type == "cuda"
    return choice == "device" and cached


def prepare_data(cfg: DictConfig, target: Target, seed: int | None = None) -> Data:
    """The sampled training set (minus the validation hold-out), validation and test sets;
    `seed` redraws the sample (target.resample_per_seed)."""
    indices, val_indices = target.split_train_val(seed)
    check_training_set(len(indices), cfg.train.batch_size)
    geometry = (cfg.data.resize, cfg.data.crop, cfg.data.mean, cfg.data.std)
    train_crop, test_crops = crop_options(cfg.data)
    train_set, test_set = target.train_set(), target.test_set()
    cached = bool(cfg.data.cache) and not isinstance(train_set, TensorImages)  # in-memory images need no cache
    on_device = augment_on_device(cfg, cached)
    if cached:
        train, test = cached_data(cfg, train_set, test_set, indices, on_device)
    else:
        train = Transformed(train_set, indices, train_transform(*geometry, train_crop))
        test = Transformed(test_set, range(len(test_set)), test_transform(*geometry, test_crops))
    return Data(
        train=train,
        test=test,
        num_classes=len(target.classes),
        train_indices=indices,
        train_plain=Transformed(train_set, indices, test_transform(*geometry)),
        val=Transformed(train_set, val_indices, test_transform(*geometry, test_crops)) if len(val_indices) else None,
        val_indices=val_indices,
        on_device=on_device,
    )


def cached_data(cfg: DictConfig, train_set: Dataset, test_set: Dataset, indices: np.ndarray,
                on_device: bool = False) -> tuple[Dataset, Dataset]:
    """Training and test images read from the decoded-image cache: whole splits are cached
    once per dataset and size, so every sampling rate and seed shares them. With
    `on_device` the loader hands over uint8 images and DeviceAugment does the rest."""
    identity = OmegaConf.to_container(cfg.target, resolve=True)
    for key in ("sampling_rate", "sampling_seed", "resample_per_seed", "val_fraction", "sample_list", "sample_list_dir"):
        identity.pop(key, None)
    common = dict(resize=cfg.data.resize, crop=cfg.data.crop, cache_dir=Path(cfg.paths.cache_dir).expanduser(),
                  identity=identity, num_workers=cfg.runtime.num_workers)
    train_crop, test_crops = crop_options(cfg.data)
    train_all = cached_split(train_set, np.arange(len(train_set)), "train", **common)
    test_all = cached_split(test_set, np.arange(len(test_set)), "test", **common, test_crops=test_crops)
    if on_device:
        return Transformed(train_all, indices, nn.Identity()), test_all
    crop, mean, std = cfg.data.crop, cfg.data.mean, cfg.data.std
    return (Transformed(train_all, indices, augment_transform(crop, mean, std, train_crop)),
            Transformed(test_all, range(len(test_all)), views_transform(crop, mean, std, test_crops)))


def save_indices(path: Path, cfg: DictConfig, data: Data) -> None:
    atomic_write_json(path, {"sampling_rate": cfg.target.sampling_rate, "sampling_seed": cfg.target.sampling_seed,
                             "val_fraction": cfg.target.val_fraction, "indices": data.train_indices.tolist(),
                             "val_indices": data.val_indices.tolist()})


def bind_context(cfg: DictConfig, data: Data, device: torch.device) -> BindContext:
    """What regularizer terms may use before training; `identity` keys their caches."""
    identity = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("backbone", "source", "target", "data")}
    return BindContext(device=device, train_data=data.train_plain, batch_size=cfg.train.batch_size,
                       cache_dir=Path(cfg.paths.cache_dir).expanduser(), identity=identity)


@torch.no_grad()
def save_spectrum(path: Path, model: TransferNet, loader: DataLoader, device: torch.device, batches: int,
                  batch_transform=None) -> None:
    """The singular values (descending) of the pooled feature matrix of each of the first
    `batches` test batches (fixed: the test loader is not shuffled), as in the BSS paper's analysis."""
    if batches <= 0:
        return
    model.eval()
    spectra = []
    for index, (images, _) in enumerate(loader):
        if index == batches:
            break
        images = images.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        pooled = test_forward(model, images)[1].double()
        spectra.append(torch.linalg.svdvals(pooled).cpu().tolist())
    model.train()
    atomic_write_json(path, {"batch_size": loader.batch_size, "split": "test", "singular_values": spectra})


def compile_network(model: TransferNet) -> None:
    """runtime.compile: torch.compile in place (state_dict keys unchanged). The compiled
    backward keeps its buffers (no donation): DTNH and the angle diagnostics take two backward
    passes through one graph (retain_graph), which donated buffers refuse."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    model.compile()


def run_seed(cfg: DictConfig, seed: int, data: Data, source_state: dict | None, run_dir: Path,
             stop: StopSignals | None = None) -> dict | None:
    """Fine-tune once and evaluate the final weights (never the best test epoch). Continues
    from the seed's checkpoint when an earlier run left one. A NaN or inf stops the seed:
    it is recorded in failed.json and None returned. A stop request (`stop`, a signal)
    checkpoints and raises resume.Preempted."""
    seed_dir = run_dir / f"seed_{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for stale in seed_dir.glob(".*.tmp"):  # an atomic write cut short (SIGKILL mid-checkpoint): only this seed writes here
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", stale)
    device = resolve_device(str(cfg.runtime.device))
    seed_everything(seed)
    model = create_model(cfg, data.num_classes, source_state).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms for these shapes
        if cfg.runtime.get("channels_last", True):
            model = model.to(memory_format=torch.channels_last)  # before bind: frozen source copies follow
    omega = create_omega(cfg)
    omega.bind(model, bind_context(cfg, data, device))
    if cfg.runtime.get("compile", False):
        compile_network(model)  # after bind, so the frozen copies stay eager
    optimizer, scheduler = create_optimizer(cfg, model)
    train_batches = test_batches = None
    if data.on_device:
        train_batches = DeviceAugment(cfg.data.crop, cfg.data.mean, cfg.data.std, seed, device)
        test_batches = DeviceAugment(cfg.data.crop, cfg.data.mean, cfg.data.std, seed, device, train=False)
    key, checkpoint = config_key(cfg), seed_dir / CHECKPOINT
    test_loader = create_loader(data.test, cfg, train=False, seed=seed, device=device)
    # during training: the validation split when there is one (never choose on test), else the test split
    evaluator = Evaluator("test", model, test_loader, device, cfg.train.precision, test_batches) if data.val is None \
        else Evaluator("val", model, create_loader(data.val, cfg, train=False, seed=seed, device=device), device,
                       cfg.train.precision)
    start = time.perf_counter()
    try:
        fit(model, create_loader(data.train, cfg, train=True, seed=seed, device=device), omega,
            create_direction(cfg), optimizer, scheduler, iterations=cfg.train.iterations, device=device,
            precision=cfg.train.precision, log_every=cfg.runtime.log_every,
            diagnostics_every=cfg.runtime.diagnostics_every, progress=cfg.runtime.progress,
            log_path=seed_dir / "log.csv", desc=f"seed {seed}", batch_transform=train_batches,
            checkpoint_path=checkpoint, checkpoint_every=cfg.runtime.checkpoint_every, key=key,
            resume=load_checkpoint(checkpoint, key), check_finite=cfg.runtime.check_finite,
            eval_every=cfg.runtime.get("eval_every", 0), evaluator=evaluator,
            tensorboard=seed_dir / "tensorboard" if cfg.get("logger", "csv") == "tensorboard" else None, stop=stop)
    except NonFiniteError as error:
        atomic_write_json(seed_dir / FAILED, {"seed": seed, "key": key, "error": str(error)})
        log.error("%s: the seed is recorded as failed (%s) and left out of the table", error, seed_dir / FAILED)
        return None
    top1, test_loss = evaluate(model, test_loader, device, cfg.train.precision, test_batches)
    save_spectrum(seed_dir / "spectrum.json", model, test_loader, device, cfg.runtime.get("spectrum_batches", 4),
                  test_batches)
    validation = {}
    if data.val is not None:
        val_top1, val_loss = evaluate(model, create_loader(data.val, cfg, train=False, seed=seed, device=device),
                                      device, cfg.train.precision)
        validation = {"val_top1": val_top1, "val_loss": val_loss, "val_images": len(data.val)}
    metrics = {
        "seed": seed, "method": method_name(cfg), "top1": top1, "test_loss": test_loss,
        "iterations": cfg.train.iterations,
        "wall_time_s": time.perf_counter() - start, "device": str(device),
        "precision": cfg.train.precision if device.type == "cuda" else "fp32",
        "train_images": len(data.train), "test_images": len(data.test), **validation,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_json(seed_dir / "metrics.json", metrics)
    if not cfg.runtime.keep_checkpoints:
        checkpoint.unlink(missing_ok=True)
    if cfg.pretrain.save_to and seed == cfg.seeds[0]:
        save_to = Path(cfg.pretrain.save_to).expanduser()
        metadata = save_source_checkpoint(model, save_to, {
            "dataset": cfg.target.name, "sampling_rate": cfg.target.sampling_rate,
            "source": OmegaConf.to_container(cfg.source, resolve=True), "iterations": cfg.train.iterations,
            "seed": seed, "top1": top1, "test_loss": test_loss, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        log.info("source checkpoint written to %s (sha256 of the weights %s)", save_to, metadata["sha256"])
    log.info("seed %d: top-1 %.2f%%, test loss %.4f (%.0f s)", seed, top1, test_loss, metrics["wall_time_s"])
    return metrics


def finished_seed(run_dir: Path, seed: int, key: str) -> dict | None:
    """The metrics of `seed` if an earlier run of this same config finished it in `run_dir`."""
    path = run_dir / f"seed_{seed}" / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path, needs=("config", "top1"))
    if metrics is None:  # a damaged file (read_json said which): the seed is trained again
        return None
    if config_key(OmegaConf.create(metrics["config"])) != key:
        log.warning("%s holds seed %d of another config; it is run again and replaced", path.parent, seed)
        return None
    return metrics


def failed_seed(run_dir: Path, seed: int, key: str) -> str | None:
    """Why `seed` failed, if an earlier run of this same config recorded it failed in `run_dir`."""
    path = run_dir / f"seed_{seed}" / FAILED
    if not path.exists():
        return None
    record = read_json(path, needs=("key", "error"))  # damaged: the seed is tried again
    return record["error"] if record is not None and record["key"] == key else None


def run_job(cfg: DictConfig, run_dir: Path, overrides: str = "", stop: StopSignals | None = None) -> dict:
    """Check the config, run every seed not finished yet, write the row; returns the row.
    `stop` (safetransfer.resume.StopSignals) asks the running seed to checkpoint and stop."""
    check_config(cfg)
    if apply_chosen(cfg, method_name(cfg)):  # stage 2 of a table's search: the cell's chosen values
        check_config(cfg)
    with job_device(cfg):
        return _run_job(cfg, run_dir, overrides, stop)


def seed_data(cfg: DictConfig, target: Target, seed: int, run_dir: Path, data: Data | None) -> Data:
    """The job's data for `seed`, or its own draw (saved beside it) with target.resample_per_seed."""
    if not cfg.target.resample_per_seed and data is not None:
        return data
    data = prepare_data(cfg, target, seed if cfg.target.resample_per_seed else None)
    if cfg.target.resample_per_seed:
        save_indices(run_dir / f"seed_{seed}" / "sampled_train_indices.json", cfg, data)
    return data


def run_seeds_concurrently(cfg: DictConfig, seeds: list[int], run_dir: Path) -> dict[int, dict | None]:
    """runtime.concurrent_seeds: each seed in a process of its own, all at once (on one GPU,
    they share it). Each process loads the source and the cached data itself."""
    from concurrent.futures import ProcessPoolExecutor

    container = OmegaConf.to_container(cfg, resolve=True)
    context = torch.multiprocessing.get_context("spawn")
    log.info("seeds %s run concurrently, a process each", seeds)
    with ProcessPoolExecutor(max_workers=len(seeds), mp_context=context) as pool:
        futures = {seed: pool.submit(_seed_process, container, seed, str(run_dir), torch.get_num_threads())
                   for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}


def _seed_process(container: dict, seed: int, run_dir: str, threads: int) -> dict | None:
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][seed {seed}][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(threads)
    cfg = OmegaConf.create(container)
    target: Target = instantiate(cfg.target)
    source_state = instantiate(cfg.source).backbone_state(cfg.backbone.name)
    data = seed_data(cfg, target, seed, Path(run_dir), None)
    with StopSignals() as stop:
        return run_seed(cfg, seed, data, source_state, Path(run_dir), stop)


def _run_job(cfg: DictConfig, run_dir: Path, overrides: str, stop: StopSignals | None) -> dict:
    target: Target = instantiate(cfg.target)
    target.check()
    check_classes(cfg.target.name, len(target.classes))
    method = method_name(cfg)
    check_training_set(len(target.split_train_val()[0]), cfg.train.batch_size)
    # the source before the data: a missing checkpoint is reported before any cache is built
    source_state = instantiate(cfg.source).backbone_state(cfg.backbone.name)
    data = prepare_data(cfg, target)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_indices(run_dir / "sampled_train_indices.json", cfg, data)
    log.info("%s | %s -> %s at %g%% (%d training images) | %d seeds", method, cfg.source.name, cfg.target.name,
             cfg.target.sampling_rate, len(data.train), len(cfg.seeds))

    key = config_key(cfg)
    outcomes: dict[int, dict | None] = {}
    for seed in cfg.seeds:
        done, error = finished_seed(run_dir, seed, key), failed_seed(run_dir, seed, key)
        if done is not None:
            log.info("seed %d: finished earlier in %s (top-1 %.2f%%), kept", seed, run_dir, done["top1"])
            outcomes[seed] = done
        elif error is not None:
            log.warning("seed %d failed earlier and is skipped (delete %s to try again): %s", seed,
                        run_dir / f"seed_{seed}" / FAILED, error)
            outcomes[seed] = None
    pending = [seed for seed in cfg.seeds if seed not in outcomes]
    if cfg.runtime.get("concurrent_seeds", False) and len(pending) > 1:
        outcomes.update(run_seeds_concurrently(cfg, pending, run_dir))
    for seed in pending:
        if seed in outcomes:
            continue
        outcomes[seed] = run_seed(cfg, seed, seed_data(cfg, target, seed, run_dir, data), source_state, run_dir, stop)
    finished = [seed for seed in cfg.seeds if outcomes[seed] is not None]
    failed = [seed for seed in cfg.seeds if outcomes[seed] is None]
    accuracies = [outcomes[seed]["top1"] for seed in finished]
    if not finished:
        raise NonFiniteError(f"every seed failed ({run_dir}/seed_*/{FAILED} says why); nothing is written to the table")
    row = make_row(backbone=cfg.backbone.name, source=cfg.source.name, target=cfg.target.name,
                   sampling_rate=cfg.target.sampling_rate, method=method, seeds=finished,
                   accuracies=accuracies, overrides=overrides, key=key, run_dir=str(run_dir), failed=failed)
    write_row(Path(cfg.results.dir), str(cfg.results.table), row)
    log.info("%s: %.2f ± %.2f over %d seeds -> %s", method, row["mean"], row["std"], row["n_seeds"],
             Path(cfg.results.dir) / f"{cfg.results.table}.md")
    return row


__all__ = ["run_job"]
