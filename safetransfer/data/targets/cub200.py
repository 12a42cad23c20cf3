"""CUB-200-2011: 200 bird species, the official train_test_split.txt (5,994 / 5,794)."""

from __future__ import annotations

from pathlib import Path

from safetransfer.common.registry import register
from safetransfer.data.lists import list_lines
from safetransfer.data.targets.files import ListedTarget

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"


def numbered(path: Path) -> dict[int, str]:
    """CUB's '<id> <value>' list files."""
    rows = (line.split(maxsplit=1) for line in list_lines(path, "target=cub200"))
    return {int(index): value.strip() for index, value in rows}


@register("target", "cub200")
class CUB200(ListedTarget):
    name = "cub200"
    official_classes = 200
    official_split = (5994, 5794)
    title = "CUB-200-2011"
    folder = "CUB_200_2011"
    required = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    layout = "images/<class>/<image>.jpg"
    archives = ((URL, f"md5:{MD5}"),)
    archives_hold_folder = True

    @property
    def classes(self) -> list[str]:
        return [name for _, name in sorted(numbered(self.base / "classes.txt").items())]

    def read_split(self, split: str) -> tuple[list[Path], list[int]]:
        images = numbered(self.base / "images.txt")
        labels = numbered(self.base / "image_class_labels.txt")
        is_train = numbered(self.base / "train_test_split.txt")
        ids = sorted(i for i in images if is_train[i] == ("1" if split == "train" else "0"))
        return [self.base / "images" / images[i] for i in ids], [int(labels[i]) - 1 for i in ids]
