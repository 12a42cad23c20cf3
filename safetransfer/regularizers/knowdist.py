"""KnowDist (DTNH paper, Equation 3): keep the target network's feature maps close to
those of the frozen source network on the same images.

    Omega(w) = alpha/2 * sum_l 1/B sum_b ||FM_l(x_b; w) - FM_l(x_b; w^0)||^2 / (C_l H_l W_l)

FM_l is the output of stage l (layer1..layer4 by default), w^0 the source weights. Each
layer's squared distance is divided by its size C_l x H_l x W_l (a mean over channels
and positions), so that every layer weighs the same whatever its resolution, and the
sum is averaged over the batch. The source network runs in eval mode without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safetransfer.backbones import STAGES, Features, TransferNet, at_least_fp32, forward_features, frozen_copy
from safetransfer.regularizers.base import BindContext, Term


def source_maps(source: torch.nn.Module, features: Features) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return forward_features(source, features.images).maps


def check_layers(layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    unknown = [layer for layer in layers if layer not in STAGES]
    if unknown or not layers:
        raise ValueError(f"layers={layers}: choose one or more of {', '.join(STAGES)}")
    return layers


class KnowDist(Term):
    def __init__(self, alpha: float, layers: Sequence[str] = STAGES, decay: float = 1.0):
        super().__init__(decay)
        self.alpha = float(alpha)
        self.layers = check_layers(layers)

    def bind(self, model: TransferNet, context: BindContext) -> None:
        self.source = frozen_copy(model.backbone)

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        reference = source_maps(self.source, features)
        distance = sum(at_least_fp32(features.maps[layer] - reference[layer]).square().mean(dim=(1, 2, 3)).mean()
                       for layer in self.layers)
        return self.alpha * self.scale / 2 * distance
