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


#: keys added after results were keyed without them: left out of the key while they hold the value that
#: every earlier result had, so that adding an option does not change the key of a result that predates it
ADDED_WITH_DEFAULT = {"target.test_dir": "test", "normalization.kind": "batchnorm"}


def decisive(cfg) -> dict:
    """The resolved config without what never changes a result (NOT_IN_KEY, WHERE_ONLY, READ_THROUGH):
    its classes by their registered names (common/registry.py), so a class moved changes no key."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    for section in (*NOT_IN_KEY, *READ_THROUGH):
        container.pop(section, None)
    for dotted in WHERE_ONLY:
        section, key = dotted.split(".")
        container.get(section, {}).pop(key, None)
    for dotted, default in ADDED_WITH_DEFAULT.items():
        section, key = dotted.split(".")
        if container.get(section, {}).get(key, default) == default:
            container.get(section, {}).pop(key, None)
            if container.get(section, None) == {}:  # a section added whole (normalization): absent before
                container.pop(section)
    return container


def config_key(cfg) -> str:
    """Fingerprint of everything that determines a row's numbers (not seeds, not runtime)."""
    return fingerprint(decisive(cfg), 12)


def data_identity(target: dict) -> dict:
    """A target's settings that decide its images (its data, not the sample drawn from it)."""
    added = {k.split(".")[1]: v for k, v in ADDED_WITH_DEFAULT.items() if k.startswith("target.")}
    return {k: v for k, v in target.items() if k not in SAMPLING_KEYS and not (k in added and v == added[k])}


def term_identity(cfg) -> dict:
    """What a regularizer term may cache from before training (DELTA's attention): the backbone,
    source, target and data sections that decide it."""
    container = decisive(cfg)
    return {key: container.get(key) for key in ("backbone", "source", "target", "data")}
