"""Direction strategies: how the empirical-loss gradient g_J and the regularizer
gradient g_Omega become the step direction d."""

from __future__ import annotations

import torch


class Direction:
    """Turns (g_J, g_Omega), two lists aligned with the trainable parameters, into d."""

    #: False when d depends on g_J and g_Omega only through their sum, which lets the
    #: training step get d from a single backward pass of J + Omega.
    needs_both_gradients = True

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def method_name(self, regularizer_name: str) -> str:
        """The method's name in results tables, e.g. 'L2-SP' or 'DTNH (L2-SP)'."""
        raise NotImplementedError


class Sum(Direction):
    """d = g_J + g_Omega: ordinary regularized fine-tuning."""

    needs_both_gradients = False

    def __call__(self, g_J: list[torch.Tensor], g_Omega: list[torch.Tensor]) -> list[torch.Tensor]:
        return torch._foreach_add(g_J, g_Omega)

    def method_name(self, regularizer_name: str) -> str:
        return regularizer_name
