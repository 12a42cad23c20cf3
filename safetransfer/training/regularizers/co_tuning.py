"""Co-Tuning (You, Kou, Long, Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020):

    Omega(w) = lambda_c * 1/B sum_b CE( r[y_b], softmax(h_s(f(x_b; w))) )
             = -lambda_c * 1/B sum_b sum_s r[y_b, s] log softmax(h_s(f(x_b; w)))_s

h_s is the source classifier kept beside the new head and trained with the network (at the backbone's
lr: the authors' train.py puts it in the backbone's group, TLlib at 0.1x the base lr like the backbone);
r = p(y_s | y_t) is the category relationship, learned once before training from the frozen source
model's predictions on the target training images (test-time transform: the authors' deterministic
train loader). Two ways, as the paper names them:

- `calibrated` (the paper's; the authors' code, thuml/CoTuning module/relationship_learning.py): a
  multinomial logistic regression without intercept from the source probabilities to the target label,
  its C chosen among 1e4 .. 1e-4 by accuracy on a held-out part of the training images (`holdout`,
  stratified; the authors use their dataset's validation split), its logits temperature-scaled on that
  part (the NLL minimised over one scale); then Bayes' rule with the source classes' marginal:
  r[y_t] proportional to p(y_t | y_s = s) * mean_x p(y_s = s | x).
- `direct` (the paper's direct approach; TLlib's tllib/regularization/co_tuning.py): r[y_t] the mean
  source probabilities over the training images of class y_t.

The source probabilities are softmax(`source_scale` * logits): the authors scale their ImageNet ResNet-50's
logits by 0.884 (its temperature fitted on ImageNet's validation set; experiment=tllib_table sets it);
1.0 takes the source's probabilities as they are. The relationship is cached in paths.cache_dir under the
backbone, source, target, sampling and these settings, and a rerun reads it.

Under DTNH: g_J is zero on the source classifier (J does not read it), so the projection, which removes
a multiple of g_J, leaves Omega's gradient there as it is, whatever it does on the backbone.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch.utils.data import DataLoader

from safetransfer.common.registry import register
from safetransfer.training.backbones import Features, TransferNet, at_least_fp32, forward_features, frozen_copy
from safetransfer.training.regularizers.base import BindContext, Term

log = logging.getLogger(__name__)

#: the C values the authors' relationship_learning tries, in their order (the first best is kept)
C_GRID = (1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
RELATIONSHIPS = ("calibrated", "direct")


def fit_scale(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the t > 0 minimising the mean cross-entropy of softmax(t * logits) (a convex
    function of t), by L-BFGS in float64 as the authors' `calibrate` does it."""
    z, y = torch.from_numpy(np.asarray(logits, dtype=np.float64)), torch.from_numpy(np.asarray(labels))
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [scale], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=0.0
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z * scale, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(scale.detach())


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A boolean mask: per class, round(fraction * n) of its images (at least 1, at most n - 1), drawn
    with a fixed seed."""
    rng, held = np.random.default_rng(seed), np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held[rng.permutation(members)[:count]] = True
    return held


def direct_relationship(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """r[y_t] = the mean source probabilities over the images of target class y_t."""
    return np.stack([probabilities[labels == t].mean(axis=0) for t in range(num_classes)])


def calibrated_relationship(
    probabilities: np.ndarray, labels: np.ndarray, num_classes: int, holdout: float
) -> tuple[np.ndarray, dict]:
    """The paper's calibrated relationship (see the module's docstring), and what was chosen."""
    from sklearn.linear_model import LogisticRegression

    held = stratified_holdout(labels, holdout)
    fit_p, fit_y, val_p, val_y = probabilities[~held], labels[~held], probabilities[held], labels[held]
    best, best_accuracy, best_c = None, -1.0, None
    for c in C_GRID:
        # solved to tol 1e-8: sklearn's default 1e-4 left coefficients ~1e-2 off the minimiser here
        model = LogisticRegression(C=c, fit_intercept=False, tol=1e-8, max_iter=10000).fit(fit_p, fit_y)
        accuracy = float((model.predict(val_p) == val_y).mean())
        if accuracy > best_accuracy:
            best, best_accuracy, best_c = model, accuracy, c
    # the logits of each target class as a function of the source probabilities (num_classes x sources)
    weights = np.zeros((num_classes, probabilities.shape[1]))
    coef = best.coef_ if best.coef_.shape[0] > 1 else np.concatenate([np.zeros_like(best.coef_), best.coef_])
    weights[best.classes_] = coef  # a binary problem: class 1's logit is coef . p, class 0's is 0
    scale = fit_scale(val_p @ weights.T, val_y)
    target_given_source = softmax(weights.T * scale, axis=1)  # p(y_t | y_s = s): sources x num_classes
    marginal = probabilities.mean(axis=0)  # p(y_s), over all the training images
    joint = (target_given_source * marginal[:, None]).T  # num_classes x sources
    return joint / joint.sum(axis=1, keepdims=True), {"C": best_c, "holdout_accuracy": best_accuracy, "scale": scale}


@torch.no_grad()
def source_probabilities(
    backbone, head, data, batch_size: int, device: torch.device, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """softmax(scale * source logits) of each training image (in float64) and its target label."""
    logits, labels = [], []
    for images, batch_labels in DataLoader(data, batch_size=batch_size, shuffle=False):
        logits.append(head(forward_features(backbone, images.to(device)).pooled).double().cpu())
        labels.append(batch_labels)
    return softmax(torch.cat(logits).numpy() * scale, axis=1), torch.cat(labels).numpy()


@register("term", "co_tuning")
class CoTuning(Term):
    coefficients = ("lambda_c",)
    adds_modules = True  # the source classifier, bound before a term over all parameters (L2) looks

    def __init__(
        self,
        lambda_c: float = 2.3,
        relationship: str = "calibrated",
        holdout: float = 0.2,
        source_scale: float = 1.0,
        decay: float = 1.0,
    ):
        super().__init__(decay)
        self.lambda_c = self.coefficient("lambda_c", lambda_c)
        if relationship not in RELATIONSHIPS:
            raise ValueError(f"relationship={relationship!r}; allowed: {', '.join(RELATIONSHIPS)}")
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
            raise ValueError(f"holdout={holdout} must be a fraction in (0, 1) (the share of each class held out)")
        if isinstance(source_scale, bool) or not isinstance(source_scale, (int, float)) or not source_scale > 0:
            raise ValueError(f"source_scale={source_scale} must be a number > 0 (1: the source's own probabilities)")
        self.settings = dict(relationship=relationship, holdout=float(holdout), source_scale=float(source_scale))

    def bind(self, model: TransferNet, context: BindContext) -> None:
        from safetransfer.common.atomic import built_once

        head = context.source_classifier("co_tuning", "Co-Tuning relates the target classes to the source model's")
        if context.train_data is None:
            raise ValueError("Co-Tuning needs the target training data to learn the category relationship")
        self.head = model.keep_source_head(head, trainable=True, group="backbone")  # h_s
        num_classes = model.head.out_features

        def compute() -> torch.Tensor:
            source = frozen_copy(model.backbone)
            teacher_head = frozen_copy(self.head)
            probabilities, labels = source_probabilities(
                source,
                teacher_head,
                context.train_data,
                context.batch_size,
                context.device,
                self.settings["source_scale"],
            )
            if self.settings["relationship"] == "direct":
                found, chosen = direct_relationship(probabilities, labels, num_classes), {}
            else:
                found, chosen = calibrated_relationship(probabilities, labels, num_classes, self.settings["holdout"])
            log.info(
                "Co-Tuning relationship (%s) from %d images %s", self.settings["relationship"], len(labels), chosen
            )
            return torch.from_numpy(found)

        path = context.cache_path("co_tuning_relationship", {**self.settings, "images": len(context.train_data)})
        relationship = compute() if path is None else built_once(path, compute, "Co-Tuning's category relationship")
        self.relationship = relationship.to(
            device=model.head.weight.device, dtype=torch.float32
        )  # r: targets x sources

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        log_q = F.log_softmax(at_least_fp32(self.head(features.pooled)), dim=1)
        r = self.relationship[features.labels].to(log_q.dtype)
        return self.lambda_c * self.scale * -(r * log_q).sum(dim=1).mean()
