"""Regularizer terms against independent computations: NumPy, finite differences and a
hand-built two-layer network for the feature-map terms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from safetransfer.common.errors import ConfigError
from safetransfer.training.backbones import TransferNet, forward_features
from safetransfer.training.regularizers import BindContext, Omega
from safetransfer.training.regularizers.bss import BSS
from safetransfer.training.regularizers.delta import DELTA, attention_from_increases, channel_loss_increase
from safetransfer.training.regularizers.knowdist import KnowDist
from safetransfer.training.regularizers.l2 import L2, HeadL2
from safetransfer.training.regularizers.l2sp import L2SP
from tiny import STAGES, resnet_shaped


def numpy_params(params):
    return [p.detach().numpy().astype(np.float64) for p in params]


def finite_difference_check(value_fn, tensors, rel=1e-5, abs_=1e-9, stride=3):
    """Compare autograd/closed-form gradients already in `tensors`' .grad-like pairs."""
    eps = 1e-6
    for tensor, grad in tensors:
        flat, flat_grad = tensor.data.view(-1), grad.reshape(-1)
        for i in range(0, flat.numel(), stride):
            original = flat[i].item()
            flat[i] = original + eps
            up = float(value_fn().detach())
            flat[i] = original - eps
            down = float(value_fn().detach())
            flat[i] = original
            assert flat_grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=rel, abs=abs_)


def closed_form_grads(term, params):
    grads = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        term.add_gradient(params, grads)
    return grads


def TinyNet(seed=0, with_bn=False):
    """A stand-in for a ResNet TransferNet: a 'backbone' of two 1x1 convolutions (layer1,
    layer2; the other stages the identity) and a head, in float64."""
    torch.manual_seed(seed)
    backbone = resnet_shaped(
        2,
        bn1=nn.BatchNorm2d(2) if with_bn else nn.Identity(),
        layer1=nn.Conv2d(2, 3, 1, bias=False),
        layer2=nn.Conv2d(3, 2, 1, bias=False),
    )
    return TransferNet(backbone, 3, stages=STAGES).double()


# ---------------------------------------------------------------- weight-space terms


def test_l2_value_and_gradient():
    model = TinyNet()
    alpha = 0.37
    expected = alpha / 2 * sum(np.sum(p**2) for p in numpy_params(model.parameters()))
    term = L2(alpha)
    assert float(term.value(model, None).detach()) == pytest.approx(expected, rel=1e-12)
    params = list(model.parameters())
    finite_difference_check(lambda: term.value(model, None), zip(params, closed_form_grads(term, params)))


def test_l2_ignores_frozen_parameters():
    model = TinyNet()
    model.backbone.layer1.weight.requires_grad_(False)
    expected = 0.5 * sum(np.sum(p.detach().numpy() ** 2) for p in model.parameters() if p.requires_grad)
    assert float(L2(1.0).value(model, None).detach()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bn_affine", [True, False])
def test_l2sp_value_and_gradient(bn_affine):
    model = TinyNet(with_bn=True)
    term = L2SP(alpha=0.3, bn_affine=bn_affine)
    term.bind(model, BindContext())
    start = numpy_params(model.backbone.parameters())
    with torch.no_grad():  # move away from w_S^0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    now = numpy_params(model.backbone.parameters())
    names = [n for n, _ in model.backbone.named_parameters()]
    expected = (
        0.3
        / 2
        * sum(np.sum((a - b) ** 2) for n, a, b in zip(names, now, start) if bn_affine or not n.startswith("bn1"))
    )
    assert float(term.value(model, None).detach()) == pytest.approx(expected, rel=1e-12)

    params = list(model.parameters())
    grads = closed_form_grads(term, params)
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads))
    assert torch.count_nonzero(by_name["head.weight"]) == 0  # the head is HeadL2's business
    if not bn_affine:
        assert torch.count_nonzero(by_name["backbone.bn1.weight"]) == 0
    finite_difference_check(lambda: term.value(model, None), zip(params, grads))


def test_l2sp_is_zero_at_the_source_weights():
    model = TinyNet()
    term = L2SP(alpha=1.0)
    term.bind(model, BindContext())
    assert float(term.value(model, None).detach()) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in closed_form_grads(term, list(model.parameters())))


def test_head_l2_value_and_gradient():
    model = TinyNet()
    term = HeadL2(beta=0.2)
    term.bind(model, BindContext())
    expected = 0.1 * sum(np.sum(p**2) for p in numpy_params(model.head.parameters()))
    assert float(term.value(model, None).detach()) == pytest.approx(expected, rel=1e-12)
    params = list(model.parameters())
    grads = closed_form_grads(term, params)
    finite_difference_check(lambda: term.value(model, None), zip(params, grads))
    assert torch.count_nonzero(grads[0]) == 0  # backbone.layer1.weight


def test_gradient_is_added_in_place_to_what_is_there():
    model = TinyNet()
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    Omega({"l2": L2(0.5)}).add_closed_form_gradient(params, grads)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g.numpy(), 1 + 0.5 * p.detach().numpy())


def test_coefficients_decay_per_epoch():
    model = TinyNet()
    term = L2(0.1, decay=0.5)
    omega = Omega({"l2": term})
    base = float(term.value(model, None).detach())
    omega.set_epoch(3)
    assert float(term.value(model, None).detach()) == pytest.approx(base * 0.125)
    grads = closed_form_grads(term, list(model.parameters()))
    np.testing.assert_allclose(grads[0].numpy(), 0.1 * 0.125 * model.backbone.layer1.weight.detach().numpy())
    with pytest.raises(ValueError, match="decay"):
        L2(0.1, decay=1.5)


# ---------------------------------------------------------------- feature-map terms


def hand_maps(w1, w2, x):
    """NumPy forward of the two-layer 1x1-conv network: the two stage outputs."""
    m1 = np.einsum("oc,bchw->bohw", w1, x)
    return m1, np.einsum("oc,bchw->bohw", w2, m1)


def shifted_pair(seed=1):
    source = TinyNet(seed=0)
    target = TinyNet(seed=0)
    with torch.no_grad():
        for p in target.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = torch.randn(4, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return source, target, images


def test_knowdist_matches_a_hand_computation():
    source, target, images = shifted_pair()
    term = KnowDist(alpha=0.4, layers=["layer1", "layer2"])
    term.bind(source, BindContext())
    x = images.numpy()
    s1, s2 = hand_maps(
        source.backbone.layer1.weight.detach().numpy()[:, :, 0, 0],
        source.backbone.layer2.weight.detach().numpy()[:, :, 0, 0],
        x,
    )
    t1, t2 = hand_maps(
        target.backbone.layer1.weight.detach().numpy()[:, :, 0, 0],
        target.backbone.layer2.weight.detach().numpy()[:, :, 0, 0],
        x,
    )
    # DTNH Eq. 3: per image, the squared distance summed over filters and positions of each layer; mean over images
    expected = 0.4 * sum(((t - s) ** 2).reshape(len(x), -1).sum(axis=1) for t, s in [(t1, s1), (t2, s2)]).mean()
    _, features = target(images)
    value = term.value(target, features)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)

    weight = target.backbone.layer1.weight
    (grad,) = torch.autograd.grad(value, [weight])
    finite_difference_check(lambda: term.value(target, target(images)[1]), [(weight, grad)], stride=1)


def test_knowdist_source_copy_is_frozen():
    source, target, images = shifted_pair()
    term = KnowDist(alpha=1.0, layers=["layer2"])
    term.bind(source, BindContext())
    with torch.no_grad():
        source.backbone.layer2.weight.add_(1.0)  # the live network moves; the copy does not
    assert not any(p.requires_grad for p in term.source.parameters())
    assert not term.source.training
    assert float(term.value(source, source(images)[1]).detach()) > 0


def test_delta_matches_a_hand_computation(monkeypatch):
    from safetransfer.training.regularizers import delta as delta_module

    source, target, images = shifted_pair()
    term = DELTA(alpha=0.6, layers=["layer1", "layer2"], at="stage")
    attention = {
        "layer1": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        "layer2": torch.tensor([0.9, 0.1], dtype=torch.float64),
    }
    # a hand-chosen attention instead of the one computed from data (tested below)
    monkeypatch.setattr(delta_module, "channel_attention", lambda *args, **kwargs: attention)
    term.bind(source, BindContext())
    x = images.numpy()
    s = hand_maps(
        source.backbone.layer1.weight.detach().numpy()[:, :, 0, 0],
        source.backbone.layer2.weight.detach().numpy()[:, :, 0, 0],
        x,
    )
    t = hand_maps(
        target.backbone.layer1.weight.detach().numpy()[:, :, 0, 0],
        target.backbone.layer2.weight.detach().numpy()[:, :, 0, 0],
        x,
    )
    expected = 0.0
    for (tm, sm), a in zip(zip(t, s), attention.values()):
        per_channel = ((tm - sm) ** 2).sum(axis=(2, 3))  # (B, C): squared L2 distance over positions
        expected += (per_channel * a.numpy()).sum(axis=1).mean()  # weighted sum over channels, mean over images
    expected *= 0.6
    value = term.value(target, target(images)[1])
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    weight = target.backbone.layer2.weight
    (grad,) = torch.autograd.grad(value, [weight])
    finite_difference_check(lambda: term.value(target, target(images)[1]), [(weight, grad)], stride=1)


def test_delta_attention_is_softmax_of_standardised_increases():
    increases = torch.tensor([0.5, 0.1, -0.2, 0.9], dtype=torch.float64)
    z = (increases.numpy() - increases.numpy().mean()) / increases.numpy().std()  # population std, as np.std
    for temperature in (0.5, 1.0, 4.0):
        expected = np.exp(z / temperature) / np.exp(z / temperature).sum()
        np.testing.assert_allclose(attention_from_increases(increases, temperature).numpy(), expected, rtol=1e-12)
    flat = attention_from_increases(torch.zeros(3, dtype=torch.float64), 1.0)
    np.testing.assert_allclose(flat.numpy(), [1 / 3] * 3)


def test_batched_channel_ablation_equals_one_channel_at_a_time():
    source = TinyNet(seed=3)
    head = nn.Linear(2, 3).double()
    images = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    for stage, channels in (("layer1", 3), ("layer2", 2)):
        batched = channel_loss_increase(source.backbone, head, stage, images, labels, max_copies=7, at="stage")
        with torch.no_grad():
            baseline = nn.functional.cross_entropy(head(forward_features(source.backbone, images).pooled), labels)
            for c in range(channels):

                def zero_channel(module, inputs, output, c=c):
                    output = output.clone()
                    output[:, c] = 0
                    return output

                handle = getattr(source.backbone, stage).register_forward_hook(zero_channel)
                ablated = nn.functional.cross_entropy(head(forward_features(source.backbone, images).pooled), labels)
                handle.remove()
                assert float(batched[c]) == pytest.approx(float(ablated - baseline), rel=1e-9, abs=1e-12)


# two images, two channels, 2x2 maps: target map T = source map S + D, with D per image and channel
HAND_S = torch.full((2, 2, 2, 2), 0.5, dtype=torch.float64)
HAND_D = torch.tensor(
    [
        [[[1, 0], [2, 1]], [[0, 1], [1, 0]]],  # image 1: ||D||^2 = 6 (channel 1), 2 (channel 2)
        [[[1, 1], [1, 1]], [[3, 0], [0, 0]]],
    ],  # image 2: ||D||^2 = 4, 9
    dtype=torch.float64,
)


def hand_value(term):
    from safetransfer.training.backbones import Features

    model = TransferNet(resnet_shaped(2), 2, stages=STAGES).double()  # every stage the identity:
    term.bind(model, BindContext())  # the source's maps are the images given
    return float(term.value(model, Features(images=HAND_S, maps={"layer1": HAND_S + HAND_D})))


def test_knowdist_hand_worked_from_dtnh_equation_3():
    # Omega = alpha * 1/n sum_i sum_j ||F_j(w, x_i) - F_j(w_s, x_i)||^2 = 0.1 * ((6 + 2) + (4 + 9)) / 2
    assert hand_value(KnowDist(alpha=0.1, layers=["layer1"])) == pytest.approx(1.05, rel=1e-12)
    # the released codes' form: alpha * 1/2 * sum over images; equal here since n = 2 ...
    assert hand_value(KnowDist(alpha=0.1, layers=["layer1"], convention="released_code")) == pytest.approx(1.05)


def test_knowdist_released_code_convention_is_half_the_batch_sum():
    # ... and B/2 times the paper's value for a batch of B = 4 (TLlib: 0.5 * ||F - F_s||^2 summed over all)
    source, target, images = shifted_pair()
    paper, code = KnowDist(alpha=0.3), KnowDist(alpha=0.3, convention="released_code")
    for term in (paper, code):
        term.bind(source, BindContext())
    features = target(images)[1]
    reference = {k: v.detach().numpy() for k, v in forward_features(source.backbone, images, STAGES).maps.items()}
    tllib = 0.3 * sum(0.5 * np.sum((features.maps[k].detach().numpy() - reference[k]) ** 2) for k in reference)
    assert float(code.value(target, features)) == pytest.approx(tllib, rel=1e-12)
    assert float(paper.value(target, features)) == pytest.approx(tllib * 2 / len(images), rel=1e-12)
    with pytest.raises(ValueError, match="convention"):
        KnowDist(alpha=1.0, convention="tllib")


def test_delta_hand_worked_from_the_delta_paper(monkeypatch):
    from safetransfer.training.regularizers import delta as delta_module

    monkeypatch.setattr(
        delta_module,
        "channel_attention",
        lambda *args, **kwargs: {"layer1": torch.tensor([0.75, 0.25], dtype=torch.float64)},
    )
    # per image: sum_c a_c ||D_c||^2 = 0.75 * 6 + 0.25 * 2 = 5 and 0.75 * 4 + 0.25 * 9 = 5.25
    for convention, expected in [
        ("paper", 0.1 * (5 + 5.25) / 2),  # mean over the images
        ("released_code", 0.1 * 0.5 * 2 / 4 * (5 + 5.25)),
    ]:  # 1/2 sum_b C/(HW) ...
        term = DELTA(alpha=0.1, layers=["layer1"], at="stage", convention=convention)
        assert hand_value(term) == pytest.approx(expected, rel=1e-12)


def test_delta_released_code_form_is_b_over_2_times_c_over_hw_of_the_papers_per_stage(monkeypatch):
    """Stage by stage, on maps of 16x16 down to 2x2 (a tiny ResNet-shaped network, 4 channels,
    3 images): the paper's form against NumPy (alpha mean_b sum_c a_c ||D_c||^2) and the
    released code's against B/2 x C/(HW) times it. Then the factor at the BSS preset's
    settings (ResNet-50's last-convolution maps at 224 px, batch 48), read off torchvision's
    network on the meta device: about 2, 16, 125 and 1000, as the preset and the README say."""
    import copy

    from safetransfer.training.regularizers import delta as delta_module
    from tiny import tiny_resnet

    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    monkeypatch.setattr(delta_module, "channel_attention", lambda *args, **kwargs: {name: weights for name in STAGES})
    torch.manual_seed(0)
    source = tiny_resnet(3).double()
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in target.backbone.parameters():
            p.add_(0.2 * torch.randn_like(p))
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    source.eval(), target.eval()  # BatchNorm by its running statistics, as the term's frozen source copy runs
    target_maps = forward_features(target.backbone, images, STAGES).maps
    source_maps = forward_features(source.backbone, images, STAGES).maps
    for layer, side in zip(STAGES, (16, 8, 4, 2)):
        values = {}
        for convention in ("paper", "released_code"):
            term = DELTA(alpha=0.5, layers=[layer], at="stage", convention=convention)
            term.bind(source, BindContext())
            value = term.value(target, forward_features(target.backbone, images, STAGES))
            values[convention] = float(value.detach())
        difference = (target_maps[layer] - source_maps[layer]).detach().numpy()
        assert difference.shape[-2:] == (side, side)
        per_image = (np.square(difference).sum(axis=(2, 3)) * weights.numpy()).sum(axis=1)
        assert values["paper"] == pytest.approx(0.5 * per_image.mean(), rel=1e-12)
        assert values["released_code"] == pytest.approx(3 / 2 * 4 / side**2 * values["paper"], rel=1e-12)

    resnet50 = TransferNet("resnet50", 10).to("meta")
    shapes = {}
    for layer in STAGES:  # the last convolution of each stage's last block (DELTA's at: last_conv)
        resnet50.backbone.get_submodule(layer)[-1].conv3.register_forward_hook(
            lambda module, args, out, layer=layer: shapes.__setitem__(layer, out.shape[1:])
        )
    resnet50.backbone(torch.empty(48, 3, 224, 224, device="meta"))
    factors = [48 / 2 * c / (h * w) for c, h, w in (shapes[layer] for layer in STAGES)]
    assert [round(f) for f in factors] == [2, 16, 125, 1003]


def test_delta_last_conv_ablation_equals_zeroing_the_filter():
    """The authors' code zeroes filter j of each stage's last convolution; the batched masks must
    give the same loss increases."""
    torch.manual_seed(0)
    backbone = TransferNet("resnet18", 3).backbone.double().eval()
    head = nn.Linear(512, 3).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    batched = channel_loss_increase(backbone, head, "layer2", images, labels, max_copies=40, at="last_conv")
    conv = backbone.layer2[1].conv2
    with torch.no_grad():
        baseline = nn.functional.cross_entropy(head(backbone(images)), labels)
        for c in (0, 5, 127):
            kept = conv.weight[c].clone()
            conv.weight[c] = 0
            ablated = nn.functional.cross_entropy(head(backbone(images)), labels)
            conv.weight[c] = kept
            assert float(batched[c]) == pytest.approx(float(ablated - baseline), rel=1e-9, abs=1e-12)
    assert batched.shape == (128,)


def test_delta_regularizes_the_last_convolution_of_each_stage(monkeypatch):
    from safetransfer.training.regularizers import delta as delta_module

    torch.manual_seed(0)
    source = TransferNet("resnet50", 3).double().eval()
    target = TransferNet("resnet50", 3).double().eval()
    with torch.no_grad():
        for p in target.backbone.layer4.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    attention = {"layer4": torch.full((2048,), 1 / 2048, dtype=torch.float64)}
    monkeypatch.setattr(delta_module, "channel_attention", lambda *args, **kwargs: attention)
    term = DELTA(alpha=1.0, layers=["layer4"])
    term.bind(source, BindContext())
    target.taps = source.taps
    assert source.taps == {"layer4.2.conv3"}
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    captured = {}
    for name, net in (("s", source), ("t", target)):
        handle = net.backbone.layer4[2].conv3.register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o)
        )
        net.backbone(images)
        handle.remove()
    expected = ((captured["t"] - captured["s"]) ** 2).sum(dim=(2, 3)).mean(dim=1).mean()  # uniform a = 1/C
    assert float(term.value(target, target(images)[1])) == pytest.approx(float(expected), rel=1e-9)


def test_delta_attention_on_a_resnet_is_cached(tmp_path, monkeypatch):
    from safetransfer.data.datasets import TensorImages
    from safetransfer.training.regularizers import delta as delta_module

    torch.manual_seed(0)
    model = TransferNet("resnet18", 3)
    images = torch.randn(12, 3, 32, 32)
    labels = torch.arange(12) % 3
    context = BindContext(
        train_data=TensorImages(images, labels), batch_size=6, cache_dir=tmp_path, identity={"case": "cached"}
    )
    term = DELTA(alpha=1.0, layers=["layer3", "layer4"], ablation_images=6, head_iterations=5, max_copies=64)
    term.bind(model, context)
    assert term.attention["layer3"].shape == (256,) and term.attention["layer4"].shape == (512,)
    for weights in term.attention.values():
        assert float(weights.sum()) == pytest.approx(1.0, rel=1e-5) and bool((weights > 0).all())
    cached = list(tmp_path.rglob("*.pt"))
    assert len(cached) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached attention should have been used")

    monkeypatch.setattr(delta_module, "channel_attention", must_not_run)
    again = DELTA(alpha=1.0, layers=["layer3", "layer4"], ablation_images=6, head_iterations=5, max_copies=64)
    again.bind(model, context)
    for layer in ("layer3", "layer4"):
        assert torch.equal(again.attention[layer], term.attention[layer])


# ---------------------------------------------------------------- BSS


def bss_features(matrix):
    from safetransfer.training.backbones import Features

    return Features(images=None, maps={}, pooled=matrix)


def test_bss_hand_worked_from_equation_8():
    # two images, two pooled features: F = [[1, 2], [2, 1]], F^T F = [[5, 4], [4, 5]] with eigenvalues
    # 9 and 1, so the singular values are 3 and 1; BSS (k = 1) = eta * 1^2
    features = bss_features(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64))
    assert float(BSS(eta=0.001, k=1).value(None, features)) == pytest.approx(0.001, rel=1e-12)
    # scaling the features by 2 scales every singular value by 2: eta * 2^2
    features = bss_features(torch.tensor([[2.0, 4.0], [4.0, 2.0]], dtype=torch.float64))
    assert float(BSS(eta=0.001, k=1).value(None, features)) == pytest.approx(0.004, rel=1e-12)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])  # F F^T is the smaller Gram matrix, then F^T F
@pytest.mark.parametrize("k", [1, 2, 3])
def test_bss_value_matches_numpy_svd(k, shape):
    matrix = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    term = BSS(eta=0.05, k=k)
    expected = 0.05 * np.sum(np.linalg.svd(matrix.numpy(), compute_uv=False)[-k:] ** 2)
    assert float(term.value(None, bss_features(matrix))) == pytest.approx(expected, rel=1e-5)
    singular = np.linalg.svd(matrix.numpy(), compute_uv=False)
    assert term.diagnostics()["sigma_min"] == pytest.approx(singular[-1], rel=1e-5)
    assert term.diagnostics()["sigma_max"] == pytest.approx(singular[0], rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5)])
def test_bss_gradient_matches_finite_differences(shape):
    matrix = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    term = BSS(eta=1.0, k=2)
    term_fp64 = (
        lambda: (
            1.0
            * torch.from_numpy(  # an independent NumPy evaluation
                np.sort(np.linalg.svd(matrix.detach().numpy(), compute_uv=False))[:2]
            )
            .square()
            .sum()
        )
    )
    (grad,) = torch.autograd.grad(term.value(None, bss_features(matrix)), [matrix])
    finite_difference_check(term_fp64, [(matrix, grad)], rel=1e-3, abs_=1e-6, stride=1)


def test_bss_in_float32_at_the_papers_batch_matches_a_float64_svd():
    """48 images x 512 features (ResNet-18's pooled features at batch 48), singular values
    spread over three decades: the float32 term and its gradient against NumPy's float64 SVD
    (the gradient of sigma_min^2 is 2 sigma_min u v^T)."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    v, _ = np.linalg.qr(rng.standard_normal((512, 48)))
    sigma = np.logspace(1, -2, 48)
    exact = (u * sigma) @ v.T
    matrix = torch.tensor(exact, dtype=torch.float32, requires_grad=True)
    term = BSS(eta=1.0, k=1)
    value = term.value(None, bss_features(matrix))
    (grad,) = torch.autograd.grad(value, [matrix])
    assert value.dtype == torch.float32
    U, S, Vt = np.linalg.svd(matrix.detach().double().numpy(), full_matrices=False)
    assert float(value.detach()) == pytest.approx(S[-1] ** 2, rel=1e-4)
    np.testing.assert_allclose(grad.double().numpy(), 2 * S[-1] * np.outer(U[:, -1], Vt[-1]), atol=1e-6 * S[-1])
    assert term.diagnostics()["sigma_max"] == pytest.approx(S[0], rel=1e-6)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_bss_in_float64_is_exact_at_condition_1e8(shape):
    """Float64 features with singular values from 1 down to 1e-8: the term and its gradient
    (2 sigma_min u v^T) against the singular values and vectors the matrix was built from, to
    float64 rounding. Through the Gram matrix (float32's route) the same gradient is off by
    whole percents: its smallest eigenvalue, 1e-16, is at float64's rounding of the largest."""
    rng = np.random.default_rng(3)
    rank = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    sigma = np.logspace(0, -8, rank)
    matrix = torch.tensor((u * sigma) @ v.T, dtype=torch.float64, requires_grad=True)
    value = BSS(eta=1.0, k=1).value(None, bss_features(matrix))
    (grad,) = torch.autograd.grad(value, [matrix])
    expected = 2 * sigma[-1] * np.outer(u[:, -1], v[:, -1])  # the sign of u v^T is the pair's, whatever the solver's
    assert float(value.detach()) == pytest.approx(sigma[-1] ** 2, rel=1e-6)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())

    wide = shape[0] <= shape[1]
    exact = matrix.detach()
    gram = exact @ exact.T if wide else exact.T @ exact
    _, vectors = BSS.by_gram(gram, wide)
    smallest = vectors[:, :1]
    projected = smallest.T @ exact if wide else exact @ smallest
    through_gram = 2 * (smallest @ projected if wide else projected @ smallest.T)
    assert np.abs(through_gram.numpy() - expected).max() > 0.01 * np.abs(expected).max()


@pytest.mark.parametrize("case", ["repeated", "zero"])
def test_bss_gradient_is_finite_for_repeated_and_zero_singular_values(case):
    if case == "repeated":  # rows of equal norm, mutually orthogonal: all singular values equal
        matrix = torch.zeros(4, 6, dtype=torch.float64)
        matrix[torch.arange(4), torch.arange(4)] = 2.0
    else:  # rank 1: three singular values are exactly zero
        matrix = torch.outer(torch.arange(1.0, 5.0, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    matrix.requires_grad_()
    value = BSS(eta=1.0, k=2).value(None, bss_features(matrix))
    (grad,) = torch.autograd.grad(value, [matrix])
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_bss_of_non_finite_features_is_nan_not_an_error():
    """Diverged features make the term NaN (the training step then stops with a message that
    names it) instead of an eigensolver error."""
    matrix = torch.randn(4, 6)
    matrix[1, 2] = float("inf")
    term = BSS(eta=1.0, k=1)
    assert math.isnan(float(term.value(None, bss_features(matrix))))
    assert term.diagnostics() == {}


def test_bss_refuses_k_not_below_the_batch_or_the_features():
    from safetransfer.training.backbones import outline

    with pytest.raises(ValueError, match=r"k=4 must be an integer in \[1, 3\]: fewer than train.batch_size=4"):
        BSS(k=4).check_backbone(outline("resnet18"), 4)
    with pytest.raises(ValueError, match=r"k=512 must be an integer in \[1, 511\]: .* feature dimension 512"):
        BSS(k=512).check_backbone(outline("resnet18"), 1024)
    BSS(k=3).check_backbone(outline("resnet18"), 4)
    with pytest.raises(ConfigError, match="k=0"):
        BSS(k=0)


def test_omega_separates_closed_form_and_autograd_terms():
    omega = Omega({"l2": L2(0.1), "bss": BSS(), "head": HeadL2(0.1)})
    assert list(omega.closed_form_terms) == ["l2", "head"]
    assert list(omega.autograd_terms) == ["bss"]
    assert omega.diagnostic_names() == ["bss_sigma_min", "bss_sigma_max"]


# ---------------------------------------------------------------- LwF


def _numpy_pooled(backbone, images: np.ndarray) -> np.ndarray:
    """TinyNet's backbone by hand: two 1x1 convolutions (einsum), then the mean over positions."""
    w1 = backbone.layer1.weight.detach().numpy()[:, :, 0, 0]
    w2 = backbone.layer2.weight.detach().numpy()[:, :, 0, 0]
    maps = np.einsum("oc,bchw->bohw", w2, np.einsum("oc,bchw->bohw", w1, images))
    return maps.mean(axis=(2, 3))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_lwf_is_the_kl_of_the_source_models_tempered_predictions_and_its_gradient():
    """Li and Hoiem's distillation of the source model's predictions, computed by hand in NumPy: the
    teacher from the source weights bound at the start, the student through the moved backbone and the
    kept (trained) source classifier; its gradient on that classifier in closed form,
    lambda_o / (B T) sum_b (q_b - p_b) pooled_b^T."""
    import copy

    from safetransfer.training.regularizers.lwf import LwF

    model = TinyNet()
    rng = np.random.default_rng(3)
    head = {"weight": torch.tensor(rng.normal(size=(5, 2))), "bias": torch.tensor(rng.normal(size=5))}
    source = copy.deepcopy(model.backbone)
    term = LwF(lambda_o=0.7, temperature=2.5)
    term.bind(model, BindContext(source_head=head))
    with torch.no_grad():  # training has moved the backbone and the source classifier
        model.backbone.layer1.weight.add_(0.3)
        model.source_head.weight.add_(torch.tensor(rng.normal(size=(5, 2))) * 0.2)
    images = rng.normal(size=(4, 2, 3, 3))
    _, features = model(torch.tensor(images))
    value = term.value(model, features)

    w_s, b_s = model.source_head.weight.detach().numpy(), model.source_head.bias.detach().numpy()
    pooled = _numpy_pooled(model.backbone, images)
    teacher = _numpy_pooled(source, images) @ head["weight"].numpy().T + head["bias"].numpy()
    p, q = _softmax(teacher / 2.5), _softmax((pooled @ w_s.T + b_s) / 2.5)
    expected = 0.7 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert float(value) == pytest.approx(expected, rel=1e-12)
    (gradient,) = torch.autograd.grad(value, [model.source_head.weight])
    np.testing.assert_allclose(gradient.numpy(), 0.7 / (4 * 2.5) * (q - p).T @ pooled, rtol=1e-10)
    assert model.source_head.weight.requires_grad and not any(t.requires_grad for t in term.teacher_head.parameters())


def test_lwf_cached_replays_each_items_recorded_source_logits_whatever_view_the_batch_holds():
    """teacher=cached (TLlib's): z_0 recorded at bind from one pass of augmented images (given here), then
    read for each batch by its items; the value is NumPy's KL against those recorded logits, not against
    the source network's logits of the batch's (other) view."""
    import copy

    from safetransfer.training.regularizers.lwf import LwF

    model = TinyNet()
    rng = np.random.default_rng(4)
    head = {"weight": torch.tensor(rng.normal(size=(5, 2))), "bias": torch.tensor(rng.normal(size=5))}
    source = copy.deepcopy(model.backbone)
    recorded_views = rng.normal(size=(6, 2, 3, 3))  # one augmented view of each of 6 training images
    term = LwF(lambda_o=1.3, temperature=2.0, teacher="cached")
    assert term.needs_indices
    batches = [torch.tensor(recorded_views[:4]), torch.tensor(recorded_views[4:])]
    term.bind(model, BindContext(source_head=head, train_augmented=lambda: iter(batches)))
    images, items = rng.normal(size=(3, 2, 3, 3)), np.array([5, 0, 3])  # other views of items 5, 0, 3
    _, features = model(torch.tensor(images))
    features.indices = torch.tensor(items)
    value = float(term.value(model, features).detach())

    w_s, b_s = head["weight"].numpy(), head["bias"].numpy()
    recorded = _numpy_pooled(source, recorded_views[items]) @ w_s.T + b_s
    p, q = _softmax(recorded / 2.0), _softmax((_numpy_pooled(model.backbone, images) @ w_s.T + b_s) / 2.0)
    assert value == pytest.approx(1.3 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)), rel=1e-12)
    same_view = _softmax((_numpy_pooled(source, images) @ w_s.T + b_s) / 2.0)
    assert value != pytest.approx(1.3 * np.mean(np.sum(same_view * (np.log(same_view) - np.log(q)), axis=1)))
    with pytest.raises(ValueError, match="teacher='stale'; allowed: same_view, cached"):
        LwF(teacher="stale")


def test_lwf_needs_a_source_with_its_classifier():
    from safetransfer.training.regularizers.lwf import LwF

    with pytest.raises(ConfigError, match="regularizer.terms.lwf: LwF distils .* this source has no classifier"):
        LwF().bind(TinyNet(), BindContext(source_head=None))
    with pytest.raises(ValueError, match="temperature=0 must be a number > 0"):
        LwF(temperature=0)


# ---------------------------------------------------------------- Co-Tuning


def _tiny_images(rng, count: int) -> np.ndarray:
    return rng.normal(size=(count, 2, 3, 3))


def test_co_tuning_is_the_cross_entropy_against_the_relationship_and_its_gradient():
    """lambda_c * mean_b -sum_s r[y_b, s] log softmax(h_s(f(x_b)))_s by hand in NumPy, with the relationship r
    learned at bind (direct: the mean source probabilities per target class, computed here from the source
    network by hand), and its gradient on the source classifier in closed form lambda_c / B (q - r[y])^T pooled."""
    from torch.utils.data import TensorDataset

    from safetransfer.training.regularizers.co_tuning import CoTuning

    model = TinyNet()
    rng = np.random.default_rng(5)
    head = {"weight": torch.tensor(rng.normal(size=(5, 2))), "bias": torch.tensor(rng.normal(size=5))}
    train_images, train_labels = _tiny_images(rng, 9), np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    data = TensorDataset(torch.tensor(train_images), torch.tensor(train_labels))
    term = CoTuning(lambda_c=1.7, relationship="direct", source_scale=0.8)
    term.bind(model, BindContext(source_head=head, train_data=data, batch_size=4))

    probabilities = _softmax(
        0.8 * (_numpy_pooled(model.backbone, train_images) @ head["weight"].numpy().T + head["bias"].numpy())
    )
    expected_r = np.stack([probabilities[train_labels == t].mean(axis=0) for t in range(3)])
    np.testing.assert_allclose(term.relationship.double().numpy(), expected_r, rtol=1e-6)  # kept in float32

    with torch.no_grad():  # training has moved the backbone and the source classifier
        model.backbone.layer1.weight.add_(0.2)
        model.source_head.weight.add_(torch.tensor(rng.normal(size=(5, 2))) * 0.3)
    images, labels = _tiny_images(rng, 4), torch.tensor([2, 0, 0, 1])
    _, features = model(torch.tensor(images))
    features.labels = labels
    value = term.value(model, features)
    w_s, b_s = model.source_head.weight.detach().numpy(), model.source_head.bias.detach().numpy()
    pooled = _numpy_pooled(model.backbone, images)
    q = _softmax(pooled @ w_s.T + b_s)
    r = term.relationship.double().numpy()[labels.numpy()]
    assert float(value.detach()) == pytest.approx(1.7 * np.mean(-np.sum(r * np.log(q), axis=1)), rel=1e-6)
    (gradient,) = torch.autograd.grad(value, [model.source_head.weight])
    np.testing.assert_allclose(gradient.numpy(), 1.7 / 4 * (q - r).T @ pooled, rtol=1e-5, atol=1e-12)
    assert model.parameter_groups()["backbone"][-2:] == list(model.source_head.parameters())  # the backbone's lr


def test_the_temperature_fit_is_the_minimum_of_the_nll_found_by_golden_section():
    from safetransfer.training.regularizers.co_tuning import fit_scale

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 4)) * 3, rng.integers(0, 4, size=40)
    logits[np.arange(40), labels] += 2.0

    def nll(t):
        z = t * logits
        z = z - z.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(40), labels])

    low, high = 1e-3, 20.0
    golden = (np.sqrt(5) - 1) / 2
    for _ in range(200):
        a, b = high - golden * (high - low), low + golden * (high - low)
        low, high = (low, b) if nll(a) < nll(b) else (a, high)
    assert fit_scale(logits, labels) == pytest.approx((low + high) / 2, rel=1e-6)


def test_the_calibrated_relationship_follows_the_authors_steps_recomputed_independently():
    """Target class t drawn from source classes 2t and 2t+1 (noisy): the relationship puts its mass there.
    Recomputed step by step without sklearn: the logistic regression at the chosen C by scipy (0.5 ||W||^2
    + C sum CE, no intercept), its logits' temperature by golden section, Bayes' rule with the marginal."""
    from scipy.optimize import minimize

    from safetransfer.training.regularizers.co_tuning import calibrated_relationship, stratified_holdout

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    logits = rng.normal(size=(60, 6))
    logits[np.arange(60), 2 * labels + rng.integers(0, 2, size=60)] += 3.0
    probabilities = _softmax(logits)
    r, chosen = calibrated_relationship(probabilities, labels, 3, holdout=0.25)
    assert r.shape == (3, 6) and np.allclose(r.sum(axis=1), 1)
    assert all(r[t, 2 * t] + r[t, 2 * t + 1] > 0.6 for t in range(3))

    held = stratified_holdout(labels, 0.25)
    assert held.sum() == 15 and all(held[labels == t].sum() == 5 for t in range(3))
    x, y, c = probabilities[~held], labels[~held], chosen["C"]

    def objective(flat):
        w = flat.reshape(3, 6)
        z = x @ w.T
        z = z - z.max(axis=1, keepdims=True)
        ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        return 0.5 * np.sum(w * w) + c * ce.sum(), (w + c * p.T @ x).ravel()

    w = minimize(objective, np.zeros(18), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 10000}).x
    w = w.reshape(3, 6)
    z, yv = probabilities[held] @ w.T, labels[held]

    def nll(t):
        s = t * z - (t * z).max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(yv)), yv])

    low, high = 1e-3, 50.0
    for _ in range(200):
        a, b = high - 0.618034 * (high - low), low + 0.618034 * (high - low)
        low, high = (low, b) if nll(a) < nll(b) else (a, high)
    scale = (low + high) / 2
    assert chosen["scale"] == pytest.approx(scale, rel=1e-4)
    target_given_source = _softmax(w.T * scale)
    joint = (target_given_source * probabilities.mean(axis=0)[:, None]).T
    np.testing.assert_allclose(r, joint / joint.sum(axis=1, keepdims=True), atol=1e-4)


def test_co_tuning_needs_a_source_with_its_classifier_and_checks_its_settings():
    from safetransfer.training.regularizers.co_tuning import CoTuning

    with pytest.raises(ConfigError, match="regularizer.terms.co_tuning: Co-Tuning .* this source has no classifier"):
        CoTuning().bind(TinyNet(), BindContext(source_head=None))
    with pytest.raises(ValueError, match="relationship='learned'; allowed: calibrated, direct"):
        CoTuning(relationship="learned")
    with pytest.raises(ValueError, match="holdout=1 must be a fraction in"):
        CoTuning(holdout=1)


# ---------------------------------------------------------------- Bi-Tuning


def _bi_tuning_reference(q, k, proj_q, proj_k, head, queues, pointer, xq, xk, labels, T, m):
    """TLlib's Bi-Tuning forward written again in NumPy, loops and all (tllib/regularization/bi_tuning.py):
    the key encoder's momentum step, the projector contrast against the queue before the batch, the keys
    enqueued one image at a time, the classifier contrast against the queue after it; the two KLDivLoss
    (batchmean) against t. Returns (Omega / lambda, the key encoder's weights, the queues, the pointers)."""
    k = [m * a + (1 - m) * b for a, b in zip(k, q)]
    proj_k = [m * a + (1 - m) * b for a, b in zip(proj_k, proj_q)]
    queue_h, queue_z, pointer = queues[0].copy(), queues[1].copy(), pointer.copy()
    C, K = queue_h.shape[1:]

    def pooled(w, x):
        return np.einsum("oc,bchw->bohw", w[1], np.einsum("oc,bchw->bohw", w[0], x)).mean(axis=(2, 3))

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    h_q, h_k = pooled(q, xq), pooled(k, xk)
    z_q, z_k = unit(h_q @ proj_q[0].T + proj_q[1]), unit(h_k @ proj_k[0].T + proj_k[1])
    hn_q, hn_k = unit(np.c_[h_q, np.ones(len(h_q))]), unit(np.c_[h_k, np.ones(len(h_k))])
    before, rows_z = queue_z.copy(), []
    for i, c in enumerate(labels):
        others = np.concatenate([before[:, :c, :], before[:, c + 1 :, :]], axis=1).reshape(len(z_q[i]), -1)
        rows_z.append([z_q[i] @ z_k[i], *(z_q[i] @ before[:, c, :]), *(z_q[i] @ others)])
        queue_h[:, c, pointer[c]], queue_z[:, c, pointer[c]] = hn_k[i], z_k[i]
        pointer[c] = (pointer[c] + 1) % K
    w = unit(np.c_[head[0], head[1]])
    current, queued = hn_q @ w.T, (queue_h.reshape(len(w[0]), -1).T @ w.T).reshape(C, K, C)
    rows_y = [
        [current[i, c], *queued[c, :, c], *np.concatenate([queued[:c, :, c], queued[c + 1 :, :, c]]).ravel()]
        for i, c in enumerate(labels)
    ]
    t = np.zeros(1 + C * K)
    t[: K + 1] = 1 / (K + 1)

    def kl(rows):
        z = np.array(rows) / T
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        return np.sum(t[: K + 1] * (np.log(t[: K + 1]) - log_p[:, : K + 1])) / len(rows)

    return kl(rows_z) + kl(rows_y), k, proj_k, (queue_h, queue_z), pointer


def test_bi_tuning_equals_tllibs_forward_over_two_steps_and_its_gradient_finite_differences():
    """Two steps on a tiny float64 network (3 classes, K = 2 keys per class, a batch with three images of
    class 1, so that one overwrites another in the queue): the value, the key encoder and the queues equal
    TLlib's loops in NumPy; the projector's gradient equals central finite differences."""
    from safetransfer.training.regularizers.bi_tuning import BiTuning

    model = TinyNet()
    term = BiTuning(lambda_b=0.6, temperature=0.5, queue_size=2, momentum=0.9, projection_dim=4)
    term.bind(model, BindContext())
    keys = model.bi_tuning_keys
    assert model.parameter_groups()["backbone"][-2:] == list(model.bi_tuning_projector.parameters())
    assert not any(p.requires_grad for p in keys.parameters())
    rng = np.random.default_rng(7)
    with torch.no_grad():  # the query network moved away from the key copy
        model.backbone.layer1.weight.add_(torch.tensor(rng.normal(size=(3, 2, 1, 1))) * 0.3)

    def numpy_state():
        layers = lambda net: [
            net.layer1.weight.detach().numpy()[:, :, 0, 0].copy(),
            net.layer2.weight.detach().numpy()[:, :, 0, 0].copy(),
        ]  # noqa: E731
        linear = lambda lin: [lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()]  # noqa: E731
        return (
            layers(model.backbone), layers(keys.backbone), linear(model.bi_tuning_projector), linear(keys.projector),
            linear(model.head), (keys.queue_h.numpy().copy(), keys.queue_z.numpy().copy()), keys.pointer.numpy().copy(),
        )  # fmt: skip

    for labels in ([1, 0, 1, 1, 2], [2, 2, 0, 1, 0]):
        xq, xk = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3))
        q, k, proj_q, proj_k, head, queues, pointer = numpy_state()
        expected, k, proj_k, queues, pointer = _bi_tuning_reference(
            q, k, proj_q, proj_k, head, queues, pointer, xq, xk, labels, 0.5, 0.9
        )
        _, features = model(torch.tensor(xq))
        features.labels, features.views = torch.tensor(labels), (torch.tensor(xk),)
        value = term.value(model, features)
        assert float(value.detach()) == pytest.approx(0.6 * expected, rel=1e-10)
        _, k_now, _, proj_k_now, _, queues_now, pointer_now = numpy_state()
        for a, b in zip([*k, *proj_k, *queues], [*k_now, *proj_k_now, *queues_now]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        assert pointer.tolist() == pointer_now.tolist()

    # the gradient on the projector: the keys' state put back before each evaluation, and the key encoder
    # held still (momentum 1): keys carry no gradient (TLlib computes them under no_grad), so a difference
    # quotient that let the perturbed projector leak into them would differentiate something else
    state = {k: v.clone() for k, v in keys.state_dict().items()}
    term.momentum = 1.0
    xq, xk, labels = rng.normal(size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3)), torch.tensor([0, 1, 2, 1, 0])

    def evaluate():
        keys.load_state_dict(state)
        _, features = model(torch.tensor(xq))
        features.labels, features.views = labels, (torch.tensor(xk),)
        return term.value(model, features)

    weight = model.bi_tuning_projector.weight
    (gradient,) = torch.autograd.grad(evaluate(), [weight])
    for index in [(0, 0), (1, 1), (3, 0)]:
        with torch.no_grad():
            weight[index] += 1e-6
            up = float(evaluate())
            weight[index] -= 2e-6
            down = float(evaluate())
            weight[index] += 1e-6
        assert float(gradient[index]) == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-9)


def test_bi_tuning_checks_its_settings():
    from safetransfer.training.regularizers.bi_tuning import BiTuning

    with pytest.raises(ValueError, match="queue_size=0 must be a whole number >= 1"):
        BiTuning(queue_size=0)
    with pytest.raises(ValueError, match=r"momentum=1 must be in \[0, 1\)"):
        BiTuning(momentum=1)
    assert BiTuning.views == 2
