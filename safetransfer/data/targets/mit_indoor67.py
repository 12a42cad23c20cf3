"""MIT Indoor-67: 67 indoor scene classes, the official TrainImages.txt / TestImages.txt
(77-83 / 17-23 images per class: 5,360 / 1,340). File names repeat across class folders
(25 pairs in TrainImages.txt, e.g. bathroom/indoor_0323.jpg and bedroom/indoor_0323.jpg;
url.jpg in three folders of TestImages.txt): images are always named with their folder."""

from __future__ import annotations

from pathlib import Path

from safetransfer.common.registry import register
from safetransfer.data.lists import list_lines
from safetransfer.data.targets.files import ListedTarget

IMAGES_URL = "http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar"
TRAIN_LIST_URL = "http://web.mit.edu/torralba/www/TrainImages.txt"
TEST_LIST_URL = "http://web.mit.edu/torralba/www/TestImages.txt"


@register("target", "mit_indoor67")
class MITIndoor67(ListedTarget):
    name = "mit_indoor67"
    official_classes = 67
    official_split = (5360, 1340)
    title = "MIT Indoor-67"
    folder = "mit_indoor67"
    required = ("Images", "TrainImages.txt", "TestImages.txt")
    layout = "Images/<class>/<image>.jpg"
    # the image archive's sha1 as pinned by a public loader (vipy); no digest is known for the two lists
    archives = (
        (IMAGES_URL, "sha1:0b252516e746ba428b96af408d2e8162d9b08ac5"),
        (TRAIN_LIST_URL, None),
        (TEST_LIST_URL, None),
    )

    def _listed(self, split: str) -> list[str]:
        path = self.base / ("TrainImages.txt" if split == "train" else "TestImages.txt")
        return list_lines(path, f"target={self.name}")

    @property
    def classes(self) -> list[str]:
        return sorted({entry.split("/")[0] for split in ("train", "test") for entry in self._listed(split)})

    def read_split(self, split: str) -> tuple[list[Path], list[int]]:
        index = {name: i for i, name in enumerate(self.classes)}
        entries = self._listed(split)
        return [self.base / "Images" / e for e in entries], [index[e.split("/")[0]] for e in entries]
