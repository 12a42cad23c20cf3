"""The config's schema: the root's own sections as Hydra structured configs, registered in Hydra's
ConfigStore as the base of conf/config.yaml (`defaults: [schema, _self_, ...]`).

The schema gives the types; the values, and the comments that explain them, stay in conf/config.yaml,
which fills every field (one it left out would be refused as missing). OmegaConf refuses a value of
the wrong type and a key the schema does not have, with the key's full name, wherever the value comes
from (a YAML file, a preset, the command line). Ranges and rules across
keys are checked in one pass over the composed config (safetransfer/job/checks.py); the group nodes
(backbone, source, target, regularizer, direction, normalization, optim) are checked by the registered classes they
build (safetransfer/common/registry.py), which know their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

#: the name conf/config.yaml gives the schema in its defaults list
SCHEMA = "schema"


@dataclass
class Train:
    iterations: int = MISSING
    batch_size: int = MISSING
    precision: str = MISSING


@dataclass
class Data:
    resize: int = MISSING
    crop: int = MISSING
    test_resize: str = MISSING
    train_crop: str = MISSING
    test_crops: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    cache: bool = MISSING
    augment_on: str = MISSING
    on_device: Any = MISSING  # auto | true | false


@dataclass
class Runtime:
    device: str = MISSING
    num_workers: int = MISSING
    log_every: int = MISSING
    diagnostics_every: int = MISSING
    eval_every: int = MISSING
    spectrum_batches: int = MISSING
    progress: str = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: bool = MISSING
    save_weights: bool = MISSING
    check_finite: bool = MISSING
    channels_last: bool = MISSING
    concurrent_seeds: bool = MISSING
    compile: bool = MISSING


@dataclass
class Pretrain:
    save_to: str | None = MISSING
    overwrite: bool = MISSING


@dataclass
class Results:
    dir: str = MISSING
    table: str = MISSING
    local_paths: bool = MISSING
    published: str | None = MISSING


@dataclass
class Search:
    grids: dict[str, list[str]] = MISSING
    val_fraction: float = MISSING
    seeds: list[int] = MISSING
    chosen: str | None = MISSING


@dataclass
class Paths:
    cache_dir: str = MISSING
    data_root: str = MISSING
    mirror: str | None = MISSING
    download_timeout_s: float = MISSING
    download_retries: int = MISSING


@dataclass
class Config:
    seeds: list[int] = MISSING
    logger: str = MISSING
    train: Train = field(default_factory=Train)
    data: Data = field(default_factory=Data)
    runtime: Runtime = field(default_factory=Runtime)
    pretrain: Pretrain = field(default_factory=Pretrain)
    results: Results = field(default_factory=Results)
    search: Search = field(default_factory=Search)
    paths: Paths = field(default_factory=Paths)
    # the groups: each node is checked by the class it builds
    backbone: Any = None
    source: Any = None
    target: Any = None
    regularizer: Any = None
    direction: Any = None
    normalization: Any = None
    optim: Any = None
    # what a paper preset adds: the DTNH tables' schedules, the BSS table's lists and DELTA's convention
    schedule: Any = None
    bss_lists: Any = None
    delta_convention: str = "paper"  # DELTA's form where a preset reads it: paper | released_code


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA, node=Config)
