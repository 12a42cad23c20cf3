"""The regularizer Omega as a sum of terms, each with its own coefficient."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from safetransfer.common.errors import ConfigError
from safetransfer.common.fingerprints import fingerprint
from safetransfer.training.backbones import Features, TransferNet


@dataclass
class BindContext:
    """What a term may need before training, besides the network.

    `train_data` is the sampled target training set with the test-time transform (no
    augmentation); `identity` describes the backbone, source, target and data so that a
    term can cache what it computes from them (DELTA's channel attention).
    """

    device: torch.device = torch.device("cpu")
    train_data: Dataset | None = None
    batch_size: int = 48
    cache_dir: Path | None = None
    identity: dict = field(default_factory=dict)
    #: the source's own classifier (`weight`, `bias`) and class names, where the source has them; a term
    #: that reads the source model's predictions keeps it on the network (TransferNet.keep_source_head)
    source_head: dict | None = None
    source_classes: list[str] | None = None
    #: one pass over the training images in their order, each under a draw of the training augmentation:
    #: batches of images on the device (what TLlib's LwF records its source logits from)
    train_augmented: Callable[[], Iterator[torch.Tensor]] | None = None

    def source_classifier(self, term: str, reads: str) -> dict:
        """The source's own classifier for a term that `reads` the source model's predictions, or one line
        naming the term and the sources that have one."""
        if self.source_head is None:
            raise ConfigError(
                f"regularizer.terms.{term}: {reads}, and this source has no classifier: choose one that has "
                "(source=imagenet, places365, a file with its classifier, a source pretrained here)"
            )
        return self.source_head

    def cache_path(self, kind: str, settings: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / kind / f"{fingerprint({'identity': self.identity, 'settings': settings}, 20)}.pt"


#: the largest coefficient a term takes: float32's largest number (gradients are float32)
COEFFICIENT_LIMIT = float(torch.finfo(torch.float32).max)


class Term:
    """One summand of Omega. Its coefficients are scaled by decay**epoch (lambda_e = lambda * decay^e).

    Subclasses implement `value` and, when the gradient has a closed form,
    `add_gradient`; `bind` receives the network before training (to record the
    source weights, say).
    """

    #: True when `add_gradient` is a closed form and `value` need not be differentiated.
    closed_form = False
    #: the names of the coefficients this term multiplies by decay**epoch, each set with `coefficient`
    coefficients: tuple[str, ...] = ()
    #: extra columns this term adds to log.csv (see `diagnostics`)
    diagnostic_names: tuple[str, ...] = ()

    def __init__(self, decay: float = 1.0):
        if not _number(decay) or not 0.0 <= decay <= 1.0:
            raise ConfigError(f"decay={decay} is outside [0, 1] (lambda_e = lambda * decay^epoch; 1 = no decay)")
        self.decay = float(decay)
        self.scale = 1.0

    @staticmethod
    def coefficient(name: str, value) -> float:
        """A coefficient's value, checked: a finite number >= 0 (a ConfigError naming it otherwise)."""
        if not _number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}={value} must be a finite number >= 0")
        if value > COEFFICIENT_LIMIT:  # gradients are float32: such a coefficient overflows at once
            raise ConfigError(f"{name}={value} is beyond float32's range; give a value <= {COEFFICIENT_LIMIT:.1e}")
        return float(value)

    def coefficient_values(self) -> dict[str, float]:
        """The coefficients by name: those the class declares, else its float attributes."""
        names = self.coefficients or [
            name for name, value in vars(self).items() if isinstance(value, float) and name not in ("decay", "scale")
        ]
        return {name: getattr(self, name) for name in names}

    def set_epoch(self, epoch: int) -> None:
        self.scale = self.decay**epoch

    #: whether `bind` adds modules (and parameters) to the network
    adds_modules = False
    #: whether the term reads which training items a batch holds (Features.indices)
    needs_indices = False
    #: augmented views of each training image the term reads: 2 gives it a second view of the batch
    #: (Features.views), drawn independently of the one the network sees (Bi-Tuning's key)
    views = 1

    def check_backbone(self, model: TransferNet, batch_size: int | None = None) -> None:
        """Raise ValueError (naming the setting) when the term cannot run on this network (and batch
        size); called before training on an outline of it (no weights) and again by `bind`."""

    def bind(self, model: TransferNet, context: BindContext) -> None:
        """Called once with the target network, after the source weights are loaded."""

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        """The term, coefficients included."""
        raise NotImplementedError

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """grads += d(term)/d(params), coefficients included, in place; closed-form terms only."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """Values for the `diagnostic_names` columns, from the last `value` call."""
        return {}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Selection:
    """The positions of some parameters inside the trainable-parameter list the engine
    passes around, found once and reused at every step."""

    def __init__(self, chosen: Sequence[nn.Parameter]):
        self.chosen = list(chosen)
        self._key, self._positions = None, []

    def grads(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._key != id(params):
            index = {id(p): i for i, p in enumerate(params)}
            self._key, self._positions = id(params), [index[id(p)] for p in self.chosen]
        return [grads[i] for i in self._positions]


class Omega:
    """Omega(w) = sum of the selected terms."""

    def __init__(self, terms: Mapping[str, Term]):
        self.terms = dict(terms)

    @property
    def autograd_terms(self) -> dict[str, Term]:
        return {name: t for name, t in self.terms.items() if not t.closed_form}

    @property
    def closed_form_terms(self) -> dict[str, Term]:
        return {name: t for name, t in self.terms.items() if t.closed_form}

    @property
    def needs_indices(self) -> bool:
        return any(t.needs_indices for t in self.terms.values())

    def bind(self, model: TransferNet, context: BindContext | None = None) -> None:
        """Each term bound to the network: those that add modules to it first (LwF's source classifier),
        so that a term over all parameters (L2) finds them."""
        for term in sorted(self.terms.values(), key=lambda t: not t.adds_modules):
            term.bind(model, context or BindContext())

    def set_epoch(self, epoch: int) -> None:
        for term in self.terms.values():
            term.set_epoch(epoch)

    def autograd_values(self, model: TransferNet, features: Features) -> dict[str, torch.Tensor]:
        """The terms that autograd differentiates, each with its graph."""
        return {name: t.value(model, features) for name, t in self.autograd_terms.items()}

    @torch.no_grad()
    def closed_form_values(self, model: TransferNet) -> dict[str, torch.Tensor]:
        return {name: t.value(model, None) for name, t in self.closed_form_terms.items()}

    @torch.no_grad()
    def add_closed_form_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """grads += the gradient of every closed-form term, in place."""
        for term in self.closed_form_terms.values():
            term.add_gradient(params, grads)

    def diagnostic_names(self) -> list[str]:
        return [f"{name}_{column}" for name, t in self.terms.items() for column in t.diagnostic_names]

    def diagnostics(self) -> dict[str, float]:
        return {
            f"{name}_{column}": value for name, t in self.terms.items() for column, value in t.diagnostics().items()
        }
