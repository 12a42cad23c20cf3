"""Backbones (torchvision ResNets) and the transfer network: backbone w_S plus a new head.

The names in the config (`backbone=resnet18`) are torchvision's model names, and they
are the names that appear in the results tables.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

BACKBONES = {"resnet18": 512, "resnet50": 2048}  # name -> dimension of the pooled features
STAGES = ("layer1", "layer2", "layer3", "layer4")  # the feature maps the feature-space terms compare


def create_backbone(name: str) -> nn.Module:
    """A randomly initialised torchvision backbone whose forward returns pooled features."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    backbone = torchvision.models.get_model(name, weights=None)
    backbone.fc = nn.Identity()
    return backbone


@dataclass
class Features:
    """What one forward pass saw: the input images, the stage outputs and the pooled features."""

    images: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None


def last_conv(stage: str, backbone: nn.Module) -> str:
    """The name of a stage's last convolution (`layer4.1.conv2` in ResNet-18, `layer4.2.conv3`
    in ResNet-50): the map the DELTA authors' released code regularizes, before its BatchNorm
    and the residual sum."""
    block = getattr(backbone, stage)[-1]
    conv = "conv3" if hasattr(block, "conv3") else "conv2"
    return f"{stage}.{len(getattr(backbone, stage)) - 1}.{conv}"


def forward_features(backbone: nn.Module, images: torch.Tensor, taps: Iterable[str] = ()) -> Features:
    """Run a torchvision ResNet stage by stage, keeping each stage's output map, and the
    outputs of the modules named in `taps` (e.g. `layer4.1.conv2`) under their names."""
    maps = {}
    handles = [
        backbone.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: maps.__setitem__(name, output)
        )
        for name in taps
    ]
    try:
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        for stage in STAGES:
            x = getattr(backbone, stage)(x)
            maps[stage] = x
    finally:
        for handle in handles:
            handle.remove()
    return Features(images, maps, torch.flatten(backbone.avgpool(x), 1))


class TransferNet(nn.Module):
    """The target network: shared backbone (w_S, initialised from the source) and a new head."""

    def __init__(self, backbone_name: str, num_classes: int):
        super().__init__()
        self.backbone_name = backbone_name
        self.backbone = create_backbone(backbone_name)
        self.head = nn.Linear(BACKBONES[backbone_name], num_classes)
        #: inner maps (module names of the backbone) that a term reads besides the stage outputs
        self.taps: set[str] = set()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        """Logits and the features the regularizers read (stage maps and taps for KnowDist
        and DELTA, pooled features for BSS)."""
        features = forward_features(self.backbone, images, sorted(self.taps))
        return self.head(features.pooled), features

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reductions of autocast's half-precision outputs are done in fp32 (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def frozen_copy(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` that never changes: eval mode (BatchNorm uses its running
    statistics) and no gradients. The feature-space terms compare against it."""
    source = copy.deepcopy(backbone).eval()
    for p in source.parameters():
        p.requires_grad_(False)
    return source
