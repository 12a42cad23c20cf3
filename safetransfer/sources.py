"""Source checkpoints: where the backbone's initial weights w_S^0 come from.

A source is one class here plus one YAML in conf/source/; it returns a backbone
state_dict (or None for random initialisation).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from safetransfer import checkpoints, demo
from safetransfer.atomic import atomic_torch_save, built_once
from safetransfer.backbones import TransferNet
from safetransfer.downloads import download, file_digest
from safetransfer.errors import ConfigError, MissingData
from safetransfer.fingerprints import fingerprint

log = logging.getLogger(__name__)


class Source:
    def __init__(self, name: str):
        self.name = name

    #: whether a missing checkpoint is downloaded (from its publisher) on first use
    downloadable = False

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor] | None:
        """The source weights for `backbone`, or None to keep the random initialisation."""
        raise NotImplementedError

    def local_file(self, backbone: str) -> Path | None:
        """The checkpoint file `backbone_state` reads (None: it reads none, or makes its own)."""
        return None

    def read_file(self, backbone: str) -> Path | None:
        """The file `backbone_state` read its weights from (its own making included), for provenance."""
        return self.local_file(backbone)


def own_keys(source_cfg) -> list[str]:
    """The keys of a source config its class does not take (`source.dataset` given to a sweep over
    source=pretrained,demo,scratch belongs to pretrained only): removed from `source_cfg`, returned."""
    import inspect

    from hydra.utils import get_class
    from omegaconf import open_dict

    parameters = inspect.signature(get_class(source_cfg._target_)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    foreign = [k for k in source_cfg.keys() if not str(k).startswith("_") and k not in parameters]
    with open_dict(source_cfg):
        for key in foreign:
            del source_cfg[key]
    return [str(k) for k in foreign]


def provenance(source: Source, backbone: str) -> dict:
    """What a run started from: the source's name and, when it reads one, its checkpoint file
    and that file's sha256 (recorded in each seed's metrics.json)."""
    path = source.read_file(backbone)
    found = path is not None and Path(path).is_file()
    return {"name": source.name, "file": str(path) if found else None, "sha256": file_digest(path) if found else None}


class Scratch(Source):
    """Random initialisation (seeded by the training seed): the no-transfer baseline."""

    def __init__(self, name: str = "scratch"):
        super().__init__(name)

    def backbone_state(self, backbone: str) -> None:
        return None


class FileSource(Source):
    """Any local checkpoint: torchvision, CSAIL Places365 or safetransfer layout, recognised automatically."""

    def __init__(self, path: str, name: str = "file", strict: bool = True):
        super().__init__(name)
        self.path, self.strict = Path(path).expanduser(), bool(strict)

    def local_file(self, backbone: str) -> Path:
        return self.path

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor]:
        state, layout = checkpoints.load_backbone(self.path, backbone, strict=self.strict)
        log.info("source: %s (%s layout, %d tensors)", self.path, layout, len(state))
        return state


class PretrainedSource(Source):
    """A source checkpoint this project made with `experiment=pretrain_source` (the DTNH
    paper's Stanford Dogs model: ImageNet weights fine-tuned on all of Stanford Dogs).
    Its metadata must name the same backbone and dataset, and its weights must match the
    digest recorded when it was written."""

    def __init__(self, path: str, dataset: str, name: str = "pretrained"):
        super().__init__(name)
        self.path, self.dataset = Path(path).expanduser(), dataset

    def local_file(self, backbone: str) -> Path:
        return self.path

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor]:
        command = (
            f"safetransfer-train experiment=pretrain_source target={self.dataset} backbone={backbone} "
            f"pretrain.save_to={self.path}"
        )
        if not self.path.is_file():
            raise MissingData(f"source={self.name}: no source checkpoint at {self.path}; create it with: {command}")
        checkpoint = checkpoints.read(self.path)
        meta = checkpoint.get("safetransfer_source") if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict):
            raise ConfigError(f"{self.path} is not a safetransfer source checkpoint; create one with: {command}")
        if (meta.get("backbone"), meta.get("dataset")) != (backbone, self.dataset):
            raise ConfigError(
                f"{self.path} holds a {meta.get('backbone')} trained on {meta.get('dataset')}, "
                f"not a {backbone} trained on {self.dataset}; create the right one with: {command}"
            )
        state, _ = checkpoints.backbone_state(checkpoint, origin=str(self.path))
        if checkpoints.state_digest(state) != meta.get("sha256"):
            raise ConfigError(
                f"{self.path}: the weights do not match the sha256 in their metadata "
                f"({meta.get('sha256')}); the file is damaged, create it again with: {command}"
            )
        return checkpoints.match_backbone(state, backbone, strict=True, origin=str(self.path), hint="")


def save_source_checkpoint(model: TransferNet, path: Path, metadata: dict) -> dict:
    """Write the backbone as a safetransfer source checkpoint; returns the metadata written."""
    state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    metadata = {**metadata, "backbone": model.backbone_name, "sha256": checkpoints.state_digest(state)}
    atomic_torch_save({"safetransfer_source": metadata, "state_dict": state}, Path(path).expanduser())
    return metadata


class ImageNetSource(Source):
    """torchvision's ImageNet weights (`weights`: IMAGENET1K_V1, or IMAGENET1K_V2 for ResNet-50).

    The file lives where torchvision caches it ($TORCH_HOME/hub/checkpoints) under
    torchvision's file name; a file already there is used without network. `verify` checks
    its sha256 against the prefix torchvision writes into the file name, or against
    `sha256` when one is given (a site's own build of the weights, a test's fixture).
    """

    def __init__(
        self, name: str = "imagenet", weights: str = "IMAGENET1K_V1", verify: bool = True, sha256: str | None = None
    ):
        super().__init__(name)
        self.weights, self.verify, self.sha256 = weights, bool(verify), sha256

    def resolve(self, backbone: str):
        import torchvision

        enum = torchvision.models.get_model_weights(backbone)
        if self.weights not in enum.__members__:
            raise ConfigError(
                f"source.weights={self.weights} does not exist for backbone={backbone}; "
                f"allowed: {', '.join(enum.__members__)}"
            )
        return enum[self.weights]

    downloadable = True

    def local_file(self, backbone: str) -> Path:
        return self.published(backbone)[1]

    def published(self, backbone: str) -> tuple[str, Path, str | None]:
        """(URL, local path, "sha256:<digest or prefix>" to check, or None)."""
        url = self.resolve(backbone).url
        prefix = re.search(r"-([0-9a-f]{8,})\.", url.rsplit("/", 1)[-1])
        expected = self.sha256 or (prefix.group(1) if prefix else None)
        return url, hub_path(url), f"sha256:{expected}" if self.verify and expected else None

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor]:
        url, path, checksum = self.published(backbone)
        download(url, path, checksum)
        return checkpoints.load_backbone(path, backbone, key="file", hint=not_published(path))[0]


class Places365Source(Source):
    """The CSAIL Places365 ResNets (`<backbone>_places365.pth.tar` of the places365 model
    release), cached beside torchvision's files ($TORCH_HOME/hub/checkpoints). The file's
    sha256 is checked against `sha256[<backbone>]` after download and before every use;
    the checkpoint's `module.` prefix, dict layout and 365-way head are converted away."""

    URL = "http://places2.csail.mit.edu/models_places365/{backbone}_places365.pth.tar"

    def __init__(self, name: str = "places365", sha256: dict | None = None):
        super().__init__(name)
        self.sha256 = dict(sha256 or {})

    downloadable = True

    def local_file(self, backbone: str) -> Path:
        return self.published(backbone)[1]

    def published(self, backbone: str) -> tuple[str, Path, str | None]:
        url = self.URL.format(backbone=backbone)
        pinned = self.sha256.get(backbone)
        return url, hub_path(url), f"sha256:{pinned}" if pinned else None

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor]:
        url, path, checksum = self.published(backbone)
        download(url, path, checksum)
        if checksum is None:
            actual = file_digest(path)
            log.warning(
                "%s has no pinned sha256 to check against; its sha256 is %s: pin it with source.sha256.%s=%s",
                path,
                actual,
                backbone,
                actual,
            )
        return checkpoints.load_backbone(path, backbone, key="file", hint=not_published(path))[0]


def not_published(path: Path) -> str:
    return f"it is not the published file: delete {path} to download it again"


def hub_path(url: str) -> Path:
    """Where torch.hub keeps the published file of `url` ($TORCH_HOME/hub/checkpoints/<file name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class DemoSource(Source):
    """The demo's source model: pretrained on the generated source domain on first use, then cached."""

    def __init__(
        self,
        cache_dir: str,
        name: str = "demo",
        images_per_class: int = 200,
        image_size: int = 32,
        iterations: int = 400,
        batch_size: int = 64,
        lr: float = 0.03,
        seed: int = 0,
    ):
        super().__init__(name)
        self.cache_dir = Path(cache_dir).expanduser()
        self.settings = dict(
            images_per_class=images_per_class,
            image_size=image_size,
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            generator=demo.VERSION,
        )

    def read_file(self, backbone: str) -> Path:
        return self.cache_path(backbone)

    def cache_path(self, backbone: str) -> Path:
        key = fingerprint({"backbone": backbone, **self.settings}, 16)
        return self.cache_dir / "demo_source" / f"{backbone}-{key}.pt"

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor]:
        path = self.cache_path(backbone)
        built = not path.exists()
        state = built_once(path, lambda: self.pretrain(backbone), "the demo source model")
        if built:
            log.info("demo source model for %s cached at %s", backbone, path)
        return state

    def pretrain(self, backbone: str) -> dict[str, torch.Tensor]:
        from safetransfer.directions import Sum
        from safetransfer.engine import Loop, Parts, fit
        from safetransfer.logs import TrainLog
        from safetransfer.regularizers import Omega
        from safetransfer.regularizers.l2 import L2
        from safetransfer.targets import IMAGENET_MEAN, IMAGENET_STD, TensorImages, Transformed, train_transform

        s = self.settings
        log.info("pretraining the demo source model (%s, %d iterations; once, then cached)", backbone, s["iterations"])
        images, labels, classes = demo.make_domain("source", s["images_per_class"], s["image_size"], s["seed"])
        size = s["image_size"]
        dataset = Transformed(
            TensorImages(images, labels),
            range(len(labels)),
            train_transform(size + size // 8, size, IMAGENET_MEAN, IMAGENET_STD),
        )
        generator = torch.Generator().manual_seed(s["seed"])
        loader = DataLoader(dataset, batch_size=s["batch_size"], shuffle=True, drop_last=True, generator=generator)
        with torch.random.fork_rng():
            torch.manual_seed(s["seed"])
            model = TransferNet(backbone, len(classes))
            optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s["iterations"])
            omega = Omega({"l2": L2(alpha=1e-4)})
            cpu = torch.device("cpu")
            fit(
                Parts(model, omega, Sum(), optimizer, scheduler, loader, cpu),
                Loop(s["iterations"], log_every=max(1, s["iterations"] // 4)),
                TrainLog(None, [], cpu, total=s["iterations"], desc="demo source"),
            )
        return model.backbone.state_dict()
