"""Regularizer terms and Omega, their sum (DTNH paper, Equation 1: min_w J(w) + Omega(w)).

Each term lives in a module of its own and has a config in conf/regularizer/. A term
whose gradient has a closed form (weight-space terms such as L2) gives it directly, so
that it costs no backward pass; a term computed on features is differentiated by
autograd.
"""

from safetransfer.training.regularizers.base import BindContext, Omega, Term

__all__ = ["BindContext", "Omega", "Term"]
