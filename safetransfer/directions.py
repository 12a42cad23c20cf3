"""Direction strategies: how the empirical-loss gradient g_J and the regularizer
gradient g_Omega become the step direction d.

Both gradients are lists aligned with the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safetransfer.errors import ConfigError
from safetransfer.methods import method_label


def dot(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    """<x, y> with all tensors of each list seen as one vector: each list laid end to end
    (one concatenation) and one dot product, a handful of kernels instead of one per tensor
    (on a GPU, a step's time goes largely to launching kernels)."""
    return torch.dot(torch.cat([a.reshape(-1) for a in x]), torch.cat([b.reshape(-1) for b in y]))


def per_tensor_dots(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.vdot(a.flatten(), b.flatten()) for a, b in zip(x, y)])


class Direction:
    """Turns (g_J, g_Omega) into d.

    To spare a copy of the weights' size at every step, d may be written into g_J's
    storage: a caller that needs g_J afterwards passes a copy.
    """

    #: False when d depends on g_J and g_Omega only through their sum, which lets the
    #: training step get d from a single backward pass of J + Omega.
    needs_both_gradients = True

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def method_name(self, regularizer_name: str) -> str:
        """The method's name in results tables, e.g. 'L2-SP' or 'DTNH (L2-SP)' (safetransfer.methods)."""
        return method_label(regularizer_name, type(self).__name__)


class Sum(Direction):
    """d = g_J + g_Omega: ordinary regularized fine-tuning."""

    needs_both_gradients = False

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        torch._foreach_add_(g_J, g_Omega)
        return g_J


class DTNH(Direction):
    """DTNH Algorithm 1: when <g_J, g_Omega> < 0, replace g_Omega by its component
    orthogonal to g_J, g_Omega - (<g_J, g_Omega> / ||g_J||^2) g_J; then d = g_J + g_Omega.

    granularity `global` treats all trainable parameters as one vector (the paper);
    `tensor` tests and projects each parameter tensor on its own.
    """

    GRANULARITIES = ("global", "tensor")

    def __init__(self, granularity: str = "global"):
        if granularity not in self.GRANULARITIES:
            raise ConfigError(f"granularity={granularity} is not one of {', '.join(self.GRANULARITIES)}")
        self.granularity = granularity

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        squared_norms = torch.stack(torch._foreach_norm(g_J)).square()
        if self.granularity == "global":
            dots, squared_norms = dot(g_J, g_Omega), squared_norms.sum()
        else:
            dots = per_tensor_dots(g_J, g_Omega)
        # the projection coefficient, 0 where the angle is not obtuse (or g_J vanishes);
        # computed on the device, so that no step waits for the host
        coefficients = torch.where((dots < 0) & (squared_norms > 0),
                                   dots / squared_norms.clamp_min(torch.finfo(squared_norms.dtype).tiny),
                                   torch.zeros_like(dots))
        # d = g_J + (g_Omega - c g_J) = (1 - c) g_J + g_Omega, built in g_J's storage
        if self.granularity == "global":
            torch._foreach_mul_(g_J, 1 - coefficients)
        else:
            for g, c in zip(g_J, (1 - coefficients).unbind()):
                g.mul_(c)
        torch._foreach_add_(g_J, g_Omega)
        return g_J
