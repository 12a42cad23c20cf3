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
cuSOLVER's fixed costs are a large part of a step (BENCHMARKS.md has the figures).

The Gram matrix squares F's condition number: for float32 features (every training run) its
float64 eigenvalues keep more digits than a float32 SVD has, but for float64 features (the
tests, a user's `double()` check) it would lose what float64 holds: at condition 1e8 the
gradient came out 20 % off. Float64 features therefore take U_k from the SVD of F itself
(`torch.linalg.svd`, float64, on the host), exact to float64 rounding.
"""

from __future__ import annotations

import math

import torch

from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import register
from safetransfer.training.backbones import Features, TransferNet, at_least_fp32
from safetransfer.training.regularizers.base import Term


@register("term", "bss")
class BSS(Term):
    diagnostic_names = ("sigma_min", "sigma_max")

    coefficients = ("eta",)

    def __init__(self, eta: float = 0.001, k: int = 1, decay: float = 1.0):
        super().__init__(decay)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k={k} must be an integer >= 1 (the paper uses k=1)")
        self.eta, self.k = self.coefficient("eta", eta), k
        self.singular_values = None

    def check_backbone(self, model: TransferNet, batch_size: int | None = None) -> None:
        """k counts singular values of a batch x features matrix: fewer than both sizes."""
        limit = min(batch_size or math.inf, model.backbone.num_features)
        if not self.k < limit:
            raise ValueError(
                f"k={self.k} must be an integer in [1, {limit - 1}]: fewer than train.batch_size={batch_size} and "
                f"the feature dimension {model.backbone.num_features} (the paper uses k=1)"
            )

    def bind(self, model: TransferNet, context) -> None:
        self.check_backbone(model, context.batch_size)

    def value(self, model: TransferNet, features: Features) -> torch.Tensor:
        matrix = at_least_fp32(features.pooled)  # SVD in bf16 is neither supported nor accurate
        wide = matrix.shape[0] <= matrix.shape[1]
        exact = matrix.double()
        with torch.no_grad():  # U_k is a constant of the term's graph
            if matrix.dtype == torch.float64:  # the SVD of F: the Gram matrix would square its condition
                host, solve = exact.detach().cpu(), self.by_svd
            else:
                host, solve = (exact @ exact.T if wide else exact.T @ exact).cpu(), self.by_gram
            finite = bool(torch.isfinite(host).all())
            if finite:
                self.singular_values, vectors = solve(host, wide)  # descending; singular vectors of F, ascending
        if not finite:  # eigh and svd would raise: let the finiteness guard name the term
            self.singular_values = None
            return exact.sum() * math.nan
        smallest = vectors[:, : self.k].to(matrix.device)  # U_k (or V_k for a tall F), a constant
        projected = smallest.T @ exact if wide else exact @ smallest
        return self.eta * self.scale * projected.square().sum().to(matrix.dtype)

    @staticmethod
    def by_gram(gram: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values (descending) and the singular vectors spanning the Gram matrix's side,
        smallest first, from its eigendecomposition."""
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
        return eigenvalues.clamp_min(0).sqrt().flip(0), eigenvectors

    @staticmethod
    def by_svd(features: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from the SVD of F: its left singular vectors for a wide F, its right ones for a tall F."""
        u, singular_values, vh = torch.linalg.svd(features, full_matrices=False)  # descending
        return singular_values, (u if wide else vh.T).flip(1)

    def diagnostics(self) -> dict[str, float]:
        if self.singular_values is None:
            return {}
        return {"sigma_min": float(self.singular_values[-1]), "sigma_max": float(self.singular_values[0])}
