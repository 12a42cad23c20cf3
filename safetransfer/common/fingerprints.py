"""The one hash that names things by what decides them (a results row's config key, the
decoded-image cache's files, the regularizer terms' caches, the demo source's file), and
the one declaration of what decides each: what never changes a result (NOT_IN_KEY,
WHERE_ONLY) and what chooses images rather than the data (SAMPLING_KEYS)."""

from __future__ import annotations

import hashlib
import json


def fingerprint(payload: object, length: int, data: bytes = b"") -> str:
    """The first `length` hex digits of sha256 over `payload` as sorted-key JSON (values JSON
    cannot hold written as their str), then `data` (raw bytes such as an index array)."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    digest.update(data)
    return digest.hexdigest()[:length]


# What decides what, declared once: the config key of a result, the decoded-image cache's
# identity of a dataset, and the identity the regularizer terms' caches are kept under.

#: config sections (and the launcher group, which only sets hydra.launcher) that change how a
#: job runs or where it writes, never its numbers; search: its chosen values are in the config
NOT_IN_KEY = ("seeds", "runtime", "results", "paths", "hydra", "logger", "search", "launcher")
#: single keys of that kind inside the other sections: where a list is kept (not which list),
#: whether a saved source may be replaced, whether the images are held on the device (the same batches)
WHERE_ONLY = ("target.sample_list_dir", "pretrain.overwrite", "data.on_device")
#: top-level settings a preset gives that are read only through interpolations: their resolved
#: values are keyed where they are read (delta_convention: regularizer.terms.delta.convention),
#: so a job that does not read them (an L2 cell of the same table) keeps its key
READ_THROUGH = ("delta_convention",)
#: the target keys that choose images from its data (sampling, hold-out, lists), not the data itself
SAMPLING_KEYS = (
    "sampling_rate",
    "sampling_seed",
    "resample_per_seed",
    "val_fraction",
    "sample_list",
    "sample_list_dir",
)


#: the classes a config names by `_target_`, under the names they had when the keys were first
#: computed (before the package took its folders): keys are computed over these names, so that a
#: class moved inside the package changes no key and earlier results are still continued,
#: paired and tabulated. A class moved again gets its newest path added here, mapped to the same
#: first name; a new class needs no entry.
KEYED_AS = {
    "safetransfer.data.targets.caltech256.Caltech256": "safetransfer.targets.caltech256.Caltech256",
    "safetransfer.data.targets.cub200.CUB200": "safetransfer.targets.cub200.CUB200",
    "safetransfer.data.targets.demo.DemoTarget": "safetransfer.targets.demo.DemoTarget",
    "safetransfer.data.targets.imagefolder.ImageFolderTarget": "safetransfer.targets.imagefolder.ImageFolderTarget",
    "safetransfer.data.targets.mit_indoor67.MITIndoor67": "safetransfer.targets.mit_indoor67.MITIndoor67",
    "safetransfer.data.targets.stanford_cars.StanfordCars": "safetransfer.targets.stanford_cars.StanfordCars",
    "safetransfer.data.targets.stanford_dogs.StanfordDogs": "safetransfer.targets.stanford_dogs.StanfordDogs",
    "safetransfer.data.targets.torchvision_datasets.TorchvisionTarget": (
        "safetransfer.targets.torchvision_datasets.TorchvisionTarget"
    ),
    "safetransfer.sources.demo.DemoSource": "safetransfer.sources.DemoSource",
    "safetransfer.sources.local.FileSource": "safetransfer.sources.FileSource",
    "safetransfer.sources.local.PretrainedSource": "safetransfer.sources.PretrainedSource",
    "safetransfer.sources.local.Scratch": "safetransfer.sources.Scratch",
    "safetransfer.sources.published.ImageNetSource": "safetransfer.sources.ImageNetSource",
    "safetransfer.sources.published.Places365Source": "safetransfer.sources.Places365Source",
    "safetransfer.training.directions.DTNH": "safetransfer.directions.DTNH",
    "safetransfer.training.directions.Sum": "safetransfer.directions.Sum",
    "safetransfer.training.regularizers.bss.BSS": "safetransfer.regularizers.bss.BSS",
    "safetransfer.training.regularizers.delta.DELTA": "safetransfer.regularizers.delta.DELTA",
    "safetransfer.training.regularizers.knowdist.KnowDist": "safetransfer.regularizers.knowdist.KnowDist",
    "safetransfer.training.regularizers.l2.HeadL2": "safetransfer.regularizers.l2.HeadL2",
    "safetransfer.training.regularizers.l2.L2": "safetransfer.regularizers.l2.L2",
    "safetransfer.training.regularizers.l2sp.L2SP": "safetransfer.regularizers.l2sp.L2SP",
}


def keyed_names(node):
    """`node` (a config as plain containers) with each `_target_` under its name in KEYED_AS."""
    if isinstance(node, dict):
        return {k: KEYED_AS.get(v, v) if k == "_target_" else keyed_names(v) for k, v in node.items()}
    if isinstance(node, list):
        return [keyed_names(v) for v in node]
    return node


#: the terms that read the training images through the one-view test transform (BindContext.train_data),
#: by their keyed names (KEYED_AS)
TRAIN_IMAGE_TERMS = ("safetransfer.regularizers.delta.DELTA",)


def as_before(container: dict) -> None:
    """Leave out the keys added after results were keyed where they compute what was computed
    before they existed, so that those results keep their keys: data.test_resize at
    shorter_side (the one-view test transform before it), or beside ten test crops (always
    taken from the resize x resize square)."""
    data = container.get("data", {})
    terms = (container.get("regularizer") or {}).get("terms") or {}
    reads_train_images = any(
        isinstance(t, dict) and t.get("_target_") in TRAIN_IMAGE_TERMS for t in terms.values()
    )  # DELTA's attention sees the training images through the one-view transform, ten test crops or not
    if data.get("test_resize") == "shorter_side" or (data.get("test_crops", 1) != 1 and not reads_train_images):
        data.pop("test_resize", None)


def decisive(cfg) -> dict:
    """The resolved config without what never changes a result (NOT_IN_KEY, WHERE_ONLY,
    READ_THROUGH, as_before), its classes under their KEYED_AS names."""
    from omegaconf import OmegaConf

    container = keyed_names(OmegaConf.to_container(cfg, resolve=True))
    for section in (*NOT_IN_KEY, *READ_THROUGH):
        container.pop(section, None)
    for dotted in WHERE_ONLY:
        section, key = dotted.split(".")
        container.get(section, {}).pop(key, None)
    as_before(container)
    return container


def config_key(cfg) -> str:
    """Fingerprint of everything that determines a row's numbers (not seeds, not runtime)."""
    return fingerprint(decisive(cfg), 12)


def data_identity(target: dict) -> dict:
    """A target's settings that decide its images (its data, not the sample drawn from it)."""
    return {key: value for key, value in keyed_names(target).items() if key not in SAMPLING_KEYS}


def term_identity(cfg) -> dict:
    """What a regularizer term may cache from before training (DELTA's attention): the backbone,
    source, target and data sections that decide it."""
    container = decisive(cfg)
    identity = {key: container.get(key) for key in ("backbone", "source", "target", "data")}
    # the terms read the training images through the one-view test transform (data.train_plain),
    # also beside ten test crops, where as_before leaves test_resize out of the result's key
    resize = cfg.data.get("test_resize", "square")
    if resize != "shorter_side" and identity["data"] is not None:
        identity["data"] = {**identity["data"], "test_resize": resize}
    return identity
