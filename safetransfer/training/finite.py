"""The finiteness guard: never step along a non-finite direction, without the host waiting
for the device at every step.

Each step's verdict, ok = (J is finite) and (d is finite), is computed where the step runs.
A step that is not ok, and every step after it, leaves the weights (and the BatchNorm
statistics its forward pass moved) as they were. On CUDA (`deferred`) they are copied before
the step and put back by a torch.where on the verdict, so nothing is read back per step; on
the CPU, where a read costs nothing, the update is simply not made. The first failing step's iteration, epoch and batch
are kept; the training loop reads the flag at each log row, before a checkpoint and at the
end (`failure`), and raises NonFiniteError naming that iteration and what is not finite there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safetransfer.common.errors import SafetransferError


class NonFiniteError(SafetransferError, FloatingPointError):
    """J, a term of Omega or a gradient is NaN or infinite; the message (one line) names which."""


@dataclass
class Failure:
    """The first step whose J or d was not finite: its update (and those after it) skipped."""

    iteration: int
    epoch: int
    images: torch.Tensor
    labels: torch.Tensor


def verdict(loss_J: torch.Tensor, d: Sequence[torch.Tensor]) -> torch.Tensor:
    """J finite and each tensor of d of finite norm, as a device bool: a NaN or inf element makes
    its tensor's norm so, and so does an element beyond about 1.8e19 in float32 (its square
    overflows), a step no training survives either."""
    return torch.isfinite(loss_J) & torch.stack(torch._foreach_norm(list(d))).isfinite().all()


class FiniteGuard:
    def __init__(self, model: torch.nn.Module, device: torch.device, deferred: bool | None = None):
        self.deferred = device.type == "cuda" if deferred is None else deferred
        # what a step changes: the trained parameters (held only when deferred) and the buffers (BatchNorm's statistics)
        self.params = [p for p in model.parameters() if p.requires_grad] if self.deferred else []
        self.buffers = list(model.buffers())
        scalar = dict(device=device, dtype=torch.long)
        self.failed = torch.zeros((), dtype=torch.bool, device=device)
        self.iteration, self.epoch = torch.zeros((), **scalar), torch.zeros((), **scalar)  # of the current step
        self.first_iteration, self.first_epoch = torch.zeros((), **scalar), torch.zeros((), **scalar)
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.held = [torch.empty_like(t) for t in self.params + self.buffers]

    def start(self, done: int) -> None:
        """The loop continues after iteration `done`."""
        self.iteration.fill_(done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    @staticmethod
    def verdict(loss_J: torch.Tensor, d: Sequence[torch.Tensor]) -> torch.Tensor:
        return verdict(loss_J, d)

    @torch.no_grad()
    def hold(self) -> None:
        """Before the step's forward pass: keep what the step may change."""
        if self.held:
            torch._foreach_copy_(self.held, self.params + self.buffers)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, ok: torch.Tensor, images: torch.Tensor, labels: torch.Tensor):
        """optimizer.step() unless this step or an earlier one was not ok (then put back what was held)."""
        self.iteration.add_(1)
        if not self.deferred:
            if bool(self.failed) or not bool(ok):
                if not bool(self.failed):
                    self._record(ok, images, labels)
                self.put_back()
                for group in optimizer.param_groups:  # a step without gradients changes nothing (and the
                    for p in group["params"]:  # scheduler, stepped after it, sees the optimizer stepped)
                        p.grad = None
            optimizer.step()
            return
        self._record(ok, images, labels)
        optimizer.step()
        for t, kept in zip(self.params + self.buffers, self.held):
            t.copy_(torch.where(self.failed, kept, t))

    @torch.no_grad()
    def put_back(self) -> None:
        """What the last hold() kept (after a diagnosis, whose forward pass moves the BatchNorm statistics)."""
        if self.held:
            torch._foreach_copy_(self.params + self.buffers, self.held)

    def _record(self, ok: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
        newly = ~ok & ~self.failed
        self.first_iteration.copy_(torch.where(newly, self.iteration, self.first_iteration))
        self.first_epoch.copy_(torch.where(newly, self.epoch, self.first_epoch))
        if self.images is None or self.images.shape != images.shape or self.labels.shape != labels.shape:
            self.images, self.labels = images.detach().clone(), labels.clone()
        else:  # the batch of the first failing step, kept by where (never read back here)
            self.images.copy_(torch.where(newly, images.detach(), self.images))
            self.labels.copy_(torch.where(newly, labels, self.labels))
        self.failed |= ~ok

    def failure(self) -> Failure | None:
        """The first failing step, read from the device (at log rows, checkpoints and the end only)."""
        if not bool(self.failed):
            return None
        return Failure(int(self.first_iteration), int(self.first_epoch), self.images, self.labels)
