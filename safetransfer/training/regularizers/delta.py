"""DELTA (Li et al., "DELTA: DEep Learning Transfer using Feature Map with Attention for
Convolutional Networks", ICLR 2019): feature-map distance to the source network, weighted
per channel by how much the source model's target predictions rely on that channel.

As the paper writes it: the attention-weighted sum over channels of the squared L2
distance over positions, averaged over the batch's images,

    Omega(w) = alpha * 1/B sum_b sum_l sum_c a_{l,c} ||FM_{l,c}(x_b; w) - FM_{l,c}(x_b; w^0)||^2

(the regularizer `delta` adds beta/2 ||w_head||^2 as a HeadL2 term).
`convention: released_code` computes the authors' released code's form instead
(lixingjian/DELTA train.py, reg_att_fea_map; TLlib's AttentionBehavioralRegularization):
alpha * 1/2 sum_b sum_l C_l/(H_l W_l) sum_c a_{l,c} ||...||^2, so that an alpha from that
code means the same here.

Where the paper is silent, the authors' released code is followed:
- which maps: `at: last_conv` regularizes the output of each stage's last convolution
  (before its BatchNorm and the residual sum: layer1.2.conv3 ... in ResNet-50), as their
  code does; `at: stage` the stage outputs.
- the attention is computed once, over the target's training images, not per image (the
  paper's W_j(x_i, y_i) is per image; their code averages the loss increases over 4
  batches): a new head is fitted on the frozen source network's pooled features
  (multinomial logistic regression, L-BFGS; their code trains it by SGD); each channel c is
  zeroed in turn (their code zeroes the convolution's filter, which is the same as zeroing
  its output channel) and the increase of the cross-entropy over `ablation_images`
  training images is measured, all channels of a layer in batches of zeroed copies;
- a_l = softmax(z_l / temperature), z_l the increases standardised over the layer's
  channels with the population std, temperature 5 (their code: (x - mean) / np.std(x),
  softmax(x / 5)).

The a_l sum to one per layer. Attention is cached on disk per backbone, source, target,
sampling and settings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from safetransfer.common.registry import register
from safetransfer.training.backbones import FAMILY_STAGES, Features, TransferNet, at_least_fp32, frozen_copy, last_conv
from safetransfer.training.regularizers.base import BindContext, Term
from safetransfer.training.regularizers.knowdist import (
    batch_reduction,
    check_convention,
    check_layers,
    source_maps,
    tapped_layers,
)

log = logging.getLogger(__name__)

#: the channel ablation below runs a ResNet stage by stage (as the DELTA authors' code does)
STAGES = FAMILY_STAGES["resnet"]


#: a ResNet's stem activation and global pooling, by torchvision's name and timm's
ACTIVATIONS, POOLS = ("relu", "act1"), ("avgpool", "global_pool")


def resnet_part(backbone: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(backbone, name) for name in names if hasattr(backbone, name)), None)


def forward_from(backbone: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a ResNet (torchvision's or timm's), continuing from the output of `stage`."""
    for later in STAGES[STAGES.index(stage) + 1 :]:
        x = getattr(backbone, later)(x)
    return torch.flatten(resnet_part(backbone, POOLS)(x), 1)


def forward_to(backbone: nn.Module, stage: str, images: torch.Tensor, last_block: bool = True) -> torch.Tensor:
    """The output of `stage`; with last_block=False, the input of its last block."""
    x = backbone.maxpool(resnet_part(backbone, ACTIVATIONS)(backbone.bn1(backbone.conv1(images))))
    for earlier in STAGES[: STAGES.index(stage)]:
        x = getattr(backbone, earlier)(x)
    blocks = getattr(backbone, stage)
    return blocks(x) if last_block else blocks[:-1](x)


def ablation(backbone: nn.Module, stage: str, at: str, images: torch.Tensor):
    """(run, channels): run(mask) gives the pooled features of the images once per row of
    `mask` (copies, channels), with the regularized map's channels multiplied by that row."""
    if at == "stage":
        maps = forward_to(backbone, stage, images)

        def run(mask: torch.Tensor) -> torch.Tensor:
            return forward_from(backbone, stage, (maps.unsqueeze(0) * mask[:, None, :, None, None]).flatten(0, 1))

        return run, maps.shape[1]
    block_input = forward_to(backbone, stage, images, last_block=False)
    block = getattr(backbone, stage)[-1]
    conv = backbone.get_submodule(last_conv(stage, backbone))

    def run(mask: torch.Tensor) -> torch.Tensor:
        copies = block_input.unsqueeze(0).expand(len(mask), *block_input.shape).flatten(0, 1)
        per_copy = mask.repeat_interleave(len(block_input), dim=0)[:, :, None, None]
        handle = conv.register_forward_hook(lambda module, inputs, output: output * per_copy)
        try:
            return forward_from(backbone, stage, block(copies))
        finally:
            handle.remove()

    return run, conv.out_channels


@torch.no_grad()
def pooled_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, batch_labels in loader:
        features.append(forward_from(backbone, STAGES[-1], forward_to(backbone, STAGES[-1], images.to(device))))
        labels.append(batch_labels.to(device))
    return torch.cat(features), torch.cat(labels)


def fit_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, iterations: int = 100, weight_decay: float = 1e-4
) -> nn.Linear:
    """Multinomial logistic regression on fixed features (full batch, L-BFGS, deterministic)."""
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(features.shape[1], num_classes).to(features.device, features.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay / 2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.requires_grad_(False)


@torch.no_grad()
def channel_loss_increase(
    backbone: nn.Module,
    head: nn.Module,
    stage: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_copies: int = 512,
    at: str = "last_conv",
) -> torch.Tensor:
    """For each channel c of the regularized map of `stage` (see `ablation`): mean
    cross-entropy over `images` with channel c zeroed, minus the mean cross-entropy with
    nothing zeroed. Shape (C,)."""
    run, channels = ablation(backbone, stage, at, images)
    batch = len(images)
    keep = torch.ones(1, channels, device=images.device)
    baseline = F.cross_entropy(head(run(keep)), labels)
    per_chunk = max(1, max_copies // batch)
    increases = torch.empty(channels, device=images.device, dtype=baseline.dtype)
    for start in range(0, channels, per_chunk):
        chunk = torch.arange(start, min(start + per_chunk, channels), device=images.device)
        mask = keep.repeat(len(chunk), 1)
        mask[torch.arange(len(chunk), device=images.device), chunk] = 0  # copy j loses channel chunk[j]
        logits = head(run(mask))
        losses = F.cross_entropy(logits, labels.repeat(len(chunk)), reduction="none").view(len(chunk), batch)
        increases[chunk] = losses.mean(dim=1) - baseline
    return increases


def attention_from_increases(increases: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over channels of the standardised loss increases (population std, as the
    authors' code's np.std), divided by the temperature."""
    spread = increases.std(correction=0)
    standardised = (increases - increases.mean()) / spread if spread > 0 else torch.zeros_like(increases)
    return torch.softmax(standardised / temperature, dim=0)


def channel_attention(
    source: nn.Module,
    context: BindContext,
    num_classes: int,
    layers: Sequence[str],
    temperature: float,
    ablation_images: int,
    head_iterations: int,
    max_copies: int,
    at: str = "last_conv",
) -> dict[str, torch.Tensor]:
    """DELTA's per-channel attention for each layer, from the source network on target data."""
    if context.train_data is None:
        raise ValueError("DELTA needs the target training data to compute its channel attention")
    device = context.device
    start = time.perf_counter()
    loader = DataLoader(context.train_data, batch_size=context.batch_size, shuffle=False)
    features, labels = pooled_features(source, loader, device)
    head = fit_head(features, labels, num_classes, head_iterations)
    count = min(ablation_images, len(context.train_data))
    chosen = torch.randperm(len(context.train_data), generator=torch.Generator().manual_seed(0))[:count]
    attention = {}
    for layer in layers:
        total = None
        for images, batch_labels in DataLoader(
            Subset(context.train_data, chosen.tolist()), batch_size=context.batch_size
        ):
            increase = channel_loss_increase(
                source, head, layer, images.to(device), batch_labels.to(device), max_copies, at
            )
            total = increase * len(batch_labels) if total is None else total + increase * len(batch_labels)
        attention[layer] = attention_from_increases(total / count, temperature).cpu()
        log.info(
            "DELTA attention for %s: %d channels, largest weight %.4f", layer, len(total), float(attention[layer].max())
        )
    log.info("DELTA attention: %d layers over %d images in %.1f s", len(layers), count, time.perf_counter() - start)
    return attention


RECIPE = "population-std"  # change when channel_attention computes something else for the same settings


@register("term", "delta")
class DELTA(Term):
    PLACES = ("last_conv", "stage")
    coefficients = ("alpha",)

    def __init__(
        self,
        alpha: float,
        layers: Sequence[str] | None = None,
        at: str = "last_conv",
        temperature: float = 5.0,
        convention: str = "paper",
        ablation_images: int = 256,
        head_iterations: int = 100,
        max_copies: int = 512,
        decay: float = 1.0,
    ):
        super().__init__(decay)
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if at not in self.PLACES:
            raise ValueError(f"at={at!r}; allowed: {', '.join(self.PLACES)}")
        self.alpha = self.coefficient("alpha", alpha)
        self.layers = check_layers(layers)
        self.convention = check_convention(convention)
        self.settings = dict(
            layers=self.layers,
            at=at,
            temperature=float(temperature),
            ablation_images=int(ablation_images),
            head_iterations=int(head_iterations),
        )
        self.max_copies = int(max_copies)

    def check_backbone(self, model: TransferNet, batch_size: int | None = None) -> list[str]:
        """DELTA's channel ablation and its `last_conv` maps follow the blocks of a ResNet (its
        authors' code; torchvision's or timm's, whose stem activation and pooling are `act1` and
        `global_pool`); its layers are stages of one. Returns them."""
        layers = tapped_layers(self.layers, model)
        parts = (resnet_part(model.backbone, names) for names in (ACTIVATIONS, POOLS))
        resnet = all(hasattr(model.backbone, n) for n in ("conv1", "bn1", "maxpool", *STAGES)) and all(
            part is not None for part in parts
        )
        if not resnet or any(layer not in STAGES for layer in layers):
            raise ValueError(
                f"layers={layers} of backbone {model.backbone_name}: DELTA's channel attention ablates channels "
                f"of ResNet stages ({', '.join(STAGES)}); choose a ResNet backbone, or KnowDist for this one"
            )
        return layers

    def bind(self, model: TransferNet, context: BindContext) -> None:
        from safetransfer.common.atomic import built_once

        layers = self.check_backbone(model)
        self.settings["layers"] = layers
        self.source = frozen_copy(model.backbone)
        self.maps = {
            layer: last_conv(layer, model.backbone) if self.settings["at"] == "last_conv" else layer for layer in layers
        }
        self.taps = sorted(self.maps.values())
        model.taps.update(set(self.taps) - set(model.stages))
        # the recipe's name is part of the cache key: attention cached by an earlier recipe is recomputed
        path = context.cache_path("delta_attention", {**self.settings, "recipe": RECIPE})
        compute = lambda: channel_attention(  # noqa: E731
            self.source, context, model.head.out_features, max_copies=self.max_copies, **self.settings
        )
        attention = compute() if path is None else built_once(path, compute, "DELTA's channel attention")
        device = next(model.parameters()).device
        self.attention = {layer: attention[layer].to(device) for layer in layers}

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        reference = source_maps(self.source, features, self.taps)
        per_image = 0
        for layer, name in self.maps.items():
            squared = at_least_fp32(features.maps[name] - reference[name]).square().sum(dim=(2, 3))  # (B, C)
            weighted = (squared * self.attention[layer]).sum(dim=1)
            if self.convention == "released_code":
                channels, height, width = features.maps[name].shape[1:]
                weighted = weighted * (channels / (height * width))
            per_image = per_image + weighted
        return self.alpha * self.scale * batch_reduction(per_image, self.convention)
