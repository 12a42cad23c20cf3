"""Stanford Dogs: 120 breeds, the official train_list.mat / test_list.mat (12,000 / 8,580)."""

from __future__ import annotations

from pathlib import Path

from safetransfer.common.registry import register
from safetransfer.data.targets.files import ListedTarget

IMAGES_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar"
LISTS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/lists.tar"


@register("target", "stanford_dogs")
class StanfordDogs(ListedTarget):
    name = "stanford_dogs"
    official_classes = 120
    official_split = (12000, 8580)
    title = "Stanford Dogs"
    folder = "stanford_dogs"
    required = ("Images", "train_list.mat", "test_list.mat")
    layout = "Images/<wnid>-<breed>/<image>.jpg"
    # md5s as pinned by several public loaders of this release
    archives = (
        (IMAGES_URL, "md5:1bb1f2a596ae7057f99d7d75860002ef"),
        (LISTS_URL, "md5:edbb9f16854ec66506b5f09b583e0656"),
    )

    def _listed(self, split: str) -> tuple[list[str], list[int]]:
        from scipy.io import loadmat

        mat = loadmat(self.base / f"{split}_list.mat")
        files = [str(entry[0][0]) for entry in mat["file_list"]]
        return files, [int(label) - 1 for label in mat["labels"].ravel()]  # the lists count breeds from 1

    @property
    def classes(self) -> list[str]:
        files, labels = self._listed("train")
        return [folder for _, folder in sorted({(label, f.split("/")[0]) for f, label in zip(files, labels)})]

    def read_split(self, split: str) -> tuple[list[Path], list[int]]:
        files, labels = self._listed(split)
        return [self.base / "Images" / f for f in files], labels
