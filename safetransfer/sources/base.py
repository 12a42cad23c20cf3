"""A source: where the backbone's initial weights w_S^0 come from.

A source is one class in this folder plus one YAML in conf/source/; it returns the backbone's
weights and, where it has them, its own classifier and class names (or None for random
initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from safetransfer.common.downloads import file_digest


@dataclass
class SourceWeights:
    """What a source gives: the backbone's weights w_S^0 and, where the source has them, its own
    classifier (the source task's head: `weight`, classes x features, and `bias`) and the names of
    its classes, for the methods that read the source model's predictions (LwF, Co-Tuning)."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None
    classes: list[str] | None = None


class Source:
    def __init__(self, name: str):
        self.name = name

    #: whether a missing checkpoint is downloaded (from its publisher) on first use
    downloadable = False

    def load(self, backbone: str) -> SourceWeights | None:
        """The source's weights for `backbone` (None: keep the random initialisation)."""
        raise NotImplementedError

    def backbone_state(self, backbone: str) -> dict[str, torch.Tensor] | None:
        """The backbone's weights alone."""
        found = self.load(backbone)
        return None if found is None else found.backbone

    def local_file(self, backbone: str) -> Path | None:
        """The checkpoint file `load` reads (None: it reads none, or makes its own)."""
        return None

    def read_file(self, backbone: str) -> Path | None:
        """The file `load` read from (its own making included), for provenance."""
        return self.local_file(backbone)


def own_keys(source_cfg) -> list[str]:
    """The keys of a source config its class does not take (`source.dataset` given to a sweep over
    source=pretrained,demo,scratch belongs to pretrained only): removed from `source_cfg`, returned."""
    from omegaconf import open_dict

    from safetransfer.common.registry import parameters

    taken = parameters("source", source_cfg, "source")
    foreign = [str(k) for k in source_cfg.keys() if taken is not None and k not in taken]
    with open_dict(source_cfg):
        for key in foreign:
            del source_cfg[key]
    return foreign


def provenance(source: Source, backbone: str) -> dict:
    """What a run started from: the source's name and, when it reads one, its checkpoint file
    and that file's sha256 (recorded in each seed's metrics.json)."""
    path = source.read_file(backbone)
    found = path is not None and Path(path).is_file()
    return {"name": source.name, "file": str(path) if found else None, "sha256": file_digest(path) if found else None}
