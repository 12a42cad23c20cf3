"""The methods of TLlib's benchmark and SPD (issue 37) against independent computations: StochNorm's
mix against NumPy's batch normalization, SPD's step against a hand-worked NumPy step, and each method
trained through its preset and resumed exactly after a stop."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import published
from conftest import TINY, StopAt, log_rows
from safetransfer.common.registry import build
from safetransfer.common.signals import Preempted
from safetransfer.data.preparation import prepare_data
from safetransfer.job.run import resolved, run_seed
from safetransfer.training.normalization import StochNorm, StochNorm2d
from safetransfer.training.spd import SGDSPD, AdamSPD

# ---------------------------------------------------------------- StochNorm


def _numpy_norms(x: np.ndarray, mean, var, weight, bias, eps=1e-5):
    """(with the batch's statistics, with the moving ones), per channel of an N x C x H x W batch."""
    batch_mean = x.mean(axis=(0, 2, 3), keepdims=True)
    batch_var = x.var(axis=(0, 2, 3), keepdims=True)  # biased, as BatchNorm normalizes with
    w, b = weight.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
    with_batch = (x - batch_mean) / np.sqrt(batch_var + eps) * w + b
    with_moving = (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + eps) * w + b
    return with_batch, with_moving


def _layer(channels: int, p: float, seed: int = 0) -> StochNorm2d:
    generator = torch.Generator().manual_seed(seed)
    layer = StochNorm2d(channels).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.double) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.double))
        layer.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.double))
        layer.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.double) + 0.5)
    layer.p = p
    return layer


def test_stochnorm_takes_each_channel_from_the_batch_or_the_moving_statistics_with_probability_p():
    """Each output channel is NumPy's batch normalization with the batch's statistics or with the moving
    statistics as they were before the step; over 40 steps x 64 channels the share of moving ones is p
    (binomial: sd 0.0079 at p 0.2; 0.06 is 7 sd), so p reaches the layers (TLlib's --prob does not)."""
    torch.manual_seed(0)
    for p in (0.2, 0.7):
        layer, moving_share = _layer(64, p).train(), []
        for _ in range(40):
            x = torch.randn(6, 64, 3, 3, dtype=torch.double) * 2 + 1
            mean, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
            out = layer(x).detach().numpy()
            with_batch, with_moving = _numpy_norms(
                x.numpy(), mean, var, layer.weight.detach().numpy(), layer.bias.detach().numpy()
            )
            batch = np.isclose(out, with_batch, rtol=0, atol=1e-12).all(axis=(0, 2, 3))
            moving = np.isclose(out, with_moving, rtol=0, atol=1e-12).all(axis=(0, 2, 3))
            assert (batch | moving).all() and not (batch & moving).any()
            moving_share.append(moving.mean())
            # the moving statistics move as BatchNorm's: momentum 0.1, the unbiased batch variance
            n = x.shape[0] * x.shape[2] * x.shape[3]
            expected_var = 0.9 * var + 0.1 * x.numpy().var(axis=(0, 2, 3)) * n / (n - 1)
            np.testing.assert_allclose(layer.running_var.numpy(), expected_var, rtol=1e-12)
        assert abs(np.mean(moving_share) - p) < 0.06


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_stochnorm_at_p_0_is_batchnorm_in_training_and_at_p_1_batchnorm_in_evaluation(p):
    stoch = _layer(5, p)
    plain = nn.BatchNorm2d(5).double()
    plain.load_state_dict(stoch.state_dict())
    x = torch.randn(4, 5, 3, 3, dtype=torch.double)
    expected = plain.eval()(x) if p == 1.0 else plain.train()(x)  # evaluation: before the statistics move
    got = stoch.train()(x)
    assert torch.equal(got, expected)
    if p == 1.0:
        plain.train()(x)  # StochNorm still updates the moving statistics from the batch
    assert torch.equal(stoch.running_mean, plain.running_mean) and torch.equal(stoch.running_var, plain.running_var)
    assert torch.equal(stoch.eval()(x), plain.eval()(x))


def test_converting_a_resnet_keeps_its_weights_keys_and_evaluation():
    """Every one of ResNet-18's 20 BatchNorm layers replaced, the state_dict unchanged (the source's
    keys load), the network in evaluation the same function."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    net.train()(torch.randn(4, 3, 32, 32))  # statistics that differ from the initial ones
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    expected = net.eval()(x)
    assert StochNorm(p=0.3).convert(net) == 20
    assert sum(isinstance(m, nn.BatchNorm2d) and not isinstance(m, StochNorm2d) for m in net.modules()) == 0
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(net.eval()(x), expected)
    assert {m.p for m in net.modules() if isinstance(m, StochNorm2d)} == {0.3}


def test_stochnorm_refuses_a_p_outside_0_1():
    with pytest.raises(ValueError, match=r"p=1.5 must be a probability in \[0, 1\]"):
        StochNorm(p=1.5)


# ---------------------------------------------------------------- SPD


def _spd_numpy(theta, theta0, g, proposed, lam):
    """SPD's correction written from the paper's equations, for one tensor."""
    c = -np.sum(g * (theta - theta0))
    if c >= 0:
        return proposed
    now, before = np.linalg.norm(proposed - theta0), np.linalg.norm(theta - theta0)
    r = max(0.0, now - before) / now
    return proposed - lam * r * (proposed - theta0)


def test_sgd_spd_two_steps_of_a_two_layer_case_worked_by_hand():
    """Two tensors, SGD with momentum 0.9 and lr 0.1, lambda 0.5, two steps. Step 1: the first tensor's
    -g agrees with its progress theta - theta_0 (c > 0: left as SGD put it); the second's disagrees
    (c < 0) but its step shrinks the deviation (r = 0: unchanged). Step 2: both disagree while momentum
    carries them further away: both decayed."""
    theta0 = [np.array([1.0, -1.0]), np.array([[0.5, 0.5], [0.0, 2.0]])]
    start = [theta0[0] + np.array([0.2, -0.1]), theta0[1] + np.array([[0.1, 0.0], [0.0, -0.3]])]
    grads = [
        [np.array([-1.0, 0.5]), np.array([[1.0, 0.0], [0.0, -2.0]])],
        [np.array([0.1, 0.0]), np.array([[0.5, 0.5], [0.5, -1.0]])],
    ]
    params = [nn.Parameter(torch.tensor(t, dtype=torch.double)) for t in theta0]
    optimizer = SGDSPD(params, lambda_spd=0.5, lr=0.1, momentum=0.9)  # theta_0: the weights it starts from
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(torch.tensor(s))
    theta, buffers, decayed = [s.copy() for s in start], [None, None], []
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            buffers[i] = g.copy() if buffers[i] is None else 0.9 * buffers[i] + g
            proposed = theta[i] - 0.1 * buffers[i]
            theta[i] = _spd_numpy(theta[i], theta0[i], g, proposed, 0.5)
            decayed.append(not np.array_equal(theta[i], proposed))
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        optimizer.step()
        for p, t in zip(params, theta):
            np.testing.assert_allclose(p.detach().numpy(), t, rtol=0, atol=1e-14)
    assert decayed == [False, False, True, True]


def test_spd_at_lambda_1_keeps_a_selected_tensors_distance_from_theta_0():
    """lambda 1 projects the proposed weights back onto the sphere ||theta - theta_0|| = ||theta_{t-1} - theta_0||
    when -g disagrees with the progress (c < 0) and the step still grows the deviation (a large part of g
    orthogonal to it); when -g agrees (c > 0) the step is plain SGD's."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50, dtype=torch.double))
    optimizer = SGDSPD([p], lambda_spd=1.0, lr=0.5, momentum=0.0)
    anchor = p.detach().clone()
    with torch.no_grad():
        p.add_(torch.randn(50, dtype=torch.double) * 0.1)
    deviation = p.detach() - anchor
    other = torch.randn(50, dtype=torch.double)
    other -= other.dot(deviation) / deviation.dot(deviation) * deviation
    p.grad = 0.01 * deviation + 5 * other  # <g, deviation> > 0: c < 0
    before = float(deviation.norm())
    assert float((deviation - 0.5 * p.grad).norm()) > 2 * before  # SGD alone would leave the sphere
    optimizer.step()
    assert float((p.detach() - anchor).norm()) == pytest.approx(before, rel=1e-12)
    p.grad = -(p.detach() - anchor)  # -g along the progress: c > 0, plain SGD
    expected = p.detach() + 0.5 * (p.detach() - anchor)
    optimizer.step()
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-14)


def test_adam_spd_equals_numpy_adam_followed_by_the_papers_correction():
    theta0 = np.array([0.3, -0.2, 0.1])
    grads = [np.array([-1.0, 0.5, 0.25]), np.array([-0.5, -0.5, 0.5]), np.array([2.0, -1.0, 0.0])]
    p = nn.Parameter(torch.tensor(theta0))
    optimizer = AdamSPD([p], lambda_spd=0.7, lr=0.05)
    theta, m, v = theta0.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        proposed = theta - 0.05 / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
        theta = _spd_numpy(theta, theta0, g, proposed, 0.7)
        p.grad = torch.tensor(g)
        optimizer.step()
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=0, atol=1e-14)


def test_spd_refuses_a_negative_lambda():
    with pytest.raises(ValueError, match="lambda_spd=-1 must be a number >= 0"):
        SGDSPD([nn.Parameter(torch.zeros(2))], lambda_spd=-1, lr=0.1)


# ---------------------------------------------------------------- each method through its preset


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("stochnorm", marks=pytest.mark.e2e),
        pytest.param("spd", marks=pytest.mark.e2e),
        pytest.param("co_tuning", marks=pytest.mark.e2e),
        pytest.param("dtnh_co_tuning", marks=pytest.mark.e2e),
        pytest.param("lwf", marks=pytest.mark.e2e),
        pytest.param("dtnh_lwf", marks=pytest.mark.e2e),
        pytest.param("lwf regularizer.terms.lwf.teacher=cached", marks=pytest.mark.e2e),
        pytest.param("bi_tuning", marks=pytest.mark.e2e),
        pytest.param("dtnh_bi_tuning", marks=pytest.mark.e2e),
    ],
)
def test_each_method_trains_through_its_preset_and_resumes_exactly_after_a_stop(method, compose_cfg, tmp_path, caplog):
    """From a torchvision ResNet-18 file with its 1000-way classifier (tests/published.py: torchvision's
    structure): the whole run, and a run stopped after iteration 2 then resumed from its checkpoint, end with
    the same accuracy, loss and log rows (StochNorm's draws, SPD's theta_0, LwF's cached logits read by each
    batch's items, Bi-Tuning's second views, key encoder and queues included)."""
    path = tmp_path / "weights" / published.IMAGENET_V1_FILES["resnet18"]
    path.parent.mkdir()
    published.torchvision_v1_checkpoint(path, "resnet18")
    cfg, _ = resolved(
        compose_cfg(
            *(o for o in TINY if o != "train.iterations=3"),
            "train.iterations=4",
            "runtime.checkpoint_every=1",
            "runtime.spectrum_batches=0",
            f"method={method.split()[0]}",
            *method.split()[1:],
            "source=file",
            f"source.path={path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        )
    )
    source = build("source", cfg.source, "source").load(cfg.backbone.name)
    data = prepare_data(cfg, build("target", cfg.target, "target"))
    whole = run_seed(cfg, 0, data, source, tmp_path / "whole")
    with pytest.raises(Preempted):
        run_seed(cfg, 0, data, source, tmp_path / "stopped", stop=StopAt(2))
    assert not (tmp_path / "stopped" / "seed_0" / "metrics.json").exists()
    caplog.set_level("INFO")
    resumed = run_seed(cfg, 0, prepare_data(cfg, build("target", cfg.target, "target")), source, tmp_path / "stopped")
    assert "seed 0: resumed after iteration 2 of 4" in caplog.text  # continued, not started over
    assert (resumed["top1"], resumed["test_loss"]) == (whole["top1"], whole["test_loss"])
    assert log_rows(tmp_path / "stopped" / "seed_0") == log_rows(tmp_path / "whole" / "seed_0")
    assert len(log_rows(tmp_path / "whole" / "seed_0")) == 4


@pytest.mark.parametrize(
    "overrides, name, reference",
    [
        (["method=stochnorm"], "StochNorm", "Fine-tuning"),
        (["method=spd"], "SPD", "Fine-tuning"),
        (["method=l2sp", "normalization=stochnorm"], "L2-SP+StochNorm", "L2-SP"),
        (["method=dtnh_l2sp", "optim=sgd_spd"], "DTNH (L2-SP+SPD)", "L2-SP+SPD"),
        (["method=l2sp_bss", "normalization=stochnorm"], "L2-SP+BSS+StochNorm", "L2-SP+StochNorm"),
        (["method=co_tuning"], "Co-Tuning", "Fine-tuning"),
        (["method=dtnh_co_tuning"], "DTNH (Co-Tuning)", "Co-Tuning"),
        (["method=dtnh_bi_tuning"], "DTNH (Bi-Tuning)", "Bi-Tuning"),
    ],
)
def test_a_method_is_named_by_what_it_adds_and_compared_with_the_same_method_without_it(
    compose_cfg, overrides, name, reference
):
    from safetransfer.reporting.methods import key_of, method_name, method_structure, reference_key

    structure = method_structure(compose_cfg(*overrides))
    assert method_name(compose_cfg(*overrides)) == name
    names = {
        "Fine-tuning": ["method=fine_tuning"],
        "L2-SP": ["method=l2sp"],
        "L2-SP+SPD": ["method=l2sp", "optim=sgd_spd"],
        "L2-SP+StochNorm": ["method=l2sp", "normalization=stochnorm"],
        "Co-Tuning": ["method=co_tuning"],
        "Bi-Tuning": ["method=bi_tuning"],
    }
    assert key_of(method_structure(compose_cfg(*names[reference]))) == reference_key(structure)


def test_two_views_are_two_independent_draws_of_the_same_augmentation():
    """Bi-Tuning's query and key views (Term.views = 2): on the device, (B, 2, 3, crop, crop) equal to two
    successive draws of the one-view augmentation from the same generator; in the loader workers, the same
    with the item's seeded CPU RNG (data.draws)."""
    from safetransfer.data.augment import DeviceAugment
    from safetransfer.data.transforms import augment_transform

    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    common = (8, [0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))
    two = DeviceAugment(*common, train_crop="random_resized_crop", views=2)(images)
    one = DeviceAugment(*common, train_crop="random_resized_crop")
    first, second = one(images), one(images)
    assert two.shape == (4, 2, 3, 8, 8) and torch.equal(two[:, 0], first) and torch.equal(two[:, 1], second)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    pair = augment_transform(8, [0.5] * 3, [0.25] * 3, views=2)(images[0])
    torch.manual_seed(5)
    single = augment_transform(8, [0.5] * 3, [0.25] * 3)
    assert (
        pair.shape == (2, 3, 8, 8)
        and torch.equal(pair[0], single(images[0]))
        and torch.equal(pair[1], single(images[0]))
    )


@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "held"])
def test_a_batchs_items_are_read_from_the_epochs_order_also_after_a_restore(on_device):
    """Batches.indices: the items of each batch, checked against labels that are the items' own positions,
    through the DataLoader (the sampler drawn in the main process) and the device-held loader, over epochs
    and after a restore in the middle of one."""
    from safetransfer.data.draws import Seeded, SeededDraws
    from safetransfer.data.resident import ResidentLoader
    from safetransfer.training.engine import Batches

    images, labels = torch.zeros(10, 1), torch.arange(10)

    def loader():
        order = SeededDraws(10, torch.Generator().manual_seed(3))
        if on_device:
            return ResidentLoader(images, labels, 3, order)
        return torch.utils.data.DataLoader(
            Seeded(torch.utils.data.TensorDataset(images, labels)), sampler=order, batch_size=3, drop_last=True
        )

    batches, seen = Batches(loader()), []
    for _ in range(7):  # two epochs of 3 batches, and one more
        _, (_, batch_labels) = next(batches)
        assert torch.equal(batches.indices(3), batch_labels)
        seen.append(batch_labels)
        if len(seen) == 4:
            position = batches.position()
    again = Batches(loader())
    again.restore(position)
    for expected in seen[4:]:
        _, (_, batch_labels) = next(again)
        assert torch.equal(batch_labels, expected) and torch.equal(again.indices(3), expected)


def test_dtnh_keeps_omegas_gradient_whole_on_a_module_the_empirical_loss_does_not_read():
    """LwF's and Co-Tuning's source classifier, Bi-Tuning's projector: g_J is zero there. When the
    projection applies (<g_J, g_Omega> < 0), d = g_J + g_Omega - c g_J, computed here by hand: on that
    tensor d is g_Omega unchanged, on the others the projected sum."""
    from safetransfer.training.directions import DTNH

    g_J = [torch.tensor([1.0, 2.0]), torch.zeros(3)]
    g_Omega = [torch.tensor([-2.0, -1.0]), torch.tensor([0.5, -0.25, 4.0])]
    c = (1 * -2 + 2 * -1) / (1 + 4)  # <g_J, g_Omega> / ||g_J||^2 = -0.8: obtuse, projected
    d = DTNH()([g.clone() for g in g_J], [g.clone() for g in g_Omega])
    assert torch.allclose(d[0], g_J[0] + g_Omega[0] - c * g_J[0]) and torch.equal(d[1], g_Omega[1])


def test_a_modified_method_is_paired_with_the_same_method_without_its_modifier_and_nothing_else(compose_cfg):
    """StochNorm and SPD rows found their Fine-tuning reference in a real demo run only once their own keys
    (normalization.*, SPD's optimizer and lambda) counted as the method's: the same setting but for those;
    two values of lambda or of p, or another lr, stay apart."""
    from safetransfer.reporting.store import flat_settings
    from safetransfer.reporting.tables import same_setting

    def settings(*overrides):
        return flat_settings(compose_cfg(*overrides))

    plain = settings("method=fine_tuning")
    assert same_setting(settings("method=stochnorm"), plain)
    assert same_setting(settings("method=spd"), plain)
    assert same_setting(settings("method=l2sp", "optim=sgd_spd"), settings("method=l2sp"))
    assert not same_setting(settings("method=spd"), settings("method=spd", "optim.optimizer.lambda_spd=0.5"))
    assert not same_setting(settings("method=stochnorm"), settings("method=stochnorm", "normalization.p=0.3"))
    assert not same_setting(settings("method=spd", "optim.optimizer.lr=0.003"), plain)
