"""LwF, Learning without Forgetting (Li and Hoiem, ECCV 2016), as a regularizer of fine-tuning:

    Omega(w) = lambda_o * 1/B sum_b KL( softmax(z_0(x_b) / T) || softmax(h_s(f(x_b; w)) / T) )

z_0 = h_s^0(f(x; w^0)) are the source model's logits (the frozen source backbone and its own
classifier), h_s the source classifier kept beside the new head and trained with the network
(the paper's theta_o), T the temperature; the paper's loss is the cross-entropy of the two
tempered distributions, which differs from the KL divergence by the teacher's entropy, a
constant. No T^2 factor: TLlib's `KnowledgeDistillationLoss` (thuml/Transfer-Learning-Library,
tllib/regularization/knowledge_distillation.py, KLDivLoss with batchmean) and its script
(examples/task_adaptation/image_classification/lwf.py: trade-off 4, T 3) compute the same.

Where z_0 comes from (`teacher`): `same_view` (the default): the teacher sees the same augmented images
the student sees (a forward of the frozen source network each step; exact). `cached`: TLlib's form
(tllib/regularization/lwf.py `collect_pretrain_labels`, examples/.../lwf.py): z_0 recorded once before
training, on one pass of the training images under the training augmentation, and replayed for each image
whatever view a later epoch draws (the batch's items read from the epoch's order: Features.indices); no
frozen forward per step, but the teacher's view is not the student's after the first epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safetransfer.common.registry import register
from safetransfer.training.backbones import Features, TransferNet, at_least_fp32, forward_features, frozen_copy
from safetransfer.training.regularizers.base import BindContext, Term


@register("term", "lwf")
class LwF(Term):
    coefficients = ("lambda_o",)
    adds_modules = True  # the source classifier, bound before a term over all parameters (L2) looks

    TEACHERS = ("same_view", "cached")

    def __init__(
        self,
        lambda_o: float = 4.0,
        temperature: float = 3.0,
        train_source_head: bool = True,
        teacher: str = "same_view",
        decay: float = 1.0,
    ):
        super().__init__(decay)
        self.lambda_o = self.coefficient("lambda_o", lambda_o)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature} must be a number > 0 (TLlib's scripts use 3)")
        if teacher not in self.TEACHERS:
            raise ValueError(f"teacher={teacher!r}; allowed: {', '.join(self.TEACHERS)}")
        self.temperature, self.train_source_head = float(temperature), bool(train_source_head)
        self.needs_indices = teacher == "cached"
        self.cached: torch.Tensor | None = None

    def bind(self, model: TransferNet, context: BindContext) -> None:
        head = context.source_classifier("lwf", "LwF distils the source model's predictions")
        self.teacher = frozen_copy(model.backbone)  # f(.; w^0), eval mode
        self.head = model.keep_source_head(head, trainable=self.train_source_head)  # h_s
        self.teacher_head = frozen_copy(self.head)  # h_s^0
        if self.needs_indices:
            if context.train_augmented is None:
                raise ValueError("teacher=cached records the source logits of the training images, and none were given")
            with torch.no_grad():
                self.cached = torch.cat([self.source_logits(images) for images in context.train_augmented()])

    @torch.no_grad()
    def source_logits(self, images: torch.Tensor) -> torch.Tensor:
        """z_0: the frozen source network's logits."""
        return self.teacher_head(forward_features(self.teacher, images).pooled)

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        if self.cached is not None and features.indices is not None:
            teacher = self.cached[features.indices]
        else:  # the same view (a diagnosis re-run of a cached step reads the current view too)
            teacher = self.source_logits(features.images)
        student = self.head(features.pooled)
        log_q = F.log_softmax(at_least_fp32(student) / self.temperature, dim=1)
        p = F.softmax(at_least_fp32(teacher) / self.temperature, dim=1)
        return self.lambda_o * self.scale * F.kl_div(log_q, p, reduction="batchmean")
