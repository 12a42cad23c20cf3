"""Regularizer terms against independent computations (NumPy, finite differences)."""

import numpy as np
import pytest
import torch
from torch import nn

from safetransfer.regularizers import Omega
from safetransfer.regularizers.l2 import L2


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def test_l2_value_matches_numpy():
    model = tiny_model()
    alpha = 0.37
    expected = alpha / 2 * sum(np.sum(p.detach().numpy() ** 2) for p in model.parameters())
    assert float(L2(alpha).value(model, None).detach()) == pytest.approx(expected, rel=1e-12)


def test_l2_ignores_frozen_parameters():
    model = tiny_model()
    model[0].weight.requires_grad_(False)
    expected = 0.5 * sum(np.sum(p.detach().numpy() ** 2) for p in model.parameters() if p.requires_grad)
    assert float(L2(1.0).value(model, None)) == pytest.approx(expected, rel=1e-12)


def test_l2_gradient_matches_finite_differences():
    model = tiny_model()
    term = L2(0.25)
    params = list(model.parameters())
    grads = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        term.add_gradient(params, grads)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat, flat_grad = p.data.view(-1), g.view(-1)
        for i in range(0, flat.numel(), 3):
            original = flat[i].item()
            flat[i] = original + eps
            up = float(term.value(model, None))
            flat[i] = original - eps
            down = float(term.value(model, None))
            flat[i] = original
            assert flat_grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


def test_gradient_is_added_in_place_to_what_is_there():
    model = tiny_model()
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    Omega({"l2": L2(0.5)}).add_closed_form_gradient(params, grads)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g.detach().numpy(), 1 + 0.5 * p.detach().numpy())


def test_coefficient_decays_per_epoch():
    term = L2(0.1, decay=0.5)
    omega = Omega({"l2": term})
    omega.set_epoch(0)
    assert term.coefficient == pytest.approx(0.1)
    omega.set_epoch(3)
    assert term.coefficient == pytest.approx(0.1 * 0.125)
    with pytest.raises(ValueError, match="decay"):
        L2(0.1, decay=1.5)


def test_closed_form_terms_need_no_autograd():
    assert Omega({"l2": L2(0.1)}).autograd_value(tiny_model(), None) is None
