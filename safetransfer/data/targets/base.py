"""The target dataset: its official train and test splits as datasets of (image, label)
pairs, the image a PIL image or a uint8 (3, H, W) tensor, and the images a job trains on
(a per-class sample, a released list, a validation hold-out).

A target is one small module in this folder with a `Target` subclass plus one YAML in
conf/target/; sampling (data/sampling.py) and transforms (data/transforms.py) are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from safetransfer.common.errors import ConfigError
from safetransfer.data import sample_lists
from safetransfer.data.sampling import hold_out, stratified_sample


class Target:
    """A target dataset with its official split and a sampling rate in percent."""

    def __init__(
        self,
        name: str,
        sampling_rate: float = 100,
        sampling_seed: int = 0,
        val_fraction: float = 0.0,
        resample_per_seed: bool = False,
        sample_list: str | None = None,
        sample_list_dir: str | None = None,
    ):
        self.name = name
        self.sampling_rate = sampling_rate
        self.sampling_seed = sampling_seed
        self.val_fraction = val_fraction
        self.resample_per_seed = resample_per_seed
        self.sample_list = sample_list  # None | "bss" | a path (see data/sample_lists.py)
        self.sample_list_dir = sample_list_dir

    #: whether the target reads files at all (the demo's are generated: nothing to fetch)
    reads_files = True

    def check(self) -> None:
        """Raise ConfigError when the data is missing or inconsistent, before training."""

    #: the cached properties holding what was read from disk (dropped before a download), for a
    #: target whose `download` flag makes its dataset class download the files
    read_caches: tuple[str, ...] = ()

    def fetch(self) -> bool:
        """Make sure the data is present and complete, downloading (and verifying) what is missing
        where the target can; returns whether anything was downloaded. Raises MissingData for data
        that cannot be downloaded, DownloadError or ConfigError for the rest."""
        try:
            self.check()
            return False
        except ConfigError:
            if not self.read_caches or getattr(self, "download", True):
                raise
        self.download = True  # the dataset class's own download, its checksums checked
        for cached in self.read_caches:
            self.__dict__.pop(cached, None)
        self.check()
        return True

    @property
    def classes(self) -> Sequence[str]:
        raise NotImplementedError

    def train_set(self) -> Dataset:
        raise NotImplementedError

    def test_set(self) -> Dataset:
        raise NotImplementedError

    def train_labels(self) -> np.ndarray:
        """The label of every training image, in dataset order (for stratified sampling)."""
        raise NotImplementedError

    def train_files(self) -> Sequence[str]:
        """The file of every training image, in dataset order (to match a sample list)."""
        raise ConfigError(f"target={self.name} has no image files to match a list against; set target.sample_list=null")

    def listed_train_indices(self) -> np.ndarray:
        """The training images named by target.sample_list."""
        if self.sample_list == "bss":
            path = sample_lists.bss_list(self.name, self.sampling_rate, Path(self.sample_list_dir or "."))
        else:
            path = Path(str(self.sample_list)).expanduser()
        return sample_lists.listed_indices(
            sample_lists.read_list(path), self.train_files(), self.train_labels(), f"target.sample_list={path}"
        )

    def sampled_train_indices(self, seed: int | None = None) -> np.ndarray:
        """The sampled training images (before any validation hold-out), drawn with
        `sampling_seed`, or with `seed` when given (target.resample_per_seed); the images of
        target.sample_list when one is given."""
        if self.sample_list:
            return self.listed_train_indices()
        return stratified_sample(self.train_labels(), self.sampling_rate, self.sampling_seed if seed is None else seed)

    def split_train_val(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices: `val_fraction` of each class of the sampled set held out."""
        sampled = self.sampled_train_indices(seed)
        if not self.val_fraction:
            return sampled, np.array([], dtype=np.int64)
        return hold_out(
            sampled,
            self.train_labels()[sampled],
            self.val_fraction,
            (self.sampling_seed if seed is None else seed) + 1_000_003,
        )
