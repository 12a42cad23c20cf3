"""SPD, Selective Projection Decay (Tian et al., "Rethinking Weight Decay for Robust Fine-Tuning of
Foundation Models", NeurIPS 2024), for SGD with momentum and for Adam.

Per parameter tensor (the paper's layer), after the base optimizer's step has proposed theta~_t from
theta_{t-1} with the step direction g_t (d: the gradient the direction strategy gives):

    c_t = -<g_t, theta_{t-1} - theta_0>
    if c_t < 0:   theta_t = theta~_t - lambda * r_t * (theta~_t - theta_0),
                  r_t = max(0, ||theta~_t - theta_0|| - ||theta_{t-1} - theta_0||) / ||theta~_t - theta_0||
    else:         theta_t = theta~_t

so the pull towards the starting weights theta_0 acts only on the tensors whose step moves them away
from theta_0 and only by the share of the step that does. Read from the authors' code
(GT-RIPL/Selective-Projection-Decay, adamSPD.py: the condition on the raw gradient, the ratio through
hardtanh(., 0, 1), lambda the optimizer's `weight_decay`); theta_0 are the trainable parameters when
the optimizer is made, the new head's initialisation included, as their README's example caches them.

Why an optimizer and not a direction strategy: the condition and the ratio read the base optimizer's
proposed weights theta~_t (momentum, Adam's scaling), which a direction, a function of (g_J, g_Omega),
never sees. So SPD composes with every regularizer and with both directions: d = g_J + g_Omega or DTNH's d
is the g_t above.
"""

from __future__ import annotations

import torch

from safetransfer.common.registry import register
from safetransfer.training.directions import per_tensor_dots


class SelectiveProjectionDecay:
    """The SPD correction after a base optimizer's step (mixed in before the optimizer class)."""

    def _start_spd(self, lambda_spd: float) -> None:
        if isinstance(lambda_spd, bool) or not isinstance(lambda_spd, (int, float)) or not lambda_spd >= 0:
            raise ValueError(f"lambda_spd={lambda_spd} must be a number >= 0 (0: no decay)")
        self.lambda_spd = float(lambda_spd)
        # theta_0: the weights the optimizer starts from (a resumed run makes it from the same start)
        self.anchors = {p: p.detach().clone() for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params or self.lambda_spd == 0:
            return super().step(closure)
        previous = [p.detach().clone() for p in params]  # theta_{t-1}
        loss = super().step(closure)  # theta~_t
        anchors = [self.anchors[p] for p in params]
        away = torch._foreach_sub(previous, anchors)  # theta_{t-1} - theta_0
        c = -per_tensor_dots([p.grad for p in params], away)
        proposed = torch._foreach_sub([p.detach() for p in params], anchors)  # theta~_t - theta_0
        now = torch.stack(torch._foreach_norm(proposed)).double()
        before = torch.stack(torch._foreach_norm(away)).double()
        ratio = torch.where(now > 0, (now - before) / now.clamp_min(torch.finfo(now.dtype).tiny), 0.0).clamp(0, 1)
        factor = torch.where(c < 0, self.lambda_spd * ratio, 0.0)
        for p, deviation, f in zip(params, proposed, factor.to(params[0].dtype).unbind()):
            p.sub_(deviation * f)
        return loss


@register("optimizer", "sgd_spd")
class SGDSPD(SelectiveProjectionDecay, torch.optim.SGD):
    """SGD (with momentum) followed by SPD; `lambda_spd` is the paper's lambda."""

    def __init__(self, params, lambda_spd: float = 1.0, **sgd):
        super().__init__(params, **sgd)
        self._start_spd(lambda_spd)


@register("optimizer", "adam_spd")
class AdamSPD(SelectiveProjectionDecay, torch.optim.Adam):
    """Adam followed by SPD, as the authors' AdamSPD (their weight_decay is `lambda_spd` here; Adam's own
    weight_decay stays 0 there)."""

    def __init__(self, params, lambda_spd: float = 1.0, **adam):
        super().__init__(params, **adam)
        self._start_spd(lambda_spd)
