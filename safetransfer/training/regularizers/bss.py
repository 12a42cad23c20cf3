"""Batch Spectral Shrinkage (BSS paper, Equation 8):

    Omega(w) = eta * sum_{i=1..k} sigma_{-i}^2

sigma_{-i} is the i-th smallest singular value of the batch feature matrix F (the pooled
features the head reads, batch x dim). Shrinking the smallest singular values
suppresses the feature directions that transfer badly.

How it is computed (the formula is the paper's; the arithmetic is not the released
code's `torch.svd`): the sigma_i^2 are the eigenvalues of the smaller Gram matrix, F F^T
for a batch no larger than the feature dimension (48 x 48 at the papers' batch), F^T F
otherwise. It is formed in float64 and its eigenvectors are solved on the host
(`torch.linalg.eigh`, float64); the term is then ||U_k^T F||^2 with U_k the k eigenvectors of
the smallest eigenvalues, held constant. Its value is the sum of those eigenvalues and its
gradient 2 U_k U_k^T F is exactly the derivative of that sum (where the k-th and (k+1)-th
eigenvalues differ; where they tie, the sum has no derivative and this is one of its
subgradients), finite for repeated and zero singular values. Why not the GPU's SVD: on
CUDA every SVD or eigensolver waits for the GPU anyway, and for such a small matrix
cuSOLVER's fixed costs made `svdvals` 1.4-1.8 ms of a 13-21 ms step on an H100.
"""

from __future__ import annotations

import math

import torch

from safetransfer.common.errors import ConfigError
from safetransfer.training.backbones import Features, TransferNet, at_least_fp32
from safetransfer.training.regularizers.base import Term


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
                f"dimension (batch features are {tuple(matrix.shape)}); lower k or raise train.batch_size"
            )
        wide = matrix.shape[0] <= matrix.shape[1]
        exact = matrix.double()
        with torch.no_grad():
            gram = (exact @ exact.T if wide else exact.T @ exact).cpu()
        if not torch.isfinite(gram).all():  # eigh would raise: let the step's finiteness check name the term
            self.singular_values = None
            return exact.sum() * math.nan
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        self.singular_values = eigenvalues.clamp_min(0).sqrt().flip(0)  # descending, on the host
        smallest = eigenvectors[:, : self.k].to(matrix.device)  # U_k, a constant
        projected = smallest.T @ exact if wide else exact @ smallest
        return self.eta * self.scale * projected.square().sum().to(matrix.dtype)

    def diagnostics(self) -> dict[str, float]:
        if self.singular_values is None:
            return {}
        return {"sigma_min": float(self.singular_values[-1]), "sigma_max": float(self.singular_values[0])}
