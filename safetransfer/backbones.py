"""Backbones (torchvision ResNets) and the transfer network: backbone w_S plus a new head.

The names in the config (`backbone=resnet18`) are torchvision's model names, and they
are the names that appear in the results tables.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

BACKBONES = {"resnet18": 512, "resnet50": 2048}  # name -> dimension of the pooled features


def create_backbone(name: str) -> nn.Module:
    """A randomly initialised torchvision backbone whose forward returns pooled features."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    backbone = torchvision.models.get_model(name, weights=None)
    backbone.fc = nn.Identity()
    return backbone


class TransferNet(nn.Module):
    """The target network: shared backbone (w_S, initialised from the source) and a new head."""

    def __init__(self, backbone_name: str, num_classes: int):
        super().__init__()
        self.backbone_name = backbone_name
        self.backbone = create_backbone(backbone_name)
        self.head = nn.Linear(BACKBONES[backbone_name], num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features the head reads (BSS works on the latter)."""
        features = self.backbone(images)
        return self.head(features), features

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }
