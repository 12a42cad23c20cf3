"""L2-SP (Li et al., 2018; the DTNH paper's L2-SP baseline), backbone part:

    alpha/2 ||w_S - w_S^0||^2

w_S are the backbone's parameters, w_S^0 the source weights they start from. The
regularizer `l2sp` adds the head part beta/2 ||w_head||^2 as a HeadL2 term. With
`bn_affine: true` (the default) BatchNorm's weight and bias are part of w_S and pulled
towards their source values; with false they are not regularized at all.
BatchNorm's running statistics are buffers, never regularized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safetransfer.common.registry import register
from safetransfer.training.backbones import TransferNet
from safetransfer.training.regularizers.base import BindContext, Selection, Term
from safetransfer.training.regularizers.l2 import squared_norm


def backbone_parameters(backbone: nn.Module, bn_affine: bool) -> list[nn.Parameter]:
    chosen = []
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not bn_affine:
            continue
        chosen.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    return chosen


@register("term", "l2sp")
class L2SP(Term):
    closed_form = True
    coefficients = ("alpha",)

    def __init__(self, alpha: float, bn_affine: bool = True, decay: float = 1.0):
        super().__init__(decay)
        self.alpha, self.bn_affine = self.coefficient("alpha", alpha), bool(bn_affine)

    def bind(self, model: TransferNet, context: BindContext) -> None:
        self.shared = Selection(backbone_parameters(model.backbone, self.bn_affine))
        self.anchor = [p.detach().clone() for p in self.shared.chosen]  # w_S^0

    def value(self, model: TransferNet, features) -> torch.Tensor:
        return self.alpha * self.scale / 2 * squared_norm(torch._foreach_sub(self.shared.chosen, self.anchor))

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        alpha = self.alpha * self.scale
        shared_grads = self.shared.grads(params, grads)
        # alpha (w - w0), as two in-place additions: no copy of the weights
        torch._foreach_add_(shared_grads, self.shared.chosen, alpha=alpha)
        torch._foreach_add_(shared_grads, self.anchor, alpha=-alpha)
