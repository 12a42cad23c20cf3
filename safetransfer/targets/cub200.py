"""CUB-200-2011: 200 bird species, the official train_test_split.txt (5,994 / 5,794)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from safetransfer.errors import ConfigError
from safetransfer.targets import Target
from safetransfer.targets.files import ImageList, check_class_count, fetch_archive, split_sizes

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


class CUB200(Target):
    def __init__(self, root: str, name: str = "cub200", download: bool = False, expected_classes: int | None = 200,
                 expected_split: tuple[int, int] | None = (5994, 5794), **sampling):
        super().__init__(name, **sampling)
        self.root = Path(root).expanduser()
        self.download, self.expected_classes = download, expected_classes
        self.expected_split = tuple(expected_split) if expected_split else None

    @property
    def base(self) -> Path:
        return self.root / "CUB_200_2011"

    def check(self) -> None:
        if not all((self.base / f).is_file() for f in FILES):
            if not self.download:
                raise ConfigError(
                    f"target.root={self.root}: CUB-200-2011 not found; expected {self.base}/{{{','.join(FILES)}}} and "
                    f"{self.base}/images/<class>/<image>.jpg: download {URL} (md5 {MD5}) and extract it into "
                    f"{self.root}, or set target.download=true")
            fetch_archive(URL, self.root, MD5)
        check_class_count(self.name, len(self.classes), self.expected_classes, str(self.base / "classes.txt"))
        split_sizes(self.name, len(self._splits["train"]), len(self._splits["test"]), self.expected_split)

    @staticmethod
    def _table(path: Path) -> dict[int, str]:
        rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
        return {int(index): value.strip() for index, value in rows}

    @property
    def classes(self) -> list[str]:
        return [name for _, name in sorted(self._table(self.base / "classes.txt").items())]

    @cached_property
    def _splits(self) -> dict[str, ImageList]:
        images = self._table(self.base / "images.txt")
        labels = self._table(self.base / "image_class_labels.txt")
        is_train = self._table(self.base / "train_test_split.txt")
        splits = {}
        for split, flag in (("train", "1"), ("test", "0")):
            ids = sorted(i for i in images if is_train[i] == flag)
            splits[split] = ImageList([self.base / "images" / images[i] for i in ids],
                                      [int(labels[i]) - 1 for i in ids])
        return splits

    def train_set(self) -> ImageList:
        return self._splits["train"]

    def test_set(self) -> ImageList:
        return self._splits["test"]

    def train_labels(self) -> np.ndarray:
        return self._splits["train"].labels
