"""The regularizer Omega as a sum of terms, each with its own coefficient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from safetransfer.backbones import TransferNet


class Term:
    """One summand of Omega, scaled by its coefficient lambda_e = lambda * decay**epoch.

    Subclasses implement `value` and, when the gradient has a closed form,
    `add_gradient`; `bind` receives the network before training (to record the
    source weights, say).
    """

    #: True when `add_gradient` is a closed form and `value` need not be differentiated.
    closed_form = False

    def __init__(self, coefficient: float, decay: float = 1.0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} is outside [0, 1]; lambda_e = lambda * decay**epoch")
        self.base_coefficient = float(coefficient)
        self.decay = float(decay)
        self.coefficient = self.base_coefficient

    def set_epoch(self, epoch: int) -> None:
        self.coefficient = self.base_coefficient * self.decay**epoch

    def bind(self, model: TransferNet) -> None:
        """Called once with the target network, after the source weights are loaded."""

    def value(self, model: TransferNet, features: torch.Tensor) -> torch.Tensor:
        """The term, coefficient included."""
        raise NotImplementedError

    def add_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """grads += d(term)/d(params), coefficient included, in place; closed-form terms only."""
        raise NotImplementedError


class Omega:
    """Omega(w) = sum of the selected terms."""

    def __init__(self, terms: Mapping[str, Term]):
        self.terms = dict(terms)

    def bind(self, model: TransferNet) -> None:
        for term in self.terms.values():
            term.bind(model)

    def set_epoch(self, epoch: int) -> None:
        for term in self.terms.values():
            term.set_epoch(epoch)

    def autograd_value(self, model: TransferNet, features: torch.Tensor) -> torch.Tensor | None:
        """The part of Omega that autograd differentiates (None when every term is closed-form)."""
        values = [t.value(model, features) for t in self.terms.values() if not t.closed_form]
        return torch.stack(values).sum() if values else None

    def add_closed_form_gradient(self, params: Sequence[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """grads += the gradient of every closed-form term, in place."""
        for term in self.terms.values():
            if term.closed_form:
                term.add_gradient(params, grads)

    @torch.no_grad()
    def values(self, model: TransferNet, features: torch.Tensor) -> dict[str, float]:
        """Each term's value, for the log."""
        return {name: float(term.value(model, features)) for name, term in self.terms.items()}
