"""The backbone's normalization layers (config group `normalization`): BatchNorm as the source has it,
or StochNorm (Kou et al., "Stochastic Normalization", NeurIPS 2020).

StochNorm replaces every BatchNorm of the backbone. In training, for each channel and each step it
normalizes with the moving statistics (with probability p) or with the batch's (1 - p):

    z = s * BN_moving(x) + (1 - s) * BN_batch(x),   s ~ Bernoulli(p) per channel

and the moving statistics are updated from the batch as BatchNorm updates them; in evaluation it is
BatchNorm's evaluation. Read from TLlib's tllib/normalization/stochnorm.py (thuml/Transfer-Learning-
Library): the moving-statistics branch is computed before the update, and p is 0.5 in both the paper's
and TLlib's code. TLlib's `convert_model(module, p)` passes p as the layer's fifth constructor argument,
which is `track_running_stats`, so its `--prob` never reaches the layers (they keep the default 0.5);
here p is honoured. It is not a term of Omega: it composes with every regularizer and direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from safetransfer.common.registry import register


class _StochNorm:
    """The StochNorm forward over a BatchNorm class (mixed in before it): same parameters, buffers and
    state_dict keys as the BatchNorm it replaces."""

    p: float = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.running_mean is None:  # evaluation (or no moving statistics): BatchNorm's
            return super().forward(x)
        self._check_input_dim(x)
        with torch.no_grad():  # the moving statistics as they are before this batch updates them
            mean, var = self.running_mean.clone(), self.running_var.clone()
        moving = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        batch = super().forward(x)  # BatchNorm in training mode: the batch's statistics, moving ones updated
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        s = torch.rand(self.num_features, device=x.device) < self.p  # per channel: True -> moving statistics
        return torch.where(s.view(shape), moving, batch)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class StochNorm1d(_StochNorm, nn.BatchNorm1d):
    pass


class StochNorm2d(_StochNorm, nn.BatchNorm2d):
    pass


class StochNorm3d(_StochNorm, nn.BatchNorm3d):
    pass


_REPLACEMENTS = {nn.BatchNorm1d: StochNorm1d, nn.BatchNorm2d: StochNorm2d, nn.BatchNorm3d: StochNorm3d}


@register("normalization", "batchnorm")
class BatchNorm:
    """The backbone's own BatchNorm layers, unchanged."""

    name = "BatchNorm"

    def convert(self, module: nn.Module) -> int:
        return 0


@register("normalization", "stochnorm")
class StochNorm:
    """Every BatchNorm of the backbone replaced by StochNorm with probability `p` (its weights,
    running statistics and device kept)."""

    name = "StochNorm"

    def __init__(self, p: float = 0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p} must be a probability in [0, 1] (the paper's and TLlib's: 0.5)")
        self.p = float(p)

    def convert(self, module: nn.Module) -> int:
        """Replace the BatchNorm layers under `module` in place; returns how many."""
        count = 0
        for name, child in list(module.named_children()):
            replacement = _REPLACEMENTS.get(type(child))
            if replacement is None:
                count += self.convert(child)
                continue
            layer = replacement(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device=child.weight.device if child.affine else None)
            layer.load_state_dict(child.state_dict())
            layer.p = self.p
            layer.train(child.training)
            setattr(module, name, layer)
            count += 1
        return count
