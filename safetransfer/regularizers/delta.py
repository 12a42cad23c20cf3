"""DELTA (Li et al., ICLR 2019): feature-map distance to the source network, weighted per
channel by how much the source model's target predictions rely on that channel.

    alpha/2 * sum_l 1/B sum_b sum_c a_{l,c} ||FM_{l,c}(x_b; w) - FM_{l,c}(x_b; w^0)||^2 / (H_l W_l)

(the regularizer `delta` adds beta/2 ||w_head||^2 as a HeadL2 term).

The attention a_l of layer l is computed once, from the source network on the target's
training images (test-time transform):

1. a new head is fitted on the frozen source network's pooled features (multinomial
   logistic regression, L-BFGS);
2. each channel c of FM_l is zeroed in turn and the increase of the cross-entropy over
   `ablation_images` training images is measured; all channels of a layer are ablated
   in batches (many zeroed copies of the same maps through the rest of the network
   in one forward pass);
3. a_l = softmax(z_l / temperature), z_l the increases standardised over the layer's
   channels.

The a_l sum to one per layer, so with uniform attention (temperature -> infinity) the
feature part equals KnowDist's. Attention is cached on disk per backbone, source,
target, sampling and layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader, Subset

from safetransfer.backbones import STAGES, Features, TransferNet, at_least_fp32, frozen_copy
from safetransfer.regularizers.base import BindContext, Term
from safetransfer.regularizers.knowdist import check_layers, source_maps

log = logging.getLogger(__name__)


def forward_from(backbone: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a ResNet, continuing from the output of `stage`."""
    for later in STAGES[STAGES.index(stage) + 1:]:
        x = getattr(backbone, later)(x)
    return torch.flatten(backbone.avgpool(x), 1)


def forward_to(backbone: nn.Module, stage: str, images: torch.Tensor) -> torch.Tensor:
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    for earlier in STAGES[: STAGES.index(stage) + 1]:
        x = getattr(backbone, earlier)(x)
    return x


@torch.no_grad()
def pooled_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, batch_labels in loader:
        features.append(forward_from(backbone, STAGES[-1], forward_to(backbone, STAGES[-1], images.to(device))))
        labels.append(batch_labels.to(device))
    return torch.cat(features), torch.cat(labels)


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, iterations: int = 100,
             weight_decay: float = 1e-4) -> nn.Linear:
    """Multinomial logistic regression on fixed features (full batch, L-BFGS, deterministic)."""
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator).to(features.device) * 0.01)
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
def channel_loss_increase(backbone: nn.Module, head: nn.Module, stage: str, images: torch.Tensor,
                          labels: torch.Tensor, max_copies: int = 512) -> torch.Tensor:
    """For each channel c of the output of `stage`: mean cross-entropy over `images` with
    channel c zeroed, minus the mean cross-entropy with nothing zeroed. Shape (C,)."""
    maps = forward_to(backbone, stage, images)
    batch, channels = maps.shape[:2]
    baseline = F.cross_entropy(head(forward_from(backbone, stage, maps)), labels)
    per_chunk = max(1, max_copies // batch)
    increases = torch.empty(channels, device=maps.device, dtype=baseline.dtype)
    for start in range(0, channels, per_chunk):
        chunk = torch.arange(start, min(start + per_chunk, channels), device=maps.device)
        copies = maps.unsqueeze(0).repeat(len(chunk), 1, 1, 1, 1)  # (chunk, batch, C, H, W)
        copies[torch.arange(len(chunk), device=maps.device), :, chunk] = 0  # copy j loses channel chunk[j]
        logits = head(forward_from(backbone, stage, copies.flatten(0, 1)))
        losses = F.cross_entropy(logits, labels.repeat(len(chunk)), reduction="none").view(len(chunk), batch)
        increases[chunk] = losses.mean(dim=1) - baseline
    return increases


def attention_from_increases(increases: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over channels of the standardised loss increases, divided by the temperature."""
    spread = increases.std()
    standardised = (increases - increases.mean()) / spread if spread > 0 else torch.zeros_like(increases)
    return torch.softmax(standardised / temperature, dim=0)


def channel_attention(source: nn.Module, context: BindContext, num_classes: int, layers: Sequence[str],
                      temperature: float, ablation_images: int, head_iterations: int,
                      max_copies: int) -> dict[str, torch.Tensor]:
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
        for images, batch_labels in DataLoader(Subset(context.train_data, chosen.tolist()), batch_size=context.batch_size):
            increase = channel_loss_increase(source, head, layer, images.to(device), batch_labels.to(device), max_copies)
            total = increase * len(batch_labels) if total is None else total + increase * len(batch_labels)
        attention[layer] = attention_from_increases(total / count, temperature).cpu()
        log.info("DELTA attention for %s: %d channels, largest weight %.4f", layer, len(total), float(attention[layer].max()))
    log.info("DELTA attention: %d layers over %d images in %.1f s", len(layers), count, time.perf_counter() - start)
    return attention


class DELTA(Term):
    def __init__(self, alpha: float, layers: Sequence[str] = STAGES, temperature: float = 1.0,
                 ablation_images: int = 256, head_iterations: int = 100, max_copies: int = 512, decay: float = 1.0):
        super().__init__(decay)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.alpha = float(alpha)
        self.layers = check_layers(layers)
        self.settings = dict(layers=self.layers, temperature=float(temperature), ablation_images=int(ablation_images),
                             head_iterations=int(head_iterations))
        self.max_copies = int(max_copies)

    def bind(self, model: TransferNet, context: BindContext) -> None:
        from safetransfer.results import atomic_torch_save

        self.source = frozen_copy(model.backbone)
        path = context.cache_path("delta_attention", self.settings)
        compute = lambda: channel_attention(  # noqa: E731
            self.source, context, model.head.out_features, max_copies=self.max_copies, **self.settings)
        if path is None:
            attention = compute()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):
                if not path.exists():
                    atomic_torch_save(compute(), path)
            attention = torch.load(path, map_location="cpu", weights_only=True)
        device = next(model.parameters()).device
        self.attention = {layer: attention[layer].to(device) for layer in self.layers}

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        reference = source_maps(self.source, features)
        distance = sum(
            (at_least_fp32(features.maps[layer] - reference[layer]).square().mean(dim=(2, 3)) * self.attention[layer])
            .sum(dim=1).mean()
            for layer in self.layers)
        return self.alpha * self.scale / 2 * distance
