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
    """<root>/mit_indoor67/{Images/<class>/<image>.jpg, TrainImages.txt, TestImages.txt}, with the
    real lists' quirk: file names repeat across class folders (TrainImages.txt has 25 such pairs,
    e.g. bathroom/indoor_0323.jpg and bedroom/indoor_0323.jpg; TestImages.txt has url.jpg in three
    folders). Here every class's first training image is indoor_0323.jpg and its last test image url.jpg."""
    base = root / "mit_indoor67"
    names = [f"scene_{chr(ord('a') + c)}" for c in range(classes)]
    lists = {"train": [], "test": []}
    for c, name in enumerate(names):
        for j in range(train_per_class + test_per_class):
            file = {0: "indoor_0323.jpg", train_per_class + test_per_class - 1: "url.jpg"}.get(j, f"img_{j:03d}.jpg")
            relative = f"{name}/{file}"
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
        savemat(
            base / f"{split}_list.mat",
            {
                "file_list": cells,
                "annotation_list": annotations,
                "labels": np.array(labels, dtype=np.uint8).reshape(-1, 1),
            },
        )
    return {"classes": folders, "train": classes * train_per_class, "test": classes * test_per_class}


def make_cifar10(root: Path, per_class: int = 3, test_per_class: int = 2) -> dict:
    """<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} as pickled dicts."""
    import pickle

    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(labels):
        return {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": list(labels)}

    train_labels = np.repeat(np.arange(10), per_class)
    for i, chunk in enumerate(np.array_split(train_labels, 5), start=1):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(chunk.tolist())))
    (base / "test_batch").write_bytes(pickle.dumps(batch(np.repeat(np.arange(10), test_per_class).tolist())))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class_{c}" for c in range(10)]}))
    return {"train": 10 * per_class, "test": 10 * test_per_class, "classes": 10}


def make_flowers102(root: Path) -> dict:
    """<root>/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}: all 102 classes,
    one training, one validation and one test image each."""
    from scipy.io import savemat

    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    image_id = 0
    for c in range(102):
        for split in ("trnid", "valid", "tstid"):
            image_id += 1
            write_jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", seed=image_id, size=24)
            labels.append(c + 1)
            ids[split].append(image_id)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    return {"train": 102, "test": 102, "classes": 102}


def make_oxford_pets(
    root: Path, breeds=("Abyssinian", "basset_hound", "Bengal"), trainval: int = 3, test: int = 2
) -> dict:
    """<root>/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    lines = {"trainval": [], "test": []}
    for c, breed in enumerate(breeds):
        species = 1 if breed[0].isupper() else 2  # cats are capitalised in the release
        for n in range(trainval + test):
            write_jpeg(base / "images" / f"{breed}_{n + 1}.jpg", seed=10 * c + n)
            lines["trainval" if n < trainval else "test"].append(f"{breed}_{n + 1} {c + 1} {species} {c + 1}")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return {"train": len(breeds) * trainval, "test": len(breeds) * test, "classes": len(breeds)}


def make_fgvc_aircraft(
    root: Path, variants=("707-320", "A300B4", "Cessna 172"), trainval: int = 3, test: int = 2
) -> dict:
    """<root>/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_{trainval,test}.txt}."""
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = {"trainval": [], "test": []}
    image_id = 1000000
    for variant in variants:
        for n in range(trainval + test):
            image_id += 1
            write_jpeg(data / "images" / f"{image_id}.jpg", seed=image_id)
            lines["trainval" if n < trainval else "test"].append(f"{image_id} {variant}")
    for split, rows in lines.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return {"train": len(variants) * trainval, "test": len(variants) * test, "classes": len(variants)}


def make_stanford_cars(root: Path, classes: int = 3, train: int = 3, test: int = 2) -> dict:
    """<root>/stanford_cars/{cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat}, the annotations as struct arrays with the release's fields."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, classes), dtype=object)
    for c in range(classes):
        names[0, c] = f"Make Model {2000 + c}"
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    for split, per_class, folder, mat in (
        ("train", train, "cars_train", base / "devkit" / "cars_train_annos.mat"),
        ("test", test, "cars_test", base / "cars_test_annos_withlabels.mat"),
    ):
        annotations = np.zeros((1, classes * per_class), dtype=fields)
        for i in range(classes * per_class):
            fname = f"{i + 1:05d}.jpg"
            write_jpeg(base / folder / fname, seed=i + (0 if split == "train" else 500))
            annotations[0, i] = (1, 1, 30, 30, i // per_class + 1, fname)
        savemat(mat, {"annotations": annotations})
    return {"train": classes * train, "test": classes * test, "classes": classes}


def make_stanford_cars_all_images(root: Path, classes: int = 3, train: int = 3, test: int = 2) -> dict:
    """The all-images release of Stanford Cars (car_ims.tgz and cars_annos.mat):
    <root>/stanford_cars/{car_ims/NNNNNN.jpg, cars_annos.mat}. cars_annos.mat holds `annotations`,
    a 1 x N struct array with the fields relative_im_path ('car_ims/000001.jpg'), bbox_x1,
    bbox_y1, bbox_x2, bbox_y2, class (from 1) and test (0 / 1), and `class_names`, a 1 x 196 cell
    (fields as public readers of the file index them). Images are numbered class by class, with
    training and test images mixed as in the release."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = np.empty((1, classes), dtype=object)
    for c in range(classes):
        names[0, c] = f"Make Model {2000 + c}"
    fields = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    annotations = np.zeros((1, classes * (train + test)), dtype=fields)
    for i in range(classes * (train + test)):
        c, j = divmod(i, train + test)
        relative = f"car_ims/{i + 1:06d}.jpg"
        write_jpeg(base / relative, seed=700 + i)
        number = lambda v: np.array([[v]], dtype=np.uint8)
        annotations[0, i] = (
            np.array([relative]),
            number(1),
            number(1),
            number(30),
            number(30),
            number(c + 1),
            number(int(j % 2 == 1 and j < 2 * test)),
        )
    savemat(base / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return {"train": classes * train, "test": classes * test, "classes": classes}


def make_caltech256(root: Path, classes: int = 3, per_class=(9, 8, 10)) -> dict:
    """<root>/caltech256/256_ObjectCategories/<NNN.name>/<NNN_XXXX>.jpg, with the clutter class."""
    base = root / "caltech256" / "256_ObjectCategories"
    names = [f"{c + 1:03d}.object_{c}" for c in range(classes)] + ["257.clutter"]
    counts = list(per_class) + [5]
    for c, (name, count) in enumerate(zip(names, counts)):
        number = 257 if name == "257.clutter" else c + 1
        for j in range(count):
            write_jpeg(base / name / f"{number:03d}_{j + 1:04d}.jpg", seed=50 * c + j, size=24)
    return {"classes": names[:-1]}
