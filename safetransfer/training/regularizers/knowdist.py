"""KnowDist (DTNH paper, Equation 3): keep the target network's feature maps close to
those of the frozen source network on the same images.

    Omega(w) = alpha * 1/B sum_b sum_l ||FM_l(x_b; w) - FM_l(x_b; w^0)||^2

a mean over the batch's images and a SUM over the filters and positions of each map, as
the paper writes it (alpha is its regularization coefficient lambda). FM_l is the output
of stage l (by default the backbone family's stages, layer1..layer4 for a ResNet; any
modules of the backbone by name with `layers=`), w^0 the source weights; the source
network runs in eval mode without gradient.

`convention: released_code` instead computes alpha * 1/2 sum_b sum_l ||...||^2, the
"fea_map" term of the DELTA authors' released code (lixingjian/DELTA, train.py) and
TLlib's BehavioralRegularization (both sum over the batch and halve): an alpha taken from
those codes means the same there; in the paper convention it corresponds to
alpha_paper = alpha_code * B / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safetransfer.common.registry import register
from safetransfer.training.backbones import (
    Features,
    TransferNet,
    at_least_fp32,
    check_modules,
    forward_features,
    frozen_copy,
    output_ranks,
)
from safetransfer.training.regularizers.base import BindContext, Term

CONVENTIONS = ("paper", "released_code")


def source_maps(source: torch.nn.Module, features: Features, taps: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return forward_features(source, features.images, taps).maps


def check_layers(layers: Sequence[str] | None) -> list[str] | None:
    """None (the backbone's stages) or a non-empty list of module names; which modules the
    backbone has is checked by `check_backbone`."""
    if layers is None:
        return None
    if isinstance(layers, str) or not layers or not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"layers={layers} must be a non-empty list of module names, e.g. [layer3, layer4]")
    return list(layers)


def tapped_layers(layers: list[str] | None, model: TransferNet) -> list[str]:
    """The modules a feature-space term compares: `layers`, or the backbone's stages."""
    return check_modules(model.backbone, model.stages if layers is None else layers, "layers", model.stages)


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; allowed: {', '.join(CONVENTIONS)}")
    return convention


def batch_reduction(per_image: torch.Tensor, convention: str) -> torch.Tensor:
    """The paper's mean over the batch's images, or the released codes' half sum."""
    return per_image.mean() if convention == "paper" else per_image.sum() / 2


@register("term", "knowdist")
class KnowDist(Term):
    coefficients = ("alpha",)

    def __init__(
        self, alpha: float, layers: Sequence[str] | None = None, convention: str = "paper", decay: float = 1.0
    ):
        super().__init__(decay)
        self.alpha = self.coefficient("alpha", alpha)
        self.layers = check_layers(layers)
        self.convention = check_convention(convention)

    def check_backbone(self, model: TransferNet, batch_size: int | None = None) -> None:
        """The modules exist and give feature maps (batch, channels, height, width), not vectors."""
        layers = tapped_layers(self.layers, model)
        flat = {name: rank for name, rank in (output_ranks(model.backbone, layers) or {}).items() if rank != 4}
        if flat:
            name, rank = next(iter(flat.items()))
            example = ", ".join(model.stages) or "a convolution block"
            raise ValueError(
                f"layers={layers}: {name or 'the backbone itself'} gives {rank}-D outputs, not feature maps "
                f"(batch, channels, height, width); tap modules that give maps, e.g. {example}"
            )

    def bind(self, model: TransferNet, context: BindContext) -> None:
        self.maps = tapped_layers(self.layers, model)
        model.taps.update(set(self.maps) - set(model.stages))
        self.source = frozen_copy(model.backbone)

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        reference = source_maps(self.source, features, self.maps)
        per_image = sum(
            at_least_fp32(features.maps[layer] - reference[layer]).square().sum(dim=(1, 2, 3)) for layer in self.maps
        )
        return self.alpha * self.scale * batch_reduction(per_image, self.convention)
