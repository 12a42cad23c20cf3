"""Tiny fake datasets written in their official on-disk layouts, so that the real parsing
code runs on them. Images are small random JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_cub200(root: Path, classes: int = 3, train_per_class: int = 4, test_per_class: int = 3) -> dict:
    """<root>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}."""
    base = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(classes)]
    images, labels, split = [], [], []
    index = 0
    for c, name in enumerate(names):
        for j in range(train_per_class + test_per_class):
            index += 1
            relative = f"{name}/Bird_{c}_{j:04d}.jpg"
            write_jpeg(base / "images" / relative, seed=index)
            images.append(f"{index} {relative}")
            labels.append(f"{index} {c + 1}")
            split.append(f"{index} {1 if j < train_per_class else 0}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c + 1} {n}" for c, n in enumerate(names)) + "\n")
    return {"classes": classes, "train": classes * train_per_class, "test": classes * test_per_class}
