"""Sources on this machine: none (random initialisation), any checkpoint file, and a source
checkpoint this project made (`experiment=pretrain_source`) with the writer of such files
(`export_source`, for pretrain.save_to) and the guard against replacing one (`check_save_to`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from safetransfer.common.atomic import atomic_torch_save
from safetransfer.common.downloads import file_digest
from safetransfer.common.errors import ConfigError, MissingData
from safetransfer.common.fingerprints import config_key
from safetransfer.common.registry import register
from safetransfer.sources import checkpoint_files
from safetransfer.sources.base import Source, SourceWeights
from safetransfer.training.backbones import TransferNet

log = logging.getLogger(__name__)


@register("source", "scratch")
class Scratch(Source):
    """Random initialisation (seeded by the training seed): the no-transfer baseline."""

    def __init__(self, name: str = "scratch"):
        super().__init__(name)

    def load(self, backbone: str) -> None:
        return None


@register("source", "file")
class FileSource(Source):
    """Any local checkpoint: torchvision, CSAIL Places365 or safetransfer layout, recognised automatically."""

    def __init__(self, path: str, name: str = "file", strict: bool = True):
        super().__init__(name)
        self.path, self.strict = Path(path).expanduser(), bool(strict)

    def local_file(self, backbone: str) -> Path:
        return self.path

    def load(self, backbone: str) -> SourceWeights:
        state, layout, head = checkpoint_files.load_backbone(self.path, backbone, strict=self.strict)
        log.info("source: %s (%s layout, %d tensors%s)", self.path, layout, len(state), ", its head" if head else "")
        return SourceWeights(state, head)


@register("source", "pretrained")
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

    def load(self, backbone: str) -> SourceWeights:
        command = (
            f"safetransfer-train experiment=pretrain_source target={self.dataset} backbone={backbone} "
            f"pretrain.save_to={self.path}"
        )
        if not self.path.is_file():
            raise MissingData(f"source={self.name}: no source checkpoint at {self.path}; create it with: {command}")
        checkpoint = checkpoint_files.read(self.path, backbone=backbone)
        meta = checkpoint.get("safetransfer_source") if isinstance(checkpoint, dict) else None
        if not isinstance(meta, dict):
            raise ConfigError(f"{self.path} is not a safetransfer source checkpoint; create one with: {command}")
        if (meta.get("backbone"), meta.get("dataset")) != (backbone, self.dataset):
            raise ConfigError(
                f"{self.path} holds a {meta.get('backbone')} trained on {meta.get('dataset')}, "
                f"not a {backbone} trained on {self.dataset}; create the right one with: {command}"
            )
        state, _ = checkpoint_files.backbone_state(checkpoint, origin=str(self.path))
        if checkpoint_files.state_digest(state) != meta.get("sha256"):
            raise ConfigError(
                f"{self.path}: the weights do not match the sha256 in their metadata "
                f"({meta.get('sha256')}); the file is damaged, create it again with: {command}"
            )
        state = checkpoint_files.match_backbone(state, backbone, strict=True, origin=str(self.path), hint="")[0]
        head = checkpoint.get("head")  # the head it was trained with (files written before it kept none)
        return SourceWeights(state, head if isinstance(head, dict) and set(head) == {"weight", "bias"} else None)


def save_source_checkpoint(model: TransferNet, path: Path, metadata: dict) -> dict:
    """Write the backbone as a safetransfer source checkpoint; returns the metadata written."""
    state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    metadata = {**metadata, "backbone": model.backbone_name, "sha256": checkpoint_files.state_digest(state)}
    head = {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}  # the source's own head
    atomic_torch_save({"safetransfer_source": metadata, "state_dict": state, "head": head}, Path(path).expanduser())
    return metadata


def export_source(cfg: DictConfig, model: TransferNet, seed: int, top1: float, test_loss: float, run_dir: Path) -> None:
    """pretrain.save_to: the fine-tuned backbone as a source checkpoint (experiment=pretrain_source)."""
    save_to = Path(cfg.pretrain.save_to).expanduser()
    metadata = save_source_checkpoint(
        model,
        save_to,
        {
            "dataset": cfg.target.name,
            "sampling_rate": cfg.target.sampling_rate,
            "source": OmegaConf.to_container(cfg.source, resolve=True),
            "iterations": cfg.train.iterations,
            "seed": seed,
            "top1": top1,
            "test_loss": test_loss,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config_key": config_key(cfg),
            "run_dir": str(run_dir),
        },
    )
    log.info(
        "source checkpoint written to %s (sha256 of the file %s, of its weights %s; runs fine-tuned from it "
        "record the file's)",
        save_to,
        file_digest(save_to),
        metadata["sha256"],
    )


def check_save_to(cfg: DictConfig, run_dir: Path) -> None:
    """pretrain.save_to must not replace a source checkpoint that other runs may have started
    from, unless pretrain.overwrite=true: refused before training. The job that wrote the file,
    rerun into its own directory, goes on."""
    if not cfg.pretrain.save_to or cfg.pretrain.get("overwrite", False):
        return
    path = Path(cfg.pretrain.save_to).expanduser()
    if not path.exists():
        return
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True).get("safetransfer_source", {})
    except Exception:
        meta = {}
    if meta.get("config_key") == config_key(cfg) and meta.get("run_dir") == str(run_dir):
        return
    made = f" (a {meta.get('backbone')} trained on {meta.get('dataset')}, {meta.get('created')})" if meta else ""
    raise ConfigError(
        f"pretrain.save_to={path} already holds a source checkpoint{made}, which other runs may have "
        "started from: set pretrain.overwrite=true to replace it, or pretrain.save_to=<another path>"
    )
