"""Training on a given list of images instead of our own stratified sample.

The BSS authors released the exact per-class subsets they trained on at 15/30/50/100 %
(thuml/Batch-Spectral-Shrinkage, ft-datalist/): `target.sample_list=bss` downloads the
list of the target and sampling rate on first use into `target.sample_list_dir`, checks
its pinned sha256 and trains on exactly those images. `target.sample_list=<path>` takes a
local list in the same format (one `<split>/<class folder>/<file name>` per line, no
digest check).

A list names images by its authors' folder layout; they are matched to the dataset's own
training files by file name, and by as much more of the path as it takes where two files
share a name. Every listed name must be a training file of the dataset, found once, and all
names under one class folder of the list must carry one label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from safetransfer.common.downloads import fetch_archive
from safetransfer.common.errors import ConfigError
from safetransfer.data.lists import list_lines

BSS_URL = "https://raw.githubusercontent.com/thuml/Batch-Spectral-Shrinkage/master/ft-datalist/{file}"
#: our target name -> the prefix of the authors' list files
BSS_PREFIXES = {
    "stanford_dogs": "StanfordDogs",
    "cub200": "cub200",
    "stanford_cars": "stanford_cars",
    "oxford_pets": "Oxford-IIIT",
    "fgvc_aircraft": "FGVCAircraft",
}
BSS_RATES = (15, 30, 50, 100)
#: sha256 of the released lists (ft-datalist/ at the time of writing)
BSS_SHA256 = {
    "FGVCAircraft_100_train.txt": "8c9133df988100a3dbc7e3e4173034bd0b422621ef66b64b27e930f2e427903f",
    "FGVCAircraft_15_train.txt": "466d5e6e04bb8e29244297d0e96f767990095d050602854fe8c5330f1a4bcf9b",
    "FGVCAircraft_30_train.txt": "eaf95346a4829eb048d584ea6ff0219cd5984ad8d7a93874b51c95f39b5b89b4",
    "FGVCAircraft_50_train.txt": "d0a154e70ef2d4bf23ae24c2733fac4c88d9e4a31fa9991e8fd0d724a670dd4a",
    "Oxford-IIIT_100_train.txt": "44bfe6842a144cd46a33870b3bbc44606691c1fa8725d8e9fe4888d4e1acf8cb",
    "Oxford-IIIT_15_train.txt": "443d8d74162fc0bfad4a8eee1035b5d2583e79154696b377adbf66dc261cef6e",
    "Oxford-IIIT_30_train.txt": "d169d278c1942ca00c6dc6647f24e9955025cb4b4e1c96831324570cbe2e1729",
    "Oxford-IIIT_50_train.txt": "4287a80ca8eea4481e9fa51be512a321bbf1e04728d9d826f95500f5b8e31fe8",
    "StanfordDogs_100_train.txt": "a538d0b07d578949fb5d49850088111578f8f1c062ab3cd8c2ebcfe8f529b6d9",
    "StanfordDogs_15_train.txt": "9571413dfe39dcb2be909a8d0ebfc06502ccfffbc4edb83da7f9f2a3f19392ad",
    "StanfordDogs_30_train.txt": "293a916515e5c92a67e9aef44b0e24478aa7066031ba332d4d263caeddfa015c",
    "StanfordDogs_50_train.txt": "9233db12dc54efc34afe013b0772a333c8bffbd6f8ad1e2ca6185e32e67df389",
    "cub200_100_train.txt": "72fcd3cda4bd8db348e76c5ed41dc46b805128dfe078a1a18b8a954cf2391038",
    "cub200_15_train.txt": "0252ca56a08259d0b77f14f8795127253c66c0b84de59722e4397590ab5a4500",
    "cub200_30_train.txt": "bb2b0bde86040f0b6dc385dde59f944f36bdf5e21c3be1e69a30e458b8efb59a",
    "cub200_50_train.txt": "ac0cb4444a39b29f30b64c79b6c13f2007607c2107086543a3165736269a3875",
    "stanford_cars_100_train.txt": "14e666e716f67ef049d82c80ceb0f1ee7e9b373aafa9d1fc75b602683889706b",
    "stanford_cars_15_train.txt": "b35de4e31a107ec97f95ea02ea1f986066f6d83ba021d405c42f3ce9867ceb8c",
    "stanford_cars_30_train.txt": "1407ba3dd4f83b349246cdd1e2270d3eedf2f85c814ee9d13e7a9622048554b7",
    "stanford_cars_50_train.txt": "4c847c88db6c63d82886f838adbb992e0a38357bd8175bb1c02d865e4c0def3f",
}


def bss_list_file(target: str, rate: float) -> str:
    if target not in BSS_PREFIXES:
        raise ConfigError(
            f"target.sample_list=bss: the BSS authors released lists for {', '.join(BSS_PREFIXES)}, "
            f"not for target={target}; use target.sample_list=null (our stratified sample)"
        )
    if rate not in BSS_RATES:
        raise ConfigError(
            f"target.sample_list=bss: the BSS authors' lists are for target.sampling_rate "
            f"{', '.join(map(str, BSS_RATES))}, not {rate:g}"
        )
    return f"{BSS_PREFIXES[target]}_{int(rate)}_train.txt"


def bss_list(target: str, rate: float, directory: Path) -> Path:
    """The authors' list for `target` at `rate`, downloaded into `directory` on first use and
    checked against its pinned sha256 (a damaged download is removed, a damaged copy
    already there is named)."""
    name = bss_list_file(target, rate)
    directory = Path(directory).expanduser()
    fetch_archive(BSS_URL.format(file=name), directory, f"sha256:{BSS_SHA256[name]}", key="target.sample_list_dir")
    return directory / name


def read_list(path: Path) -> list[str]:
    try:
        return list_lines(path, "target.sample_list")
    except OSError as error:
        raise ConfigError(
            f"target.sample_list={path}: cannot read it ({error.strerror}); give a list file with one "
            "<split>/<class folder>/<file name> per line"
        ) from None


def listed_indices(entries: Sequence[str], files: Sequence[str], labels: np.ndarray, origin: str) -> np.ndarray:
    """Sorted indices of the training files named by `entries`.

    An entry is matched by its file name; where training files share that name (MIT Indoor
    67 has 25 such pairs, e.g. bathroom/indoor_0323.jpg and bedroom/indoor_0323.jpg), by its
    class folder and file name, then by more of its path, until one file is left. An entry
    that names no training file, or stays ambiguous, is refused, naming it."""
    paths = [Path(f).parts for f in files]
    by_name: dict[str, list[int]] = {}
    for index, parts in enumerate(paths):
        by_name.setdefault(parts[-1], []).append(index)
    chosen, folder_label, seen = [], {}, {}
    for entry in entries:
        parts = Path(entry).parts
        candidates = by_name.get(parts[-1], [])
        if not candidates:
            raise ConfigError(
                f"{origin}: {entry} is not a training image of this dataset (no training file "
                f"named {parts[-1]}); the list is for another dataset or split"
            )
        depth = 1
        while len(candidates) > 1 and depth < len(parts):
            narrowed = [i for i in candidates if paths[i][-(depth + 1) :] == parts[-(depth + 1) :]]
            if not narrowed:
                break
            candidates, depth = narrowed, depth + 1
        if len(candidates) > 1:
            shown = ", ".join(str(files[i]) for i in candidates[:3])
            raise ConfigError(
                f"{origin}: {entry} is ambiguous: {len(candidates)} training files end in "
                f"{'/'.join(parts[-depth:])} ({shown}); name its class folder as the dataset does"
            )
        index = candidates[0]
        if index in seen:
            raise ConfigError(f"{origin}: {entry} is listed more than once (also as {seen[index]})")
        seen[index] = entry
        folder = str(Path(entry).parent)
        if folder_label.setdefault(folder, int(labels[index])) != int(labels[index]):
            raise ConfigError(
                f"{origin}: {entry} has label {int(labels[index])} here, while other images of "
                f"{folder} have {folder_label[folder]}; the list's classes do not match the dataset's"
            )
        chosen.append(index)
    return np.sort(np.asarray(chosen, dtype=np.int64))
