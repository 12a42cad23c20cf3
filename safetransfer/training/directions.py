"""Direction strategies: how the empirical-loss gradient g_J and the regularizer
gradient g_Omega become the step direction d.

Both gradients are lists aligned with the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._utils import _unflatten_dense_tensors

from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import register


def zeros_like_all(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros shaped like each of `params`: views of one new buffer (one allocation, one
    kernel, the views made by one C++ call)."""
    if len({(p.dtype, p.device) for p in params}) != 1:
        return [torch.zeros_like(p) for p in params]
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    return list(_unflatten_dense_tensors(flat, params))


def per_tensor_dots(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    """<x_i, y_i> for each pair of tensors, in float64 (exact products, float64 sums)."""
    return torch.stack([torch.vdot(a.flatten().double(), b.flatten().double()) for a, b in zip(x, y)])


class Dots64:
    """<g_J, g_Omega> and ||g_J||^2 of two flat vectors with every product exact and every sum
    accumulated in float64: float32 BLAS accumulates in float32, and over ResNet-18's 11 M
    parameters ||g_J||^2 came out 1e-4 to 4e-4 off (relative), d 6.5e-6 off the formula. The
    float32 vectors are copied into kept float64 buffers (a float32 product is exact in float64)
    and dotted there: on a GPU whole (four kernels: a step there is bound by launching them),
    on a CPU a chunk of CPU_CHUNK elements at a time, so that the copies stay in the cache (what each
    costs a step: BENCHMARKS.md)."""

    CPU_CHUNK = 2**20

    def __init__(self):
        self.J: torch.Tensor | None = None
        self.Omega: torch.Tensor | None = None

    def __call__(self, J: torch.Tensor, Omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if J.dtype == torch.float64:
            return torch.dot(J, Omega), torch.dot(J, J)
        size = len(J) if J.device.type == "cuda" else min(len(J), self.CPU_CHUNK)
        if self.J is None or len(self.J) != size or self.J.device != J.device:
            self.J = torch.empty(size, dtype=torch.float64, device=J.device)
            self.Omega = torch.empty_like(self.J)
        if size == len(J):
            J64, Omega64 = self.J.copy_(J), self.Omega.copy_(Omega)
            return torch.dot(J64, Omega64), torch.dot(J64, J64)
        dot = torch.zeros((), dtype=torch.float64, device=J.device)
        squared = torch.zeros_like(dot)
        for start in range(0, len(J), size):
            n = min(size, len(J) - start)
            J64 = self.J[:n].copy_(J[start : start + n])
            Omega64 = self.Omega[:n].copy_(Omega[start : start + n])
            dot += torch.dot(J64, Omega64)
            squared += torch.dot(J64, J64)
        return dot, squared


class FlatBuffer:
    """One vector laid out like a list of tensors: views of it shaped, and strided (a
    channels-last weight's gradient stays channels-last, which keeps the optimizer's
    multi-tensor kernels on their fast path), like each. Kept from step to step and made
    again only when the layout changes; the same list object passed again is taken to have
    the same layout. A new parameter-sized buffer at every step costs page faults on a CPU
    (glibc maps blocks over 32 MB afresh, ResNet-18's gradients among them)
    and allocations and launches on a GPU; one kept buffer costs neither."""

    def __init__(self):
        self.key, self.source, self.flat, self.views = None, None, None, []

    def like(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if tensors is self.source or tensors is self.views:
            return self.views
        key = [(t.shape, t.stride(), t.dtype, t.device) for t in tensors]
        if key != self.key:
            if len({(t.dtype, t.device) for t in tensors}) != 1:
                raise ValueError(
                    "DTNH's global direction needs every gradient in one dtype on one device, got "
                    + ", ".join(sorted({f"{t.dtype} on {t.device}" for t in tensors}))
                )
            self.flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            self.views, offset = [], 0
            for t in tensors:  # a dense layout (contiguous, channels-last) is kept; any other becomes contiguous
                strides = torch.empty_like(t, device="meta").stride()
                self.views.append(self.flat[offset : offset + t.numel()].as_strided(t.shape, strides))
                offset += t.numel()
            self.key = key
        self.source = tensors
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


@register("direction", "sum")
class Sum(Direction):
    """d = g_J + g_Omega: ordinary regularized fine-tuning."""

    needs_both_gradients = False

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        torch._foreach_add_(g_J, g_Omega)
        return g_J


@register("direction", "dtnh")
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
        self.dots = Dots64()

    def zero_gradient(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """g_Omega's kept buffer, zeroed (one kernel), laid out like the parameters: valid
        until the next step's."""
        if params is not self.omega_buffer.source and len({(p.dtype, p.device) for p in params}) != 1:
            return zeros_like_all(params)
        views = self.omega_buffer.like(params)
        self.omega_buffer.flat.zero_()
        return views

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.granularity == "global":
            return self.global_direction(g_J, g_Omega)
        dots, squared_norms = per_tensor_dots(g_J, g_Omega), per_tensor_dots(g_J, g_J)
        # d = g_J + (g_Omega - c g_J) = (1 - c) g_J + g_Omega, built in g_J's storage
        for g, c in zip(g_J, (1 - projection_coefficient(dots, squared_norms)).to(g_J[0].dtype).unbind()):
            g.mul_(c)
        torch._foreach_add_(g_J, g_Omega)
        return g_J

    def global_direction(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        """All parameters as one vector: g_Omega in its kept buffer (already there when it is
        the zero_gradient buffer), g_J copied into a second one laid out the same way (so
        that the two flat vectors align element by element), then two dot products (in
        float64, Dots64), one scaling and one addition: a fixed handful of kernels and host
        calls whatever the number of parameter tensors (a step on a GPU is largely bound by
        launching them).
        d is returned as views of the kept buffer: valid until the next step's."""
        omega_views = self.omega_buffer.like(g_Omega)
        if g_Omega is not omega_views:
            torch._foreach_copy_(omega_views, g_Omega)
        d = self.d_buffer.like(omega_views)
        torch._foreach_copy_(d, g_J)
        flat_J, flat_Omega = self.d_buffer.flat, self.omega_buffer.flat
        c = projection_coefficient(*self.dots(flat_J, flat_Omega))  # float64
        flat_J.mul_((1 - c).to(flat_J.dtype)).add_(flat_Omega)  # d = (1 - c) g_J + g_Omega
        return d


def dtnh_reference(g_J: Sequence[torch.Tensor], g_Omega: Sequence[torch.Tensor]) -> torch.Tensor:
    """DTNH Algorithm 1 as the paper writes it, on all parameters as one vector, a line each:
    the reading of the fast DTNH above (kept buffers, no host sync), which is tested against it."""
    g_J = torch.cat([g.flatten() for g in g_J])
    g_Omega = torch.cat([g.flatten() for g in g_Omega])
    if torch.dot(g_J, g_Omega) < 0:  # the regularizer's gradient points against the empirical loss's
        g_Omega = g_Omega - torch.dot(g_J, g_Omega) / torch.dot(g_J, g_J) * g_J  # drop its part along g_J
    return g_J + g_Omega  # d


def projection_coefficient(dots: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """<g_J, g_Omega> / ||g_J||^2 where the angle is obtuse, 0 where it is not (or g_J
    vanishes); computed on the device, so that no step waits for the host."""
    return torch.where(
        (dots < 0) & (squared_norms > 0),
        dots / squared_norms.clamp_min(torch.finfo(squared_norms.dtype).tiny),
        torch.zeros_like(dots),
    )
