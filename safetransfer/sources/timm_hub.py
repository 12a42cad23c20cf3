"""timm's pretrained weights from the Hugging Face Hub (`source=timm source.model=resnet50.a1_in1k`).

The weights come through huggingface_hub's own cache and download code (`hf_hub_download`): the cache is
huggingface_hub's (`HF_HOME`, `HF_HUB_CACHE`), offline use is its (`HF_HUB_OFFLINE=1` reads the cached
snapshot), and its endpoint is `paths.mirror` when set, else `HF_ENDPOINT` as huggingface_hub reads it.
The file is the repository's `model.safetensors` (read without pickle), or `pytorch_model.bin` where a
repository has no safetensors file (read with weights_only). What huggingface_hub does not check, this
source does: a file stored with git-lfs is named in the cache by its sha256 (the Hub's ETag), which is
compared with the file's own digest; a file that is not a safetensors file (an HTML page from a proxy,
a cut file) is refused. Either is deleted from the cache and named in one line.

`source.path` reads a local folder instead: a snapshot folder of the cache, or one made by
`hf download timm/<model.tag> --local-dir DIR`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from safetransfer.common.downloads import current_network, file_digest, is_html
from safetransfer.common.errors import ConfigError, DownloadError, MissingData
from safetransfer.common.registry import register
from safetransfer.common.signals import at_once
from safetransfer.sources import checkpoint_files
from safetransfer.sources.base import Source, SourceWeights
from safetransfer.training.backbones import TIMM, timm_architecture

log = logging.getLogger(__name__)
for _client in ("httpx", "httpx2"):  # huggingface_hub's HTTP client logs every request at INFO
    logging.getLogger(_client).setLevel(logging.WARNING)

SAFETENSORS, PICKLED = "model.safetensors", "pytorch_model.bin"
SHA256 = re.compile(r"[0-9a-f]{64}")


@register("source", "timm")
class TimmSource(Source):
    """A timm model's pretrained weights: `model` is timm's name with its tag (`resnet50.a1_in1k`; without
    a tag, timm's default weights of the backbone's architecture), `revision` the Hub revision."""

    downloadable = True

    def __init__(self, name: str = "timm", model: str | None = None, path: str | None = None, revision: str = "main"):
        super().__init__(name)
        self.model, self.path, self.revision = model, path, revision

    def tag(self, backbone: str) -> str:
        """`architecture.tag`, checked against the backbone (one line when they differ)."""
        architecture = timm_architecture(backbone)
        if architecture is None:
            raise ConfigError(
                f"source=timm gives timm's weights and backbone.name={backbone} is torchvision's; "
                f"set backbone.name=timm/{(self.model or 'resnet50').split('.')[0]}"
            )
        import timm

        model = self.model or architecture
        if model.split(".")[0] != architecture:
            raise ConfigError(
                f"source.model={model} is a {model.split('.')[0]} and backbone.name={backbone}; "
                f"set backbone.name={TIMM}{model.split('.')[0]}"
            )
        try:
            config = timm.models.get_pretrained_cfg(model, allow_unregistered=False)
        except Exception:  # noqa: BLE001 (timm's RuntimeError for an unknown tag)
            config = None
        if config is None:
            raise ConfigError(
                f"source.model={model}: timm names no such weights; its tags for {architecture}: "
                f"{', '.join(timm.list_pretrained(architecture + '.*')) or 'none'}"
            )
        return f"{architecture}.{config.tag}" if config.tag else architecture

    def repository(self, backbone: str) -> str:
        import timm

        config = timm.models.get_pretrained_cfg(self.tag(backbone))
        if not config.hf_hub_id:
            raise MissingData(
                f"source.model={self.tag(backbone)}: timm publishes these weights outside the Hugging Face Hub "
                f"({config.url or 'no URL'}); download them by hand and use source=file source.path=<the file>"
            )
        return config.hf_hub_id

    def local_file(self, backbone: str) -> Path:
        """The weights file this source reads: in `source.path`, or in huggingface_hub's cache (a path under
        the repository's cache folder, not there yet, when it was never downloaded)."""
        if self.path is not None:
            folder = Path(self.path).expanduser()
            return next((folder / f for f in (SAFETENSORS, PICKLED) if (folder / f).is_file()), folder / SAFETENSORS)
        from huggingface_hub import constants, try_to_load_from_cache

        repository = self.repository(backbone)
        for filename in (SAFETENSORS, PICKLED):
            found = try_to_load_from_cache(repository, filename, revision=self.revision)
            if isinstance(found, str):
                return Path(found)
        return Path(constants.HF_HUB_CACHE) / f"models--{repository.replace('/', '--')}" / SAFETENSORS

    def load(self, backbone: str) -> SourceWeights:
        path = self.fetch(backbone) if self.path is None else self.local_file(backbone)
        if not path.is_file():
            raise MissingData(
                f"source.path={self.path} holds no {SAFETENSORS} or {PICKLED}: give a snapshot folder of the Hub "
                f"cache or a folder made by `hf download {self.repository(backbone)} --local-dir DIR`"
            )
        state = read_weights(path)
        matched, head = checkpoint_files.match_backbone(
            state, backbone, strict=True, origin=f"source.model={self.tag(backbone)} ({path})"
        )
        return SourceWeights(matched, head, label_names(path.parent, head))

    def fetch(self, backbone: str) -> Path:
        """The weights file from huggingface_hub's cache (a file there is used without network, as
        torchvision's cached files are), downloaded when missing; checked either way."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repository, settings = self.repository(backbone), current_network()
        cached = self.local_file(backbone)
        if cached.is_file():
            check_cached(cached, repository)
            return cached
        common = dict(repo_id=repository, revision=self.revision, etag_timeout=settings.timeout_s)
        if settings.mirror:
            common["endpoint"] = settings.mirror
        with at_once(f"downloading {repository}"):
            for filename in (SAFETENSORS, PICKLED):
                try:
                    path = Path(hf_hub_download(filename=filename, **common))
                except EntryNotFoundError:
                    continue  # a repository without safetensors weights: its pickled file
                except Exception as error:  # offline, not in the cache, an HTTP error, a timeout
                    raise DownloadError(
                        f"source.model={self.tag(backbone)}: {filename} of {repository} could not be had "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); on a machine "
                        "without network, run safetransfer-fetch on one with it (the same HF_HOME), or give "
                        "source.path=<a folder with the files>"
                    ) from None
                try:
                    hf_hub_download(filename="config.json", **common)  # the label names, where it has them
                except Exception:  # noqa: BLE001 (optional: a repository without it keeps None)
                    pass
                check_cached(path, repository)
                return path
        raise DownloadError(f"{repository} has neither {SAFETENSORS} nor {PICKLED}")


def check_cached(path: Path, repository: str) -> None:
    """A git-lfs file of huggingface_hub's cache is its blob named by its sha256: compare; and a safetensors
    file must read as one. Either failing deletes the blob and its snapshot link (the next run fetches it)."""
    blob = path.resolve()
    problem = None
    if is_html(blob):
        problem = "an HTML page, not the weights (a proxy or login page answered)"
    elif SHA256.fullmatch(blob.name) and file_digest(blob) != blob.name:
        problem = f"its sha256 {file_digest(blob)[:12]}... is not the Hub's {blob.name[:12]}... (a cut or altered file)"
    elif path.name == SAFETENSORS:
        try:
            from safetensors import safe_open

            with safe_open(str(blob), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001
            problem = f"not a whole safetensors file ({type(error).__name__})"
    if problem is not None:
        blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path.name} of {repository} is {problem}; it is deleted from the cache, fetch it again")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file without pickle; a pickled file with weights_only."""
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return checkpoint_files.read(path, key="source.path")


def label_names(folder: Path, head: dict | None) -> list[str] | None:
    """The classifier's class names: the repository's config.json `label_names` where it has them, else
    timm's ImageNet-1k names for a 1000-way classifier (timm.data.ImageNetInfo)."""
    if head is None:
        return None
    config = folder / "config.json"
    if config.is_file():
        names = json.loads(config.read_text()).get("label_names")
        if names and len(names) == head["weight"].shape[0]:
            return list(names)
    if head["weight"].shape[0] == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return None
