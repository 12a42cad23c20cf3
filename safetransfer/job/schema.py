"""The config's schema: the root's own sections as Hydra structured configs, registered in Hydra's
ConfigStore as the base of conf/config.yaml (`defaults: [schema, _self_, ...]`).

OmegaConf refuses a value of the wrong type and a key the schema does not have, with the key's full
name, wherever the value comes from (a YAML file, a preset, the command line). Ranges and rules across
keys are checked in one pass over the composed config (safetransfer/job/checks.py); the group nodes
(backbone, source, target, regularizer, direction, optim) are checked by the registered classes they
build (safetransfer/common/registry.py), which know their own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

#: the name conf/config.yaml gives the schema in its defaults list
SCHEMA = "schema"


@dataclass
class Train:
    iterations: int = 8000
    batch_size: int = 48
    precision: str = "fp32"


@dataclass
class Data:
    resize: int = 256
    crop: int = 224
    test_resize: str = "square"
    train_crop: str = "random_crop"
    test_crops: int = 1
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    cache: bool = True
    augment_on: str = "auto"
    on_device: Any = "auto"  # auto | true | false


@dataclass
class Runtime:
    device: str = "auto"
    num_workers: int = 4
    log_every: int = 100
    diagnostics_every: int = 100
    eval_every: int = 0
    spectrum_batches: int = 4
    progress: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    save_weights: bool = False
    check_finite: bool = True
    channels_last: bool = True
    concurrent_seeds: bool = False
    compile: bool = False


@dataclass
class Pretrain:
    save_to: str | None = None
    overwrite: bool = False


@dataclass
class Results:
    dir: str = "results"
    table: str = "table"
    local_paths: bool = False
    published: str | None = None


@dataclass
class Search:
    grids: dict[str, list[str]] = field(default_factory=dict)
    val_fraction: float = 0.2
    seeds: list[int] = field(default_factory=lambda: [0])
    chosen: str | None = None


@dataclass
class Paths:
    cache_dir: str = "~/.cache/safetransfer"
    data_root: str = "data"
    mirror: str | None = None


@dataclass
class Config:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    logger: str = "csv"
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
    optim: Any = None
    # what a paper preset adds: the DTNH tables' schedules, the BSS table's lists and DELTA's convention
    schedule: Any = None
    bss_lists: Any = None
    delta_convention: str = "paper"  # DELTA's form where a preset reads it: paper | released_code


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA, node=Config)
