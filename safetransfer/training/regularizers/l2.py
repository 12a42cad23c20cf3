"""Weight-space L2 terms, with closed-form gradients.

- L2: alpha/2 ||w||^2 over all trainable parameters (weight decay; the "Fine-tuning" /
  "L2" baseline of both papers).
- HeadL2: beta/2 ||w_head||^2 over the new head only; L2-SP, KnowDist and DELTA keep
  the head small with it while their own term regularizes the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safetransfer.common.registry import register
from safetransfer.training.backbones import TransferNet
from safetransfer.training.regularizers.base import BindContext, Selection, Term


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i ||t_i||^2 over a list of tensors."""
    return torch.stack(torch._foreach_norm(list(tensors))).square().sum()


@register("term", "l2")
class L2(Term):
    closed_form = True
    coefficients = ("alpha",)

    def __init__(self, alpha: float, decay: float = 1.0):
        super().__init__(decay)
        self.alpha = self.coefficient("alpha", alpha)

    def value(self, model: TransferNet, features) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return self.alpha * self.scale / 2 * squared_norm(params)

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        # d/dw alpha/2 ||w||^2 = alpha w, added without allocating a copy of the weights
        torch._foreach_add_(grads, list(params), alpha=self.alpha * self.scale)


@register("term", "head")
class HeadL2(Term):
    closed_form = True
    coefficients = ("beta",)

    def __init__(self, beta: float, decay: float = 1.0):
        super().__init__(decay)
        self.beta = self.coefficient("beta", beta)

    def bind(self, model: TransferNet, context: BindContext) -> None:
        self.head = Selection([p for p in model.head.parameters() if p.requires_grad])

    def value(self, model: TransferNet, features) -> torch.Tensor:
        return self.beta * self.scale / 2 * squared_norm(self.head.chosen)

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        torch._foreach_add_(self.head.grads(params, grads), self.head.chosen, alpha=self.beta * self.scale)
