"""Batch Spectral Shrinkage (BSS paper, Equation 8):

    Omega(w) = eta * sum_{i=1..k} sigma_{-i}^2

sigma_{-i} is the i-th smallest singular value of the batch feature matrix (the pooled
features the head reads, batch x dim). Shrinking the smallest singular values
suppresses the feature directions that transfer badly. torch.linalg.svdvals's gradient
stays finite when singular values repeat or are zero (it needs no 1/(s_i^2 - s_j^2)
terms, unlike a full SVD's).
"""

from __future__ import annotations

import torch

from safetransfer.backbones import Features, TransferNet, at_least_fp32
from safetransfer.errors import ConfigError
from safetransfer.regularizers.base import Term


class BSS(Term):
    diagnostic_names = ("sigma_min", "sigma_max")

    coefficients = ("eta",)

    def __init__(self, eta: float = 0.001, k: int = 1, decay: float = 1.0):
        super().__init__(decay)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k={k} must be an integer >= 1 (the paper uses k=1)")
        self.eta, self.k = self.coefficient("eta", eta), k
        self.singular_values = None

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        matrix = at_least_fp32(features.pooled)  # SVD in bf16 is neither supported nor accurate
        if self.k >= min(matrix.shape):
            raise ConfigError(
                f"regularizer.terms.bss.k={self.k} must be smaller than the batch size and the feature "
                f"dimension (batch features are {tuple(matrix.shape)}); lower k or raise train.batch_size")
        singular_values = torch.linalg.svdvals(matrix)  # descending
        self.singular_values = singular_values.detach()
        return self.eta * self.scale * singular_values[-self.k:].square().sum()

    def diagnostics(self) -> dict[str, float]:
        if self.singular_values is None:
            return {}
        return {"sigma_min": float(self.singular_values[-1]), "sigma_max": float(self.singular_values[0])}
