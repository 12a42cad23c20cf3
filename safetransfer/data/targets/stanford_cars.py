"""Stanford Cars: 196 car models, 8,144 training / 8,041 test images, in either of the two
releases, recognised from what lies under <root>/stanford_cars/:

- the all-images release (`car_ims.tgz` and `cars_annos.mat`): `car_ims/NNNNNN.jpg` (16,185
  images, 6-digit names) and `cars_annos.mat`, whose `annotations` give each image's
  `relative_im_path`, `class` (from 1) and `test` flag, and whose `class_names` name the
  classes. The BSS authors' lists name these files (`train/<class>/NNNNNN.jpg`);
- torchvision's layout (the devkit release): `cars_train/NNNNN.jpg`, `cars_test/`,
  `devkit/cars_meta.mat`, `devkit/cars_train_annos.mat` and `cars_test_annos_withlabels.mat`,
  read by torchvision's StanfordCars. Its file names are not the lists', so
  `target.sample_list=bss` is refused on it.

Neither release can be downloaded any more (the original site is gone): place a copy by hand.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from safetransfer.common.errors import ConfigError, MissingData
from safetransfer.common.registry import register
from safetransfer.data.targets.files import ImageList, ImageListTarget, check_class_count, split_sizes

FOLDER = "stanford_cars"
ALL_IMAGES = "{car_ims/NNNNNN.jpg,cars_annos.mat}"
TORCHVISION = "{cars_train/,cars_test/,devkit/cars_meta.mat,devkit/cars_train_annos.mat,cars_test_annos_withlabels.mat}"


@register("target", "stanford_cars")
class StanfordCars(ImageListTarget):
    def __init__(
        self,
        root: str,
        name: str = "stanford_cars",
        expected_classes: int | None = 196,
        expected_split=(8144, 8041),
        **sampling,
    ):
        super().__init__(name, **sampling)
        self.root = Path(root).expanduser()
        self.expected_classes = expected_classes
        self.expected_split = tuple(expected_split) if expected_split else None

    @property
    def base(self) -> Path:
        return self.root / FOLDER

    @property
    def layout(self) -> str | None:
        """ "all_images", "torchvision" or None, from what is on disk."""
        if (self.base / "cars_annos.mat").is_file() and (self.base / "car_ims").is_dir():
            return "all_images"
        if (self.base / "devkit" / "cars_meta.mat").is_file():
            return "torchvision"
        return None

    def missing(self) -> MissingData:
        return MissingData(
            f"target.root={self.root}: Stanford Cars not found, and its official downloads are gone: "
            f"place a copy by hand, either the all-images release (car_ims.tgz extracted, and "
            f"cars_annos.mat) as {self.base}/{ALL_IMAGES}, the files the BSS authors' lists name, or "
            f"torchvision's layout {self.base}/{TORCHVISION}"
        )

    def check(self) -> None:
        if self.layout is None:
            raise self.missing()
        if self.sample_list == "bss" and self.layout != "all_images":
            raise ConfigError(
                f"target.sample_list=bss: the BSS authors' Stanford Cars lists name the car_ims/NNNNNN.jpg "
                f"files of the all-images release, which {self.base} (torchvision's layout) does not have; "
                f"place car_ims/ and cars_annos.mat there ({self.base}/{ALL_IMAGES}), or set "
                "target.sample_list=null"
            )
        check_class_count(self.name, len(self.classes), self.expected_classes, str(self.base))
        split_sizes(self.name, len(self._splits["train"]), len(self._splits["test"]), self.expected_split)

    @cached_property
    def _read(self) -> tuple[list[str], dict[str, ImageList]]:
        if self.layout == "all_images":
            return self._all_images()
        if self.layout == "torchvision":
            return self._torchvision()
        raise self.missing()

    def _all_images(self) -> tuple[list[str], dict[str, ImageList]]:
        from scipy.io import loadmat

        mat = loadmat(self.base / "cars_annos.mat")
        classes = [str(cell[0]) for cell in mat["class_names"].ravel()]
        splits = {"train": ([], []), "test": ([], [])}
        for row in mat["annotations"].ravel():
            paths, labels = splits["test" if int(row["test"].item()) else "train"]
            paths.append(self.base / str(row["relative_im_path"].item()))
            labels.append(int(row["class"].item()) - 1)  # the release counts classes from 1
        return classes, {split: ImageList(*pair) for split, pair in splits.items()}

    def _torchvision(self) -> tuple[list[str], dict[str, ImageList]]:
        import torchvision

        splits = {}
        for split in ("train", "test"):
            try:
                dataset = torchvision.datasets.StanfordCars(str(self.root), split=split)
            except (RuntimeError, ValueError, OSError) as error:
                raise ConfigError(
                    f"target.root={self.root}: Stanford Cars in torchvision's layout is incomplete "
                    f"({error}); expected {self.base}/{TORCHVISION}"
                ) from None
            splits[split] = ImageList([path for path, _ in dataset._samples], [label for _, label in dataset._samples])
        return list(dataset.classes), splits

    @property
    def classes(self) -> list[str]:
        return self._read[0]

    @property
    def _splits(self) -> dict[str, ImageList]:
        return self._read[1]
