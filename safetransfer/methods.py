"""A method's name in results tables: a pure function of the regularizer's name and the
direction strategy, e.g. ('L2-SP', 'Sum') -> 'L2-SP', ('L2-SP', 'DTNH') -> 'DTNH (L2-SP)'.

Tables and plots name the methods of finished runs from their saved configs, so this
module imports nothing of the project: reading results never builds a model or a term.
"""

from __future__ import annotations

#: direction strategy (its class name) -> how it dresses the regularizer's name
LABELS = {"Sum": "{regularizer}", "DTNH": "DTNH ({regularizer})"}


def method_label(regularizer: str, direction: str) -> str:
    """The table name of `regularizer` stepped by the direction strategy named `direction`
    (a class name of safetransfer.directions; another strategy is named after its class)."""
    return LABELS.get(direction, direction + " ({regularizer})").format(regularizer=regularizer)


def method_name(cfg) -> str:
    """The method's name for a composed config (its regularizer.name and direction._target_)."""
    return method_label(str(cfg.regularizer.name), str(cfg.direction._target_).rsplit(".", 1)[-1])
