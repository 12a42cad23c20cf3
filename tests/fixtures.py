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


def make_mit_indoor67(root: Path, classes: int = 3, train_per_class: int = 4, test_per_class: int = 2) -> dict:
    """<root>/mit_indoor67/{Images/<class>/<image>.jpg, TrainImages.txt, TestImages.txt}."""
    base = root / "mit_indoor67"
    names = [f"scene_{chr(ord('a') + c)}" for c in range(classes)]
    lists = {"train": [], "test": []}
    for c, name in enumerate(names):
        for j in range(train_per_class + test_per_class):
            relative = f"{name}/img_{j:03d}.jpg"
            write_jpeg(base / "Images" / relative, seed=100 * c + j)
            lists["train" if j < train_per_class else "test"].append(relative)
    (base / "TrainImages.txt").write_text("\n".join(lists["train"]) + "\n")
    (base / "TestImages.txt").write_text("\n".join(lists["test"]) + "\n")
    (base / "Images" / "unlisted_class").mkdir()  # folders not in the lists are not classes
    return {"classes": names, "train": len(lists["train"]), "test": len(lists["test"])}


def make_stanford_dogs(root: Path, classes: int = 3, train_per_class: int = 4, test_per_class: int = 2) -> dict:
    """<root>/stanford_dogs/{Images/<wnid>-<breed>/<image>.jpg, train_list.mat, test_list.mat},
    the .mat files with the release's fields (file_list, annotation_list, labels)."""
    from scipy.io import savemat

    base = root / "stanford_dogs"
    folders = [f"n0208{5620 + c}-Breed_{c}" for c in range(classes)]
    lists = {"train": ([], []), "test": ([], [])}
    for c, folder in enumerate(folders):
        for j in range(train_per_class + test_per_class):
            relative = f"{folder}/{folder.split('-')[0]}_{j}.jpg"
            write_jpeg(base / "Images" / relative, seed=1000 + 100 * c + j)
            files, labels = lists["train" if j < train_per_class else "test"]
            files.append(relative)
            labels.append(c + 1)  # the release counts breeds from 1
    for split, (files, labels) in lists.items():
        cells = np.empty((len(files), 1), dtype=object)
        annotations = np.empty((len(files), 1), dtype=object)
        for i, name in enumerate(files):
            cells[i, 0] = np.array([name])
            annotations[i, 0] = np.array([name[:-4]])
        savemat(base / f"{split}_list.mat", {"file_list": cells, "annotation_list": annotations,
                                              "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1)})
    return {"classes": folders, "train": classes * train_per_class, "test": classes * test_per_class}
