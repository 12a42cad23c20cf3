"""Fetching what jobs will read, before any of them starts: every source checkpoint, target
dataset and sample list of a set of composed configs, downloaded and verified through the
same code the jobs use (the sources' `backbone_state`, the targets' `fetch`, the BSS lists'
pinned download), one outcome per artifact. `safetransfer-fetch` and `safetransfer-reproduce
TABLE --fetch` run it on a login node; `--plan` runs it without downloading.

A source made by this project (`source=stanford_dogs`: ImageNet weights fine-tuned by
`experiment=pretrain_source`) cannot be downloaded; the artifacts of the pretraining run
that makes it are fetched instead, and the source is reported with the command to make it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safetransfer.common.downloads import network
from safetransfer.common.errors import MissingData, SafetransferError, one_line
from safetransfer.common.fingerprints import data_identity
from safetransfer.common.registry import build
from safetransfer.common.signals import at_once
from safetransfer.data import sample_lists
from safetransfer.sources.base import own_keys
from safetransfer.sources.local import PretrainedSource

#: status -> what the line says
LABELS = {
    "present": "present and verified",
    "downloaded": "downloaded and verified",
    "missing": "missing",
    "manual": "cannot be downloaded",
    "failed": "failed",
}
READY = ("present", "downloaded")


class NotFetched(SafetransferError):
    """A downloadable artifact that is not there yet (checked without downloading)."""


@dataclass(frozen=True)
class Outcome:
    status: str  # a key of LABELS
    artifact: str  # what it is: "source=imagenet backbone=resnet50", "target=cub200", ...
    detail: str  # where it lies, or why it is not ready

    def line(self) -> str:
        return f"{LABELS[self.status]:<23} {self.artifact}: {self.detail}"


@dataclass
class Artifact:
    name: str
    key: str
    get: Callable[[bool], tuple[bool, str]]  # (download?) -> (downloaded now, where it lies); raises if not ready
    paths: dict | None = None  # the config's `paths` (the mirror, the download timeout and retries)


def paths_of(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.paths, resolve=True)


def _key(node) -> str:
    return repr(sorted(node.items()) if isinstance(node, dict) else node)


def source_artifacts(cfg: DictConfig, compose: Callable[[list[str]], DictConfig] | None = None) -> list[Artifact]:
    own_keys(cfg.source)  # a job of a sweep over sources: its source's own keys, as the job keeps
    source, backbone = build("source", cfg.source, "source"), cfg.backbone.name
    path = source.local_file(backbone)
    if path is None:  # random or generated weights: nothing to fetch
        return []
    before: list[Artifact] = []
    if isinstance(source, PretrainedSource) and compose is not None and not path.exists():
        pretraining = compose(["experiment=pretrain_source", f"target={source.dataset}", f"backbone={backbone}"])
        before = artifacts(pretraining, compose)

    def get(download: bool) -> tuple[bool, str]:
        existed = path.exists()
        if not existed and source.downloadable and not download:
            raise NotFetched(f"not at {path} yet (downloaded by --fetch)")
        source.backbone_state(backbone)  # downloads, verifies and loads it, as a job does
        return not existed, str(source.local_file(backbone))  # where it lies now (a Hub file: its snapshot)

    name = f"source={cfg.source.name} backbone={backbone}"
    identity = _key({"source": OmegaConf.to_container(cfg.source, resolve=True), "backbone": backbone})
    return [*before, Artifact(name, identity, get, paths_of(cfg))]


def target_artifacts(cfg: DictConfig) -> list[Artifact]:
    target = build("target", cfg.target, "target")
    if not target.reads_files:
        return []
    settings = OmegaConf.to_container(cfg.target, resolve=True)
    where = str(settings.get("root", ""))
    data = data_identity(settings)
    paths = paths_of(cfg)

    def get_data(download: bool) -> tuple[bool, str]:
        if download:
            with at_once(f"fetching target={target.name} into {where}"):  # torchvision's downloads too
                return target.fetch(), where
        try:
            target.check()
        except MissingData:
            raise
        except SafetransferError as error:
            raise NotFetched(one_line(error)) from None
        return False, where

    found = [Artifact(f"target={target.name}", _key(data), get_data, paths)]
    if target.sample_list == "bss":
        name = sample_lists.bss_list_file(target.name, target.sampling_rate)
        path = Path(str(target.sample_list_dir or ".")).expanduser() / name

        def get_list(download: bool) -> tuple[bool, str]:
            existed = path.exists()
            if not existed and not download:
                raise NotFetched(f"not at {path} yet (downloaded by --fetch)")
            sample_lists.bss_list(target.name, target.sampling_rate, path.parent)
            matched = target.listed_train_indices()  # every listed image found in the dataset, once
            return not existed, f"{path} ({len(matched)} images matched)"

        found.append(
            Artifact(
                f"sample_list=bss target={target.name} rate={target.sampling_rate:g}",
                _key({"list": str(path), "data": data}),
                get_list,
                paths,
            )
        )
    elif target.sample_list:
        found.append(
            Artifact(
                f"sample_list={target.sample_list}",
                _key({"list": str(target.sample_list), "data": data}),
                lambda download: (False, f"{len(target.listed_train_indices())} images matched"),
            )
        )
    return found


def artifacts(cfg: DictConfig, compose: Callable[[list[str]], DictConfig] | None = None) -> list[Artifact]:
    """What a job of `cfg` reads: its source (and, for a source made by pretraining, what that
    run reads), its target's data and its sample list."""
    return [*source_artifacts(cfg, compose), *target_artifacts(cfg)]


def obtain(artifact: Artifact, download: bool) -> Outcome:
    try:
        with network(artifact.paths):
            downloaded, where = artifact.get(download)
    except NotFetched as error:
        return Outcome("missing", artifact.name, str(error))
    except MissingData as error:
        return Outcome("manual", artifact.name, one_line(error))
    except SafetransferError as error:
        return Outcome("failed", artifact.name, one_line(error))
    return Outcome("downloaded" if downloaded else "present", artifact.name, where)


def fetch_all(configs: Iterable[DictConfig], download: bool, compose=None, report=print) -> list[Outcome]:
    """Each artifact of `configs` once: downloaded where missing (`download`) or only checked;
    `report` gets each outcome's line as soon as it is known."""
    seen, outcomes = set(), []
    for cfg in configs:
        for artifact in artifacts(cfg, compose):
            if artifact.key in seen:
                continue
            seen.add(artifact.key)
            outcomes.append(obtain(artifact, download))
            report(outcomes[-1].line())
    return outcomes


def summary(outcomes: list[Outcome], fetch_command: str) -> str:
    ready = sum(o.status in READY for o in outcomes)
    if ready == len(outcomes):
        return f"data: ready ({ready} of {len(outcomes)} artifacts present and verified)"
    return (
        f"data: NOT ready ({ready} of {len(outcomes)} artifacts present); {fetch_command} downloads what can be "
        "downloaded, the lines above say what cannot and how to get it"
    )
