"""A method's name in results tables: a pure function of the regularizer's name and the
direction strategy, e.g. ('L2-SP', 'sum') -> 'L2-SP', ('L2-SP', 'dtnh') -> 'DTNH (L2-SP)';
plain fine-tuning from a random initialisation is 'From scratch'. A source's name in tables carries
what it was trained on (`pretrained:vehicles`).

Tables and plots name the methods of finished runs from their saved configs, so this
module imports nothing of the project: reading results never builds a model or a term.
"""

from __future__ import annotations

from pathlib import PurePath

#: direction strategy (its registered name) -> how it dresses the regularizer's name
LABELS = {"sum": "{regularizer}", "dtnh": "DTNH ({regularizer})"}
#: the no-transfer baseline's name: plain fine-tuning (or the BSS paper's L2) from random weights
SCRATCH = "From scratch"
PLAIN = ("Fine-tuning", "L2")


#: what else, besides Omega and the direction, makes a method (registered names -> table names): the
#: backbone's normalization (`normalization.kind`) and an optimizer that decays on its own (`optim.optimizer.kind`)
MODIFIERS = {"stochnorm": "StochNorm", "sgd_spd": "SPD", "adam_spd": "SPD"}
#: an optimizer that a modifier adds to, by the optimizer it adds to (SPD after SGD's step is SGD's setting)
BASE_OPTIMIZERS = {"sgd_spd": "sgd", "adam_spd": "adam"}


def method_label(regularizer: str, direction: str, modifiers: list[str] = ()) -> str:
    """The table name of `regularizer` stepped by the direction strategy named `direction`
    (its registered name, `direction.kind`; another strategy is named after its name in capitals);
    `modifiers` (StochNorm, SPD) name plain fine-tuning on their own and follow any other regularizer
    (L2-SP+StochNorm, DTNH (LwF+SPD))."""
    if modifiers:
        regularizer = "+".join(modifiers if regularizer in PLAIN else [regularizer, *modifiers])
    return LABELS.get(direction, direction.upper() + " ({regularizer})").format(regularizer=regularizer)


def from_scratch(source) -> bool:
    """Whether a source config is the random initialisation (source=scratch)."""
    return source.get("kind") == "scratch"


#: the terms of plain fine-tuning (Fine-tuning, the BSS paper's L2): every other method's reference
#: unless it is a DTNH or a +BSS variant; BSS's term name; the direction of a plain sum
PLAIN_TERMS, BSS_TERM, SUM = ("l2",), "bss", "sum"


def method_structure(cfg) -> dict:
    """What a method is, recorded in metrics.json: its regularizer's name, the names of its terms,
    its direction strategy (its registered name) and whether it starts from scratch.
    Its table name (structure_label) and its reference (reference_key) are derived from it."""
    structure = {
        "regularizer": str(cfg.regularizer.name),
        "terms": sorted(str(term) for term in cfg.regularizer.terms),
        "direction": str(cfg.direction.kind),
        "scratch": from_scratch(cfg.source),
    }
    kinds = [(cfg.get("normalization") or {}).get("kind"), cfg.optim.optimizer.get("kind")]
    modifiers = [MODIFIERS[kind] for kind in kinds if kind in MODIFIERS]
    if modifiers:  # absent otherwise: a method without them keeps the structure it always had
        structure["modifiers"] = modifiers
    return structure


def structure_label(structure: dict) -> str:
    """The table name: plain fine-tuning from source=scratch is the no-transfer baseline, 'From
    scratch' (another method from scratch keeps its name; the source column says scratch)."""
    label = method_label(structure["regularizer"], structure["direction"], structure.get("modifiers", ()))
    return SCRATCH if structure.get("scratch") and label in PLAIN else label


def method_name(cfg) -> str:
    """The method's name for a composed config."""
    return structure_label(method_structure(cfg))


def reference_key(structure: dict) -> tuple[frozenset, str] | None:
    """(terms, direction, modifiers) of the method a method is compared with, seed by seed: the same terms
    summed for another direction (DTNH (L2-SP) -> L2-SP, and any new strategy likewise), the terms
    without BSS for a +BSS method (L2-SP+BSS -> L2-SP), the same terms without StochNorm or SPD for a
    method with them (StochNorm -> Fine-tuning), plain fine-tuning for the rest; None for
    plain fine-tuning itself and for the From scratch baseline."""
    terms, modifiers = frozenset(structure["terms"]), tuple(structure.get("modifiers", ()))
    if structure.get("scratch") and structure_label(structure) == SCRATCH:
        return None
    if structure["direction"] != SUM:
        return terms, SUM, modifiers
    if BSS_TERM in terms and len(terms) > 1:
        return terms - {BSS_TERM}, SUM, modifiers
    if modifiers:  # StochNorm, L2-SP+SPD: the same terms without them
        return terms, SUM, ()
    return None if terms == frozenset(PLAIN_TERMS) else (frozenset(PLAIN_TERMS), SUM, ())


def key_of(structure: dict) -> tuple[frozenset, str, tuple]:
    """(terms, direction, modifiers) of a method, to match against a reference_key."""
    return frozenset(structure["terms"]), structure["direction"], tuple(structure.get("modifiers", ()))


def describe_reference(structure: dict) -> str:
    """The reference in words, for a line saying it is missing."""
    if structure["direction"] != SUM:
        return f"{structure['regularizer']} without {structure['direction']}"
    if BSS_TERM in structure["terms"]:
        return f"{structure['regularizer']} without BSS"
    if structure.get("modifiers"):
        return f"{structure['regularizer']} without {'+'.join(structure['modifiers'])}"
    return "plain fine-tuning (Fine-tuning or L2)"


def source_label(source) -> str:
    """A source's name in tables: with the dataset a pretrained source was trained on
    (`pretrained:vehicles`) or a local file's name (`file:resnet18_custom`)."""
    name = str(source.get("name"))
    detail = source.get("dataset") or source.get("model")  # a timm source: its weights' name with their tag
    if detail is None and source.get("path") is not None and name == "file":
        detail = PurePath(str(source.get("path"))).stem
    return f"{name}:{detail}" if detail and str(detail) != name else name
