"""The demo's source model: pretrained with `fit` on the generated source domain
(data/domains.py) on first use, then cached."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from safetransfer.common.atomic import built_once
from safetransfer.common.fingerprints import fingerprint
from safetransfer.common.registry import register
from safetransfer.data import domains
from safetransfer.sources.base import Source, SourceWeights
from safetransfer.training.backbones import TransferNet

log = logging.getLogger(__name__)


@register("source", "demo")
class DemoSource(Source):
    """The demo's source model: pretrained on the generated source domain on first use, then cached."""

    def __init__(
        self,
        cache_dir: str,
        name: str = "demo",
        images_per_class: int = 200,
        image_size: int = 32,
        iterations: int = 400,
        batch_size: int = 64,
        lr: float = 0.03,
        seed: int = 0,
    ):
        super().__init__(name)
        self.cache_dir = Path(cache_dir).expanduser()
        self.settings = dict(
            images_per_class=images_per_class,
            image_size=image_size,
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            generator=domains.VERSION,
        )

    def read_file(self, backbone: str) -> Path:
        return self.cache_path(backbone)

    #: what the cached file holds: its backbone, classifier and class names (files of the backbone alone,
    #: from before, keep their own name and are not read)
    CONTENTS = ("backbone", "head", "classes")

    def cache_path(self, backbone: str) -> Path:
        key = fingerprint({"backbone": backbone, **self.settings, "contents": self.CONTENTS}, 16)
        return self.cache_dir / "demo_source" / f"{backbone}-{key}.pt"

    def load(self, backbone: str) -> SourceWeights:
        """The pretrained backbone with its classifier and class names (for LwF and Co-Tuning)."""
        path = self.cache_path(backbone)
        built = not path.exists()
        state = built_once(path, lambda: self.pretrain(backbone), "the demo source model")
        if built:
            log.info("demo source model for %s cached at %s", backbone, path)
        return SourceWeights(state["backbone"], state["head"], list(state["classes"]))

    def pretrain(self, backbone: str) -> dict:
        from safetransfer.common import signals
        from safetransfer.data.datasets import TensorImages, Transformed
        from safetransfer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
        from safetransfer.training.directions import Sum
        from safetransfer.training.engine import Loop, Parts, fit
        from safetransfer.training.regularizers import Omega
        from safetransfer.training.regularizers.l2 import L2
        from safetransfer.training.train_log import TrainLog

        s = self.settings
        log.info("pretraining the demo source model (%s, %d iterations; once, then cached)", backbone, s["iterations"])
        images, labels, classes = domains.make_domain("source", s["images_per_class"], s["image_size"], s["seed"])
        size = s["image_size"]
        dataset = Transformed(
            TensorImages(images, labels),
            range(len(labels)),
            train_transform(size + size // 8, size, IMAGENET_MEAN, IMAGENET_STD),
        )
        generator = torch.Generator().manual_seed(s["seed"])
        loader = DataLoader(dataset, batch_size=s["batch_size"], shuffle=True, drop_last=True, generator=generator)
        with torch.random.fork_rng():
            torch.manual_seed(s["seed"])
            model = TransferNet(backbone, len(classes))
            optimizer = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s["iterations"])
            omega = Omega({"l2": L2(alpha=1e-4)})
            cpu = torch.device("cpu")
            try:  # a stop request ends it within a step: nothing is cached, the next run pretrains again
                fit(
                    Parts(model, omega, Sum(), optimizer, scheduler, loader, cpu),
                    Loop(s["iterations"], log_every=max(1, s["iterations"] // 4)),
                    TrainLog(None, [], cpu, total=s["iterations"], desc="demo source"),
                    stop=signals.current(),
                )
            except signals.Preempted as stopped:
                raise signals.Preempted(stopped.signum, 0, None, during="pretraining the demo source model") from None
        return {"backbone": model.backbone.state_dict(), "head": model.head.state_dict(), "classes": list(classes)}
