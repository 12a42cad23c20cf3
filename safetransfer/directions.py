"""Direction strategies: how the empirical-loss gradient g_J and the regularizer
gradient g_Omega become the step direction d.

Both gradients are lists aligned with the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._utils import _unflatten_dense_tensors

from safetransfer.errors import ConfigError
from safetransfer.methods import method_label


def zeros_like_all(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros shaped like each of `params`: views of one new buffer (one allocation, one
    kernel, the views made by one C++ call)."""
    if len({(p.dtype, p.device) for p in params}) != 1:
        return [torch.zeros_like(p) for p in params]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    return list(_unflatten_dense_tensors(flat, params))


def per_tensor_dots(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.vdot(a.flatten(), b.flatten()) for a, b in zip(x, y)])


class FlatBuffer:
    """One vector laid out like a list of tensors (views of it shaped like each), kept from
    step to step and made again only when the shapes change. A new parameter-sized buffer
    at every step costs page faults on a CPU (glibc maps blocks over 32 MB afresh: about
    12 ms for ResNet-18's 45 MB on this machine) and launches on a GPU; one kept buffer
    costs neither."""

    def __init__(self):
        self.key, self.flat, self.views = None, None, []

    def like(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        key = (tuple(t.shape for t in tensors), tensors[0].dtype, tensors[0].device)
        if key != self.key:
            self.flat = torch.empty(sum(t.numel() for t in tensors), dtype=key[1], device=key[2])
            self.views, self.key = list(_unflatten_dense_tensors(self.flat, tensors)), key
        return self.views


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

    def zero_gradient(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A zero g_Omega for the closed-form terms to add their gradient into."""
        return zeros_like_all(params)

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
        self.omega_buffer, self.d_buffer = FlatBuffer(), FlatBuffer()  # kept from step to step

    def zero_gradient(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_Omega's kept buffer, zeroed (one kernel): valid until the next step's."""
        views = self.omega_buffer.like(params)
        self.omega_buffer.flat.zero_()
        return views

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.granularity == "global":
            return self.global_direction(g_J, g_Omega)
        dots, squared_norms = per_tensor_dots(g_J, g_Omega), torch.stack(torch._foreach_norm(g_J)).square()
        # d = g_J + (g_Omega - c g_J) = (1 - c) g_J + g_Omega, built in g_J's storage
        for g, c in zip(g_J, (1 - projection_coefficient(dots, squared_norms)).unbind()):
            g.mul_(c)
        torch._foreach_add_(g_J, g_Omega)
        return g_J

    def global_direction(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        """All parameters as one vector: g_J copied into a kept buffer (one multi-tensor copy),
        g_Omega too unless it is already the kept zero_gradient buffer, then two dot products,
        one scaling and one addition: a fixed handful of kernels and host calls whatever the
        number of parameter tensors (a step on a GPU is largely bound by launching them).
        d is returned as views of the kept buffer: valid until the next step's."""
        flat_J, flat_Omega = self.flattened(self.d_buffer, g_J), self.flattened(self.omega_buffer, g_Omega)
        c = projection_coefficient(torch.dot(flat_J, flat_Omega), torch.dot(flat_J, flat_J))
        flat_J.mul_(1 - c).add_(flat_Omega)  # d = (1 - c) g_J + g_Omega
        return self.d_buffer.views

    @staticmethod
    def flattened(buffer: FlatBuffer, tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors is not buffer.views:
            torch._foreach_copy_(buffer.like(tensors), tensors)
        return buffer.flat


def projection_coefficient(dots: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """<g_J, g_Omega> / ||g_J||^2 where the angle is obtuse, 0 where it is not (or g_J
    vanishes); computed on the device, so that no step waits for the host."""
    return torch.where((dots < 0) & (squared_norms > 0),
                       dots / squared_norms.clamp_min(torch.finfo(squared_norms.dtype).tiny),
                       torch.zeros_like(dots))
