"""Direction strategies: DTNH's projection checked against NumPy arithmetic, with
hypothesis generating the gradients."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from safetransfer.training.directions import DTNH, Sum

SHAPES = [(3,), (2, 2), (1,), (4, 1)]
# zero or of a size whose square does not underflow (a gradient of norm ~1e-190 counts as zero)
magnitudes = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False, width=64)
finite = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x))
gradient_lists = st.tuples(*[arrays(np.float64, shape, elements=finite) for shape in SHAPES])


def torch_list(arrays_):
    return [torch.from_numpy(np.array(a)) for a in arrays_]


def flat(arrays_):
    return np.concatenate([np.asarray(a).ravel() for a in arrays_])


@settings(max_examples=300, deadline=None)
@given(gradient_lists, gradient_lists)
def test_global_projection(g_J, g_Omega):
    d_tensors = DTNH("global")(torch_list(g_J), torch_list(g_Omega))
    assert [tuple(t.shape) for t in d_tensors] == SHAPES  # one d per parameter tensor, shaped like it
    d = flat([t.numpy() for t in d_tensors])
    J, O = flat(g_J), flat(g_Omega)
    scale = np.linalg.norm(J) * (np.linalg.norm(J) + np.linalg.norm(O)) + 1e-300
    # d never points against g_J
    assert d @ J >= -1e-9 * scale
    if J @ O >= 0 or not J.any():
        np.testing.assert_allclose(d, J + O, rtol=1e-12, atol=1e-12)  # acute: d is the plain sum
    else:
        removed = (J + O) - d
        coefficient = (J @ O) / (J @ J)
        magnitude = np.abs(J).max() + np.abs(O).max()  # rounding of J + O is relative to this
        np.testing.assert_allclose(removed, coefficient * J, rtol=1e-9, atol=1e-12 * magnitude)
        assert abs(d @ J - J @ J) <= 1e-9 * scale  # what remains of g_Omega is orthogonal to g_J


@settings(max_examples=300, deadline=None)
@given(gradient_lists, gradient_lists)
def test_tensor_projection_is_per_tensor_arithmetic(g_J, g_Omega):
    d = [t.numpy() for t in DTNH("tensor")(torch_list(g_J), torch_list(g_Omega))]
    for d_t, J, O in zip(d, g_J, g_Omega):
        J, O = np.asarray(J).ravel(), np.asarray(O).ravel()
        expected = J + O
        if J @ O < 0 and J @ J > 0:
            expected = J + O - (J @ O) / (J @ J) * J
        magnitude = np.abs(J).max() + np.abs(O).max()
        np.testing.assert_allclose(d_t.ravel(), expected, rtol=1e-9, atol=1e-12 * magnitude)
        assert d_t.ravel() @ J >= -1e-9 * (J @ J + np.abs(J).sum() * np.abs(O).sum() + 1e-300)


def test_one_dtnh_gives_each_step_its_own_direction():
    """DTNH keeps its buffers (the zero g_Omega, d) from step to step: each step's zero
    g_Omega is zero again, and each d is that step's projection (NumPy), whether g_Omega is
    the kept buffer or a list of its own."""
    rng = np.random.default_rng(0)
    dtnh = DTNH()
    for step in range(4):
        J = [rng.standard_normal(shape) for shape in SHAPES]
        O = [-0.7 * j + 0.3 * rng.standard_normal(j.shape) for j in J]  # obtuse: the projection acts
        if step % 2 == 0:
            g_Omega = dtnh.zero_gradient(torch_list(J))
            assert all(not g.any() for g in g_Omega)
            torch._foreach_add_(g_Omega, torch_list(O))
        else:
            g_Omega = torch_list(O)
        d = dtnh(torch_list(J), g_Omega)
        flat_J, flat_O = flat(J), flat(O)
        assert flat_J @ flat_O < 0
        expected = flat_J + flat_O - (flat_J @ flat_O) / (flat_J @ flat_J) * flat_J
        assert [tuple(t.shape) for t in d] == SHAPES
        np.testing.assert_allclose(flat([t.numpy() for t in d]), expected, rtol=1e-12, atol=1e-12)


def test_dtnh_aligns_gradients_of_different_layouts_and_keeps_the_parameters_layout():
    """A channels-last weight: its zero g_Omega and d are channels-last like it (the
    optimizer's fast path), and a g_J laid out otherwise is still added element by element
    to the right entries of g_Omega (NumPy on the logical arrays)."""
    rng = np.random.default_rng(1)
    weight = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)
    params = [weight, torch.zeros(5, dtype=torch.float64).float()]
    J = [rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(5)]
    O = [-0.5 * J[0] + rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(5)]
    dtnh = DTNH()
    g_Omega = dtnh.zero_gradient(params)
    assert g_Omega[0].is_contiguous(memory_format=torch.channels_last) and not g_Omega[0].is_contiguous()
    torch._foreach_add_(g_Omega, [torch.tensor(o, dtype=torch.float32) for o in O])
    g_J = [torch.tensor(j, dtype=torch.float32) for j in J]  # contiguous, unlike the weight
    d = dtnh(g_J, g_Omega)
    assert d[0].stride() == weight.stride()
    flat_J, flat_O = flat(J), flat(O)
    expected = flat_J + flat_O - min(flat_J @ flat_O, 0) / (flat_J @ flat_J) * flat_J
    np.testing.assert_allclose(flat([t.numpy() for t in d]), expected, rtol=1e-5, atol=1e-5)


def test_hand_worked_example():
    def g_J():
        return [torch.tensor([1.0, 0.0])]

    g_Omega = [torch.tensor([-1.0, 1.0])]  # 135 degrees from g_J
    d = DTNH()(g_J(), g_Omega)[0]
    torch.testing.assert_close(d, torch.tensor([1.0, 1.0]))  # g_Omega loses its (-1, 0) part
    acute = [torch.tensor([1.0, 2.0])]
    torch.testing.assert_close(DTNH()(g_J(), acute)[0], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(Sum()(g_J(), g_Omega)[0], torch.tensor([0.0, 1.0]))
    assert g_Omega[0].tolist() == [-1.0, 1.0]  # g_Omega itself is never modified


@pytest.mark.parametrize("degrees", [91.0, 100.0, 117.0, 150.0, 179.0])
def test_what_dtnh_removes_is_cos_squared_of_the_pull(degrees):
    """The README's reading of log.csv's angle_J_Omega: at an obtuse angle theta between
    g_J and g_Omega, what DTNH keeps of g_Omega (d - g_J) is its part orthogonal to g_J,
    sin^2(theta) of ||g_Omega||^2; at 100 degrees, 97 % of the pull."""
    rng = np.random.default_rng(int(degrees))
    e1, e2 = np.linalg.qr(rng.standard_normal((1000, 2)))[0].T
    theta = np.deg2rad(degrees)
    J, O = 2.5 * e1, 0.7 * (np.cos(theta) * e1 + np.sin(theta) * e2)
    d = flat([t.numpy() for t in DTNH("global")(torch_list([J]), torch_list([O]))])
    kept = d - J  # what DTNH keeps of g_Omega
    assert kept @ kept / (O @ O) == pytest.approx(np.sin(theta) ** 2, rel=1e-9, abs=1e-12)
    assert abs(kept @ J) <= 1e-12 * (J @ J)


def test_global_and_tensor_modes_differ_when_only_one_tensor_conflicts():
    def g_J():
        return [torch.tensor([1.0]), torch.tensor([1.0])]

    g_Omega = [torch.tensor([-0.5]), torch.tensor([3.0])]  # globally acute, first tensor obtuse
    assert [float(t) for t in DTNH("global")(g_J(), g_Omega)] == [0.5, 4.0]
    assert [float(t) for t in DTNH("tensor")(g_J(), g_Omega)] == [1.0, 4.0]


def test_zero_empirical_gradient_leaves_the_regularizer_alone():
    g_Omega = [torch.tensor([1.0, -2.0, 3.0])]
    for granularity in ("global", "tensor"):
        d = DTNH(granularity)([torch.zeros(3)], g_Omega)[0]
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, g_Omega[0])


def test_method_labels_and_a_bad_granularity():
    from safetransfer.reporting.methods import method_label

    assert method_label("L2-SP", "sum") == "L2-SP" and method_label("L2-SP", "dtnh") == "DTNH (L2-SP)"
    assert method_label("L2-SP", "spd") == "SPD (L2-SP)"  # a strategy without a label of its own
    with pytest.raises(ValueError, match="granularity"):
        DTNH("layer")


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_dtnh_step_is_the_papers_algorithm_line_by_line(seed):
    """DTNH's flat-buffer step against directions.dtnh_reference (Algorithm 1's lines on one
    vector), on conflicting and agreeing gradient pairs of several tensor shapes, in float64."""
    from safetransfer.training.directions import DTNH, dtnh_reference

    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (4,), (10, 4), (10,)]
    g_J = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    g_Omega = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    if seed % 2:  # make the pair conflict: g_Omega pulled against g_J
        g_Omega = [o - 3 * j for o, j in zip(g_Omega, g_J)]
    expected = dtnh_reference(g_J, g_Omega)
    d = DTNH()([g.clone() for g in g_J], [o.clone() for o in g_Omega])
    torch.testing.assert_close(torch.cat([x.flatten() for x in d]), expected, rtol=1e-12, atol=1e-12)
    flat_J = torch.cat([g.flatten() for g in g_J])
    flat_O = torch.cat([o.flatten() for o in g_Omega])
    if torch.dot(flat_J, flat_O) < 0:
        assert abs(float(torch.dot(flat_J, expected - flat_J))) < 1e-9  # the kept pull is orthogonal to g_J
    else:
        torch.testing.assert_close(expected, flat_J + flat_O)


@pytest.mark.parametrize("chunk", [2**20, 2**30])  # the CPU's chunks (the last one short), or whole as on a GPU
def test_the_projection_sums_are_float64_exact_on_10_million_float32_values(monkeypatch, chunk):
    """10 M float32 gradient entries that are multiples of 2^-12 in (-1, 1): every product is a
    multiple of 2^-24 and every partial sum an integer below 2^53 times 2^-24, so NumPy's int64
    arithmetic gives the two sums exactly (the known sums). Dots64 must return them to the last
    bit; float32 accumulation (torch.dot) is far off on this many values; DTNH's d must be
    (1 - c) g_J + g_Omega, with c from the exact sums, to float32 rounding."""
    from safetransfer.training.directions import Dots64

    monkeypatch.setattr(Dots64, "CPU_CHUNK", chunk)
    rng = np.random.default_rng(0)
    n = 10_000_000
    k_J = rng.integers(-4095, 4096, n, dtype=np.int64)
    k_Omega = rng.integers(-4095, 4096, n, dtype=np.int64) - 600  # leans against g_J's direction on average
    k_Omega[: n // 2] = -k_J[: n // 2]  # half of it pulls straight back: the angle is obtuse
    J = torch.from_numpy((k_J * 2.0**-12).astype(np.float32))
    Omega = torch.from_numpy((k_Omega * 2.0**-12).astype(np.float32))
    dot_known = float(np.sum(k_J * k_Omega)) * 2.0**-24
    squared_known = float(np.sum(k_J * k_J)) * 2.0**-24
    assert dot_known < 0, "the case must exercise the projection"

    dot, squared = Dots64()(J, Omega)
    assert float(dot) == dot_known and float(squared) == squared_known
    assert abs(float(torch.dot(J, J)) - squared_known) / squared_known > 1e-6  # what float32 sums would give

    c = dot_known / squared_known
    d = torch.cat([t.flatten() for t in DTNH()([J.clone()], [Omega.clone()])])
    expected = (1 - c) * J.double() + Omega.double()
    torch.testing.assert_close(d.double(), expected, rtol=3e-7, atol=3e-7)
