"""Published sources, downloaded from their publishers and checked against pinned digests:
torchvision's ImageNet weights and CSAIL's Places365 ResNets."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from safetransfer.common.downloads import download, file_digest
from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import register
from safetransfer.sources import checkpoint_files
from safetransfer.sources.base import Source, SourceWeights
from safetransfer.training.backbones import TIMM

log = logging.getLogger(__name__)


@register("source", "imagenet")
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

        if backbone.startswith(TIMM):
            raise ConfigError(
                f"source=imagenet gives torchvision's weights, and backbone.name={backbone} is timm's: use "
                f"source=timm (source.model=<{backbone[len(TIMM) :]}.tag>, e.g. one ending in .tv_in1k for "
                "torchvision's own weights in timm's form)"
            )
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

    def load(self, backbone: str) -> SourceWeights:
        url, path, checksum = self.published(backbone)
        download(url, path, checksum, vouch="source.sha256")
        state, _, head = checkpoint_files.load_backbone(path, backbone, key="file", hint=not_published(path))
        return SourceWeights(state, head, list(self.resolve(backbone).meta.get("categories") or []) or None)


@register("source", "places365")
class Places365Source(Source):
    """The CSAIL Places365 ResNets (`<backbone>_places365.pth.tar` of the places365 model
    release), cached beside torchvision's files ($TORCH_HOME/hub/checkpoints). The file's
    sha256 is checked against `sha256[<backbone>]` after download and before every use;
    the checkpoint's `module.` prefix and dict layout are converted, its 365-way head kept apart."""

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

    def load(self, backbone: str) -> SourceWeights:
        """The backbone and CSAIL's 365-way classifier (the category names are a file of their own,
        categories_places365.txt, which this source does not fetch: `classes` is None)."""
        url, path, checksum = self.published(backbone)
        download(url, path, checksum, vouch=f"source.sha256.{backbone}")
        if checksum is None:
            actual = file_digest(path)
            log.warning(
                "%s has no pinned sha256 to check against; its sha256 is %s: pin it with source.sha256.%s=%s",
                path,
                actual,
                backbone,
                actual,
            )
        state, _, head = checkpoint_files.load_backbone(path, backbone, key="file", hint=not_published(path))
        return SourceWeights(state, head)


def not_published(path: Path) -> str:
    return f"it is not the published file: delete {path} to download it again"


def hub_path(url: str) -> Path:
    """Where torch.hub keeps the published file of `url` ($TORCH_HOME/hub/checkpoints/<file name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
