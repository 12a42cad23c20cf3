"""L2: Omega(w) = alpha/2 ||w||^2 over all trainable parameters (weight decay, the
"Fine-tuning" / "L2" baseline of both papers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safetransfer.backbones import TransferNet
from safetransfer.regularizers.base import Term


class L2(Term):
    closed_form = True

    def __init__(self, alpha: float, decay: float = 1.0):
        super().__init__(alpha, decay)

    def value(self, model: TransferNet, features: torch.Tensor) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return self.coefficient / 2 * torch.stack(torch._foreach_norm(params)).square().sum()

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        # d/dw alpha/2 ||w||^2 = alpha w, added without allocating a copy of the weights
        torch._foreach_add_(grads, list(params), alpha=self.coefficient)
