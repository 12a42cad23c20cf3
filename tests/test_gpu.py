"""The CUDA paths: run when a GPU is present, skipped with the reason otherwise."""

import json

import pytest
import torch

import fixtures
from conftest import TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_device_augment_on_cuda_crops_mirrors_and_normalises_each_sample():
    from safetransfer.data.augment import DeviceAugment

    device = torch.device("cuda")
    images = torch.randint(0, 256, (5, 3, 10, 12), dtype=torch.uint8, device=device)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    out = DeviceAugment(6, mean, std, seed=3, device=device)(images)
    top, left, flip = DeviceAugment(6, mean, std, seed=3, device=device).offsets(5, 10, 12)
    for b in range(5):
        expected = images[b, :, top[b] : top[b] + 6, left[b] : left[b] + 6].float() / 255
        if flip[b]:
            expected = expected.flip(-1)
        expected = (expected - torch.tensor(mean, device=device).view(3, 1, 1)) / torch.tensor(std, device=device).view(
            3, 1, 1
        )
        torch.testing.assert_close(out[b], expected)


def test_device_random_resized_crop_and_ten_crops_on_cuda():
    """The BSS protocol's augmentation on CUDA: each window against F.interpolate of the same
    window on the CPU, and the ten test views equal to the CPU's."""
    from safetransfer.data.augment import DeviceAugment

    device, cpu = torch.device("cuda"), torch.device("cpu")
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    make = lambda: DeviceAugment(12, mean, std, seed=5, device=device, train_crop="random_resized_crop")
    out = make()(images.to(device)).cpu()
    top, left, h, w, flip = (t.cpu() for t in make().boxes(6, 20, 24))
    for b in range(6):
        window = images[b : b + 1, :, top[b] : top[b] + h[b], left[b] : left[b] + w[b]].float()
        expected = torch.nn.functional.interpolate(window, size=(12, 12), mode="bilinear", align_corners=False)[0]
        expected = (expected.flip(-1) if flip[b] else expected) / 255
        expected = (expected - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(out[b], expected, atol=1e-4, rtol=0)
    views = [
        DeviceAugment(6, mean, std, seed=0, device=d, train=False, test_crops=10)(images.to(d)).cpu()
        for d in (device, cpu)
    ]
    torch.testing.assert_close(views[0], views[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_job_on_cuda_trains_from_the_cache_with_augmentation_on_the_device(cli, tmp_path, precision):
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith(("target.", "runtime.device"))]
    result = cli(
        *shrink,
        "runtime.device=cuda",
        f"train.precision={precision}",
        "source=scratch",
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[18,6]",
        "train.batch_size=4",
        "regularizer=l2sp_bss",
        "direction=dtnh",
        "runtime.checkpoint_every=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "results.dir=res",
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "seed_0" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["precision"] == precision
    assert 0 <= metrics["top1"] <= 100


def test_the_gpu_lease_hands_out_a_real_device(tmp_path):
    from safetransfer.common.devices import lease_device

    with lease_device(torch.cuda.device_count(), tmp_path) as device:
        assert torch.zeros(1, device=device).device.type == "cuda"


@pytest.fixture
def no_tf32():
    """Full fp32 on CUDA (cuDNN uses TF32 for convolutions by default), so that a CUDA step can be
    compared with the CPU's to float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def one_step(
    cfg, device: torch.device, precision: str = "fp32", compile: bool = False, dtype: torch.dtype = torch.float32
):
    """One DTNH step of a ResNet-18 on a fixed batch of 32 px images, from fixed weights: the
    change of each weight, J, each term's value and the angles between d, g_J and g_Omega."""
    from safetransfer.data.datasets import TensorImages
    from safetransfer.job.build import compile_network, create_direction, create_omega, create_optimizer
    from safetransfer.training.backbones import TransferNet
    from safetransfer.training.engine import autocast, training_step
    from safetransfer.training.regularizers import BindContext

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=generator).to(dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    model = TransferNet("resnet18", 3).to(device, dtype)
    with torch.no_grad():  # move the weights off the source, so that L2-SP and the feature terms are not zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(device, dtype))
    omega = create_omega(cfg)
    omega.bind(model, BindContext(device=device, train_data=TensorImages(images, labels), batch_size=6))
    with torch.no_grad():  # bind copied the source: now step away from it
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(device, dtype))
    if compile:  # as run_seed does: after bind, so that the frozen source copies stay eager
        compile_network(model)
    optimizer, _ = create_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    result = training_step(
        model,
        images.to(device),
        labels.to(device),
        omega,
        create_direction(cfg),
        optimizer,
        params,
        autocast(device, precision),
        record=True,
        angles=True,
    )
    return (
        [(p.detach() - b).double().cpu() for p, b in zip(params, before)],
        float(result.loss_J),
        {k: float(v) for k, v in result.omega.items()},
        {k: float(v) for k, v in result.angles.items()},
    )


SMALL_DELTA = ["regularizer.terms.delta.ablation_images=4", "regularizer.terms.delta.head_iterations=5"]


def relative_error(run, exact) -> float:
    """||u - u_exact|| / ||u_exact|| over every weight's change of one step."""
    u, e = torch.cat([a.flatten() for a in run[0]]), torch.cat([a.flatten() for a in exact[0]])
    return float((u - e).norm() / e.norm())


@pytest.mark.parametrize("regularizer", ["l2sp", "knowdist", "delta", "l2sp_bss"])
def test_a_dtnh_step_on_cuda_computes_what_the_cpu_computes(compose_cfg, no_tf32, regularizer):
    """The same step in float64 on both devices: equal to float64's rounding (every path of
    the step, Omega, its gradient, the projection, the angles, computes the same on CUDA).
    In float32, elementwise, the two devices' steps differ by up to 3 % in the first
    convolution's weights of this small-batch 32 px network: against float64 the CUDA step is
    off by 0.4 to 1.2 % (H100, eager cuDNN, TF32 off), the CPU's by 0.001 %, a compiled
    network's on CUDA by 0.002 %; the bound is loose, and the errors are printed."""
    cfg = compose_cfg(f"regularizer={regularizer}", "direction=dtnh", *(SMALL_DELTA if regularizer == "delta" else []))
    exact = one_step(cfg, torch.device("cpu"), dtype=torch.float64)
    cuda64 = one_step(cfg, torch.device("cuda"), dtype=torch.float64)
    assert relative_error(cuda64, exact) < 1e-9
    assert cuda64[1] == pytest.approx(exact[1], rel=1e-12)
    assert cuda64[2] == pytest.approx(exact[2], rel=1e-9, abs=1e-12)
    for name, angle in exact[3].items():
        assert cuda64[3][name] == pytest.approx(angle, abs=1e-6), name
    cpu, cuda = one_step(cfg, torch.device("cpu")), one_step(cfg, torch.device("cuda"))
    print(
        f"{regularizer}: relative error of the float32 step against float64: CPU {relative_error(cpu, exact):.2e}, "
        f"CUDA {relative_error(cuda, exact):.2e}"
    )
    assert relative_error(cuda, exact) < 5e-2  # measured on an H100: 0.4 to 1.2 %; the CPU's: 0.001 %
    assert cuda[1] == pytest.approx(exact[1], rel=1e-4)
    assert cuda[2] == pytest.approx(exact[2], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("regularizer", ["l2sp", "knowdist", "l2sp_bss"])
def test_a_bf16_step_stays_close_to_fp32(compose_cfg, regularizer):
    cfg = compose_cfg(f"regularizer={regularizer}", "direction=dtnh")
    exact = one_step(cfg, torch.device("cpu"), dtype=torch.float64)
    fp32, bf16 = one_step(cfg, torch.device("cuda")), one_step(cfg, torch.device("cuda"), "bf16")
    a, b = torch.cat([u.flatten() for u in fp32[0]]), torch.cat([u.flatten() for u in bf16[0]])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    print(
        f"{regularizer}: bf16 against fp32: J {bf16[1]:.5f} / {fp32[1]:.5f}, cosine of the steps {cosine:.4f}, "
        f"norms {float(b.norm() / a.norm()):.4f}; relative error against float64: bf16 "
        f"{relative_error(bf16, exact):.2e}, fp32 {relative_error(fp32, exact):.2e}"
    )
    assert bf16[1] == pytest.approx(fp32[1], rel=0.02)  # bf16 keeps 8 bits of mantissa: about 0.4 % per product
    assert bf16[2] == pytest.approx(fp32[2], rel=0.05, abs=1e-5)
    assert torch.isfinite(b).all()
    assert cosine > 0.8 and float(b.norm() / a.norm()) == pytest.approx(1.0, abs=0.2)


def test_concurrent_seeds_share_the_gpu_and_each_writes_its_metrics(cli, tmp_path):
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith(("target.", "runtime.device", "seeds"))]
    result = cli(
        *shrink,
        "runtime.device=cuda",
        "seeds=[0,1,2]",
        "runtime.concurrent_seeds=true",
        "source=scratch",
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[18,6]",
        "train.batch_size=4",
        "regularizer=l2sp",
        "direction=dtnh",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "results.dir=res",
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for seed in (0, 1, 2):
        metrics = json.loads((tmp_path / "run" / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["device"].startswith("cuda")
    from conftest import table_rows

    (n_seeds,) = table_rows(tmp_path / "res", "cub200")["n_seeds"]
    assert n_seeds == 3


@pytest.mark.parametrize("regularizer", ["l2sp", "knowdist"])
def test_a_compiled_network_takes_the_same_dtnh_step(compose_cfg, no_tf32, regularizer):
    """runtime.compile: DTNH's two backward passes through one graph (retain_graph) work on a
    compiled network (they failed before compile_network kept the backward's buffers), and
    its step is about as exact as the eager one (against float64)."""
    cfg = compose_cfg(f"regularizer={regularizer}", "direction=dtnh")
    exact = one_step(cfg, torch.device("cpu"), dtype=torch.float64)
    eager, compiled = one_step(cfg, torch.device("cuda")), one_step(cfg, torch.device("cuda"), compile=True)
    print(
        f"{regularizer}: relative error against float64: eager {relative_error(eager, exact):.2e}, "
        f"compiled {relative_error(compiled, exact):.2e}"
    )
    assert relative_error(compiled, exact) <= max(3 * relative_error(eager, exact), 1e-5)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4)


@pytest.mark.parametrize("regularizer", ["l2sp", "knowdist"])
def test_a_dtnh_step_never_waits_for_the_gpu(compose_cfg, regularizer):
    """A DTNH step, its finiteness guard included (deferred on CUDA: the verdict, the skipped
    update and the failing step are kept on the device), launches its work without reading
    anything back from the GPU: the projection's coefficient stays on the device. (BSS is left
    out: it reads its 48 x 48 Gram matrix back to solve it on the host,
    as any CUDA SVD or eigensolver waits for the GPU.)"""
    from safetransfer.data.datasets import TensorImages
    from safetransfer.job.build import create_direction, create_omega, create_optimizer
    from safetransfer.training.backbones import TransferNet
    from safetransfer.training.engine import training_step
    from safetransfer.training.finite import FiniteGuard
    from safetransfer.training.regularizers import BindContext

    cfg = compose_cfg(f"regularizer={regularizer}", "direction=dtnh")
    device = torch.device("cuda")
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    model = TransferNet("resnet18", 3).to(device)
    omega = create_omega(cfg)
    omega.bind(model, BindContext(device=device, train_data=TensorImages(images, labels), batch_size=6))
    optimizer, _ = create_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    images, labels = images.to(device), labels.to(device)
    direction = create_direction(cfg)
    guard = FiniteGuard(model, device)
    assert guard.deferred
    step = lambda: training_step(model, images, labels, omega, direction, optimizer, params, guard=guard)
    step()  # the first step allocates (cuDNN's plans, the optimizer's momentum)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_finiteness_guard_on_cuda_leaves_the_weights_of_step_k_minus_1():
    """The deferred guard (CUDA's default) on the GPU: a NaN from step 3 on, reported at the row of step 4."""
    from safetransfer.training.engine import Loop, fit
    from safetransfer.training.finite import NonFiniteError
    from test_finite import parts, state

    device = torch.device("cuda")
    reference, poisoned = parts(None, device), parts(3, device)
    fit(reference, Loop(iterations=2, log_every=0))
    with pytest.raises(NonFiniteError, match=r"iteration 3 \(epoch 0\): Omega term poison is nan.*seen at iteration 4"):
        fit(poisoned, Loop(iterations=8, log_every=4))
    expected, got = state(reference.model), state(poisoned.model)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
