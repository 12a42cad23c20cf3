"""One registry of names: the classes a config may build, each under the name its YAML gives it
(`direction: {kind: dtnh}`), as timm's `register_model` names models.

A config names a registered kind, never code: a `_target_` in one of the project's nodes is refused,
so no value from a file or an override runs anything but the project's registered classes. Config
keys, tables and caches speak in these names, so moving a class to another module changes nothing
a user sees.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from safetransfer.common.errors import ConfigError

#: what each kind of object is, and the modules that register its classes when imported
KINDS = {
    "direction": ("the direction strategy", ("safetransfer.training.directions",)),
    "term": (
        "a regularizer term",
        tuple(
            f"safetransfer.training.regularizers.{m}"
            for m in ("l2", "l2sp", "knowdist", "delta", "bss", "lwf", "co_tuning", "bi_tuning")
        ),
    ),
    "normalization": ("the backbone's normalization", ("safetransfer.training.normalization",)),
    "optimizer": ("the optimizer", ("safetransfer.training.engine", "safetransfer.training.spd")),
    "scheduler": ("the lr schedule", ("safetransfer.training.engine",)),
    "source": (
        "the source",
        (
            "safetransfer.sources.local",
            "safetransfer.sources.published",
            "safetransfer.sources.demo",
            "safetransfer.sources.timm_hub",
        ),
    ),
    "target": (
        "the target dataset",
        (
            "safetransfer.data.targets.caltech256",
            "safetransfer.data.targets.cub200",
            "safetransfer.data.targets.demo",
            "safetransfer.data.targets.imagefolder",
            "safetransfer.data.targets.mit_indoor67",
            "safetransfer.data.targets.stanford_cars",
            "safetransfer.data.targets.stanford_dogs",
            "safetransfer.data.targets.torchvision_datasets",
        ),
    ),
}
_REGISTERED: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str):
    """Class decorator: `name` builds this class wherever a config asks for a `kind`."""

    def add(factory: Callable) -> Callable:
        _REGISTERED[kind][name] = factory
        return factory

    return add


def known(kind: str) -> dict[str, Callable]:
    """{name: class} of a kind, its modules imported first."""
    for module in KINDS[kind][1]:
        importlib.import_module(module)
    return _REGISTERED[kind]


def lookup(kind: str, name, key: str) -> Callable:
    """The class registered as `name`, or one line naming the key and the allowed names."""
    found = known(kind)
    if name not in found:
        raise ConfigError(f"{key}.kind={name} is not a known {kind}; allowed: {', '.join(sorted(found))}")
    return found[name]


def build(kind: str, node, key: str, **late):
    """The object a config node describes: its registered `kind` called with the node's other values
    (and `late` arguments such as an optimizer's parameters). A constructor's complaint about a value
    ("alpha=-1 must be ...") comes back under the node's key (regularizer.terms.l2sp.alpha=-1 ...)."""
    from omegaconf import DictConfig, OmegaConf

    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "_target_" in options:
        raise ConfigError(
            f"{key}._target_={options['_target_']} names code to run; a config names {KINDS[kind][0]} by its "
            f"registered name: {key}.kind=<{', '.join(sorted(known(kind)))}>"
        )
    factory = lookup(kind, options.pop("kind", None), key)
    try:
        return factory(**options, **late)
    except TypeError as error:  # a key the class does not take
        raise ConfigError(f"{key}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"{key}.{error}") from None


def parameters(kind: str, node, key: str) -> set[str] | None:
    """The keys a node's class takes (None: any), for a sweep whose nodes of this kind differ."""
    signature = inspect.signature(lookup(kind, node.get("kind"), key))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {"kind", *signature.parameters}
