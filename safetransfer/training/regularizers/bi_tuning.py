"""Bi-Tuning (Zhong, Wang, Zhou, Long, Wang, "Bi-tuning of Pre-trained Representations", 2020), as a
term of Omega beside the cross-entropy J:

    Omega(w) = lambda_b * ( KL(t || log_softmax(l_z / T)) + KL(t || log_softmax(l_y / T)) ),  batch means

Each training image is seen twice, under two independent draws of the training augmentation: the query
view by the network, the key view by a momentum copy of the backbone and projector (the key encoder,
theta_k <- m theta_k + (1 - m) theta_q before each step's keys). Per class c, two queues of K keys each:
the key encoder's normalized features with a 1 appended, hn_k = normalize([h_k, 1]), and its normalized
projections z_k = normalize(P(h_k)). For an image of class y:

- projector contrast l_z = [<z_q, z_k>, <z_q, queue_z[y]>_K, <z_q, queue_z[c != y]>_{(C-1)K}];
- classifier contrast l_y = [<hn_q, w_y>, <queue_h[y], w_y>_K, <queue_h[c != y], w_y>_{(C-1)K}], with
  w_c = normalize([W_c, b_c]) the new head's row and bias, held constant (no gradient to the head);

t puts 1/(K+1) on the first K+1 entries (the image's own key and its class's queue). The queues start as
normalized Gaussian noise and take the batch's keys in batch order, a pointer per class. Read from TLlib
(tllib/regularization/bi_tuning.py and examples/.../bi_tuning.py: T 0.07, K 40, m 0.999, projection 128,
trade-off 1, KLDivLoss with batchmean, the projector at the backbone's lr), followed where the paper is
silent, including two of its orders: l_z reads the queue before the batch's keys enter it, l_y after.

The projector, the key encoder and the queues are part of the network's state_dict (TransferNet.add_trained),
so a checkpoint holds them and a resumed run continues exactly. Under DTNH: g_J is zero on the projector
(J does not read it), so the projection leaves Omega's gradient there as it is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from safetransfer.common.registry import register
from safetransfer.training.backbones import Features, TransferNet, at_least_fp32, forward_features
from safetransfer.training.regularizers.base import BindContext, Term


def with_one(h: torch.Tensor) -> torch.Tensor:
    """normalize([h, 1]): the features with a 1 appended (the head's bias), on the unit sphere."""
    return F.normalize(torch.cat([h, torch.ones_like(h[:, :1])], dim=1), dim=1)


def contrast_logits(own: torch.Tensor, by_class: torch.Tensor, labels: torch.Tensor, temperature: float):
    """log_softmax over [own key, the K of the image's class, the (C-1) K of the other classes in class
    order] / T: `own` (B,), `by_class` (B, C, K) the scores against every queued key."""
    mine = F.one_hot(labels, by_class.shape[1]).bool()
    batch = len(labels)
    logits = torch.cat([own[:, None], by_class[mine], by_class[~mine].view(batch, -1)], dim=1)
    return F.log_softmax(logits / temperature, dim=1)


class KeyEncoder(nn.Module):
    """The momentum copies of the backbone and the projector, and the per-class queues of their keys."""

    def __init__(self, backbone: nn.Module, projector: nn.Linear, num_classes: int, queue_size: int):
        super().__init__()
        self.backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.projector = copy.deepcopy(projector).requires_grad_(False)
        like = dict(device=projector.weight.device, dtype=projector.weight.dtype)
        features = projector.in_features + 1
        self.register_buffer("queue_h", F.normalize(torch.randn(features, num_classes, queue_size, **like), dim=0))
        self.register_buffer(
            "queue_z", F.normalize(torch.randn(projector.out_features, num_classes, queue_size, **like), dim=0)
        )
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long, device=like["device"]))

    @torch.no_grad()
    def follow(self, backbone: nn.Module, projector: nn.Module, momentum: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, for the backbone's and the projector's parameters."""
        keys = [*self.backbone.parameters(), *self.projector.parameters()]
        queries = [p.detach() for p in (*backbone.parameters(), *projector.parameters())]
        torch._foreach_mul_(keys, momentum)
        torch._foreach_add_(keys, queries, alpha=1 - momentum)

    @torch.no_grad()
    def enqueue(self, h: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Each image's keys at its class's pointer, in batch order (a class with more than K images in the
        batch keeps its last K), the pointers moved on: all on the device, no host sync."""
        num_classes, size = self.queue_h.shape[1:]
        one_hot = F.one_hot(labels, num_classes)
        rank = (one_hot.cumsum(0) - 1).gather(1, labels[:, None])[:, 0]  # the image's place among its class's
        count = one_hot.sum(0)
        kept = rank >= count[labels] - size
        slot = (self.pointer[labels] + rank) % size
        self.queue_h[:, labels[kept], slot[kept]] = h[kept].T.to(self.queue_h.dtype)
        self.queue_z[:, labels[kept], slot[kept]] = z[kept].T.to(self.queue_z.dtype)
        self.pointer.copy_((self.pointer + count) % size)


@register("term", "bi_tuning")
class BiTuning(Term):
    coefficients = ("lambda_b",)
    adds_modules = True
    views = 2  # the query view (the network's) and the key view (the key encoder's)

    def __init__(
        self,
        lambda_b: float = 1.0,
        temperature: float = 0.07,
        queue_size: int = 40,
        momentum: float = 0.999,
        projection_dim: int = 128,
        decay: float = 1.0,
    ):
        super().__init__(decay)
        self.lambda_b = self.coefficient("lambda_b", lambda_b)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature} must be a number > 0 (TLlib: 0.07)")
        for key, value in (("queue_size", queue_size), ("projection_dim", projection_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value} must be a whole number >= 1 (TLlib: 40 and 128)")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum} must be in [0, 1) (TLlib: 0.999)")
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.queue_size, self.projection_dim = queue_size, projection_dim

    def bind(self, model: TransferNet, context: BindContext) -> None:
        like = dict(device=model.head.weight.device, dtype=model.head.weight.dtype)
        projector = nn.Linear(model.backbone.num_features, self.projection_dim, **like)
        self.projector = model.add_trained("bi_tuning_projector", projector, "backbone")
        keys = KeyEncoder(model.backbone, projector, model.head.out_features, self.queue_size)
        self.keys = model.add_trained("bi_tuning_keys", keys, "backbone")  # no trained parameters: state only

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        h_q = at_least_fp32(features.pooled)
        z_q = F.normalize(at_least_fp32(self.projector(features.pooled)), dim=1)
        key_view = features.views[0] if features.views else features.images  # one view: a diagnosis re-run
        with torch.no_grad():
            self.keys.follow(model.backbone, self.projector, self.momentum)
            h_k = at_least_fp32(forward_features(self.keys.backbone, key_view).pooled)
            z_k = F.normalize(at_least_fp32(self.keys.projector(h_k.to(self.keys.projector.weight.dtype))), dim=1)
        labels = features.labels
        # the projector contrast against the queue as it was before this batch (a copy: enqueue writes in place)
        by_class = torch.einsum("nd,dck->nck", z_q, at_least_fp32(self.keys.queue_z).clone())
        logits_z = contrast_logits((z_q * z_k).sum(1), by_class, labels, self.temperature)
        self.keys.enqueue(with_one(h_k), z_k, labels)
        # the classifier contrast against the queue with this batch's keys in it; the head held constant
        w = at_least_fp32(F.normalize(torch.cat([model.head.weight, model.head.bias[:, None]], dim=1), dim=1).detach())
        hn_q = with_one(h_q)
        own = (hn_q * w[labels]).sum(1)
        scores = torch.einsum("fck,nf->nck", at_least_fp32(self.keys.queue_h), w[labels])  # (B, C, K), w_{y_b}
        logits_y = contrast_logits(own, scores, labels, self.temperature)
        target = torch.zeros_like(logits_z)
        target[:, : self.queue_size + 1] = 1.0 / (self.queue_size + 1)
        loss = F.kl_div(logits_z, target, reduction="batchmean") + F.kl_div(logits_y, target, reduction="batchmean")
        return self.lambda_b * self.scale * loss
