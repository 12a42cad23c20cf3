"""The embedded demo's target domain (see safetransfer.data.domains): no download needed."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from safetransfer.common.registry import register
from safetransfer.data import domains
from safetransfer.data.datasets import TensorImages
from safetransfer.data.targets.base import Target


@register("target", "demo")
class DemoTarget(Target):
    reads_files = False

    def __init__(
        self,
        name: str = "demo",
        train_images_per_class: int = 100,
        test_images_per_class: int = 50,
        image_size: int = 32,
        seed: int = 0,
        **sampling,
    ):
        super().__init__(name, **sampling)
        self.train_images_per_class = train_images_per_class
        self.test_images_per_class = test_images_per_class
        self.image_size = image_size
        self.seed = seed

    @property
    def classes(self):
        return domains.TARGET_CLASSES

    @cached_property
    def _train(self) -> TensorImages:
        images, labels, _ = domains.make_domain("target", self.train_images_per_class, self.image_size, self.seed)
        return TensorImages(images, labels)

    def train_set(self) -> TensorImages:
        return self._train

    def test_set(self) -> TensorImages:
        # a different generator seed: test images are never training images
        images, labels, _ = domains.make_domain("target", self.test_images_per_class, self.image_size, self.seed + 1)
        return TensorImages(images, labels)

    def train_labels(self) -> np.ndarray:
        return self._train.labels.numpy()
