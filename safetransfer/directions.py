"""Direction strategies: how the empirical-loss gradient g_J and the regularizer
gradient g_Omega become the step direction d.

Both gradients are lists aligned with the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from safetransfer.errors import ConfigError
from safetransfer.methods import method_label


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors laid end to end in one new vector, by one C++ call (a Python loop over
    a ResNet's 62-161 parameter tensors costs more host time than the GPU's work here)."""
    return _flatten_dense_tensors(list(tensors))


def dot(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    """<x, y> with all tensors of each list seen as one vector."""
    return torch.dot(flatten(x), flatten(y))


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
        if self.granularity == "global":
            return self.global_direction(g_J, g_Omega)
        dots, squared_norms = per_tensor_dots(g_J, g_Omega), torch.stack(torch._foreach_norm(g_J)).square()
        # d = g_J + (g_Omega - c g_J) = (1 - c) g_J + g_Omega, built in g_J's storage
        for g, c in zip(g_J, (1 - projection_coefficient(dots, squared_norms)).unbind()):
            g.mul_(c)
        torch._foreach_add_(g_J, g_Omega)
        return g_J

    @staticmethod
    def global_direction(g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        """All parameters as one vector, each gradient flattened once: two dot products,
        one scaling and one addition, a fixed handful of kernels and host calls whatever
        the number of parameter tensors (a step on a GPU is largely bound by launching
        them). d is returned as views of one new buffer, shaped like g_J."""
        flat_J, flat_Omega = flatten(g_J), flatten(g_Omega)
        c = projection_coefficient(torch.dot(flat_J, flat_Omega), torch.dot(flat_J, flat_J))
        flat_J.mul_(1 - c).add_(flat_Omega)  # d = (1 - c) g_J + g_Omega
        return list(_unflatten_dense_tensors(flat_J, g_J))


def projection_coefficient(dots: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """<g_J, g_Omega> / ||g_J||^2 where the angle is obtuse, 0 where it is not (or g_J
    vanishes); computed on the device, so that no step waits for the host."""
    return torch.where((dots < 0) & (squared_norms > 0),
                       dots / squared_norms.clamp_min(torch.finfo(squared_norms.dtype).tiny),
                       torch.zeros_like(dots))
