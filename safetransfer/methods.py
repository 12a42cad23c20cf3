"""A method's name in results tables: a pure function of the regularizer's name and the
direction strategy, e.g. ('L2-SP', 'Sum') -> 'L2-SP', ('L2-SP', 'DTNH') -> 'DTNH (L2-SP)';
plain fine-tuning from a random initialisation is 'From scratch'. A source's name in tables carries
what it was trained on (`pretrained:vehicles`).

Tables and plots name the methods of finished runs from their saved configs, so this
module imports nothing of the project: reading results never builds a model or a term.
"""

from __future__ import annotations

from pathlib import PurePath

#: direction strategy (its class name) -> how it dresses the regularizer's name
LABELS = {"Sum": "{regularizer}", "DTNH": "DTNH ({regularizer})"}
#: the no-transfer baseline's name: plain fine-tuning (or the BSS paper's L2) from random weights
SCRATCH = "From scratch"
PLAIN = ("Fine-tuning", "L2")


def method_label(regularizer: str, direction: str) -> str:
    """The table name of `regularizer` stepped by the direction strategy named `direction`
    (a class name of safetransfer.directions; another strategy is named after its class)."""
    return LABELS.get(direction, direction + " ({regularizer})").format(regularizer=regularizer)


def from_scratch(source) -> bool:
    """Whether a source config is the random initialisation (source=scratch)."""
    return str(source.get("_target_", "")).rsplit(".", 1)[-1] == "Scratch"


def method_name(cfg) -> str:
    """The method's name for a composed config (its regularizer.name and direction._target_);
    plain fine-tuning from source=scratch is the no-transfer baseline, 'From scratch' (another
    method from scratch keeps its name; the source column says scratch)."""
    label = method_label(str(cfg.regularizer.name), str(cfg.direction._target_).rsplit(".", 1)[-1])
    return SCRATCH if label in PLAIN and from_scratch(cfg.source) else label


def is_scratch(method: str) -> bool:
    """Whether a method name (a table column, with or without its [..] suffix) is the From scratch baseline."""
    return method.partition(" [")[0] == SCRATCH


def source_label(source) -> str:
    """A source's name in tables: with the dataset a pretrained source was trained on
    (`pretrained:vehicles`) or a local file's name (`file:resnet18_custom`)."""
    name = str(source.get("name"))
    detail = source.get("dataset")
    if detail is None and source.get("path") is not None and name == "file":
        detail = PurePath(str(source.get("path"))).stem
    return f"{name}:{detail}" if detail and str(detail) != name else name
