"""The performance figures, in one process on the same images, as ratios against a
reference measured in the same run; printed and written to BENCHMARKS.md, the step times
the plan projects from to BENCHMARKS.json.

    python scripts/benchmark.py                      # small defaults on a CPU (64 px, batch 16): a few minutes
    python scripts/benchmark.py --device cuda        # 224 px, batch 48, ResNet-18 and ResNet-50

1. reference: the loop of common public scripts (torchvision ResNet, ImageFolder with
   PIL transforms, DataLoader, SGD with momentum and weight decay, fp32) against the
   project's Fine-tuning step; model-only (a batch already in memory) and end to end;
2. every regularizer under direction=sum and direction=dtnh, per backbone;
3. the data pipeline alone, per-image decoding against the decoded-image cache, beside
   what the model consumes;
4. peak memory of each measurement (GPU: max allocated; CPU: resident set, sampled);
and the share of BSS's spectrum in a step (the term's value, beside torch.linalg.svdvals),
what DTNH's direction costs the host, five seeds stepped concurrently against one after
another (CUDA), and the projected wall time of one paper cell (5 seeds x 8,000 steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_module
from PIL import Image
from torch.utils.data import DataLoader

from safetransfer.data.augment import DeviceAugment
from safetransfer.data.preparation import Data, prepare_data
from safetransfer.data.targets.imagefolder import ImageFolderTarget
from safetransfer.job.build import build_seed, create_loader
from safetransfer.training.backbones import Features, TransferNet
from safetransfer.training.directions import DTNH, Dots64, Sum
from safetransfer.training.engine import Loop, autocast, fit, training_step
from safetransfer.training.regularizers.bss import BSS

REGULARIZERS = ["l2", "l2sp", "knowdist", "delta", "l2_bss", "l2sp_bss", "delta_bss"]
PROFILES = {  # what "small defaults on the CPU" and the papers' scale on a GPU mean
    "cpu": dict(
        size=64,
        batch=16,
        steps=10,
        warmup=2,
        images=96,
        workers=2,
        attention_images=8,
        backbones=["resnet18", "resnet50"],
    ),
    "cuda": dict(
        size=224,
        batch=48,
        steps=50,
        warmup=10,
        images=960,
        workers=8,
        attention_images=256,
        backbones=["resnet18", "resnet50"],
    ),
}
CELL_ITERATIONS, CELL_SEEDS = 8000, 5
SPECTRUM_ROWS = (
    "torch.linalg.svdvals (reference)",  # BSS's spectrum: the reference, then the term's own
    "the term's value (Gram matrix, float64 eigh on the host)",
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Peak:
    mib: float = 0.0


@contextmanager
def peak_memory(device: torch.device):
    """GPU: the most memory allocated during the block; CPU: the largest resident set seen (sampled every 5 ms)."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.mib = torch.cuda.max_memory_allocated(device) / 2**20
        return
    page, done = os.sysconf("SC_PAGE_SIZE"), threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/statm") as handle:
                peak.mib = max(peak.mib, int(handle.read().split()[1]) * page / 2**20)
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


@dataclass
class Result:
    what: str
    images_per_s: float
    ms_per_step: float | None = None
    peak_mib: float = 0.0
    notes: dict = field(default_factory=dict)


def compare(steps: dict, args, batch: int, device: torch.device, rounds: int = 5) -> list[Result]:
    """Time several step closures in interleaved rounds (A B A B ...), so that a machine's
    drift hits all alike; ms/step is the median over rounds, peak memory the largest seen."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    per_round = max(1, args.steps // rounds)
    times: dict[str, list[float]] = {what: [] for what in steps}
    peaks = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for what, step in steps.items():
            synchronize(device)
            with peak_memory(device) as peak:
                start = time.perf_counter()
                for _ in range(per_round):
                    step()
                synchronize(device)
                times[what].append((time.perf_counter() - start) / per_round)
            peaks[what] = max(peaks[what], peak.mib)
    return [
        Result(what, batch / float(np.median(t)), 1000 * float(np.median(t)), peaks[what]) for what, t in times.items()
    ]


def timed(step, steps: int, warmup: int, batch: int, device: torch.device, what: str) -> Result:
    """One closure, `steps` timed steps in one round."""
    return compare({what: step}, argparse.Namespace(steps=steps, warmup=warmup), batch, device, rounds=1)[0]


def config(*overrides: str):
    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def seed_config(args, device: torch.device, *overrides: str):
    """A config for build_seed on one fixed batch: this device, no loader workers, DELTA's
    attention over the batch itself, cached in the run's temporary folder."""
    cfg = config(
        *overrides,
        f"runtime.device={device}",
        f"train.batch_size={args.batch}",
        "runtime.num_workers=0",
        f"paths.cache_dir={args.cache}",
    )
    for term in cfg.regularizer.terms.values():
        if "ablation_images" in term:
            term.ablation_images = min(term.ablation_images, args.batch)
    return cfg


# -- the reference: how common public fine-tuning scripts are written -------------------------


def reference_model(backbone: str, classes: int, device: torch.device):
    model = getattr(torchvision.models, backbone)(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, classes)
    model = model.to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def reference_step(model, optimizer, images, labels):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


def reference_transform(resize: int, crop: int):
    t = torchvision.transforms
    return t.Compose(
        [
            t.Resize((resize, resize)),
            t.RandomCrop(crop),
            t.RandomHorizontalFlip(),
            t.ToTensor(),
            t.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )


# -- the project's step -------------------------------------------------------------------------


@dataclass
class Pieces:
    """What the engine's training_step takes, built by safetransfer.job.build as run_seed builds it."""

    model: TransferNet
    images: torch.Tensor
    labels: torch.Tensor
    omega: object
    direction: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list
    precision: object


def project_pieces(cfg, backbone: str, classes: int, device: torch.device, images, labels) -> Pieces:
    """The seed's pieces from build_seed, on one fixed batch (DELTA's attention comes from the
    batch itself: a one-time cost, not timed)."""
    p = build_seed(cfg, 0, Data.from_tensors(images, labels, classes), None).parts
    if cfg.runtime.channels_last and device.type == "cuda":  # the layout fit feeds a channels-last network
        images = images.contiguous(memory_format=torch.channels_last)
    params = [q for q in p.model.parameters() if q.requires_grad]
    return Pieces(
        p.model,
        images,
        labels,
        p.omega,
        p.direction,
        p.optimizer,
        p.scheduler,
        params,
        autocast(device, cfg.train.precision),
    )


def project_step(cfg, backbone: str, classes: int, device: torch.device, images, labels):
    """A closure running the engine's training_step with the config's Omega and direction."""
    p = project_pieces(cfg, backbone, classes, device, images, labels)

    def step():
        training_step(p.model, p.images, p.labels, p.omega, p.direction, p.optimizer, p.params, p.precision)
        p.scheduler.step()

    return step


# -- images on disk ------------------------------------------------------------------------------


def write_photos(
    root: Path, count: int, classes: int, width: int = 500, height: int = 375, test_every: int = 8
) -> None:
    """Smooth random photos (JPEG sizes like real ones) in ImageFolder's layout, train/ and
    test/ (every `test_every`-th photo of each class)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        split = "test" if (i // classes) % test_every == test_every - 1 else "train"
        path = root / split / f"class_{i % classes:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)


def loader_rate(loader: DataLoader, device: torch.device, batches: int, transform=None) -> float:
    """Images per second the loader delivers to the device (after one warm-up batch)."""
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, _ = next(iterator)
        images = images.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        count += len(images)
    synchronize(device)
    return count / (time.perf_counter() - start)


# -- the measurements ----------------------------------------------------------------------------


def model_only(args, device, backbone: str) -> list[Result]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)

    def ours(regularizer: str, direction: str, precision: str, compiled: bool = False):
        cfg = seed_config(
            args,
            device,
            f"backbone={backbone}",
            f"regularizer={regularizer}",
            f"direction={direction}",
            f"train.precision={precision}",
            f"runtime.compile={compiled}",
        )
        return project_step(cfg, backbone, args.classes, device, images, labels)

    model, optimizer = reference_model(backbone, args.classes, device)
    steps = {
        f"{backbone} reference step (fp32)": lambda: reference_step(model, optimizer, images, labels),
        f"{backbone} Fine-tuning step (fp32)": ours("l2", "sum", "fp32"),
    }
    if device.type == "cuda":
        steps[f"{backbone} Fine-tuning step (bf16)"] = ours("l2", "sum", "bf16")
    if args.compile:
        steps[f"{backbone} Fine-tuning step (fp32, compiled)"] = ours("l2", "sum", "fp32", compiled=True)
    results = compare(steps, args, args.batch, device)
    del steps  # the reference model and its optimizer go with their closure
    for regularizer in args.regularizers:  # sum and dtnh of a regularizer timed in alternation
        results += compare(
            {
                f"{backbone} {regularizer} {direction}": ours(regularizer, direction, args.precision)
                for direction in ("sum", "dtnh")
            },
            args,
            args.batch,
            device,
        )
    features = Features(None, {}, torch.randn(args.batch, 2048 if backbone == "resnet50" else 512, device=device))
    bss = BSS()
    spectra = (lambda: torch.linalg.svdvals(features.pooled), lambda: bss.value(None, features))
    results += compare(
        {f"{backbone} BSS spectrum: {what}": run for what, run in zip(SPECTRUM_ROWS, spectra)},
        argparse.Namespace(steps=args.steps * 5, warmup=args.warmup),
        args.batch,
        device,
    )
    return results


def host_overhead(args, device, backbone: str) -> list[Result]:
    """What DTNH adds to a closed-form term's step (L2-SP's), apart from the arithmetic:
    the zero g_Omega the term's gradient is added into, and the direction, on one-element
    tensors, one per trainable parameter tensor of the network (a sum step gets d from its
    one backward pass and calls neither). On a GPU whose step is bound by launching kernels
    from Python, this fixed cost is what shows. Beside it, one foreach addition over the same
    tensors (the Sum direction) as a floor."""
    shapes = [p.shape for p in TransferNet(backbone, args.classes).parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    g_J, g_Omega = ([torch.randn(1, generator=generator).to(device) for _ in shapes] for _ in range(2))
    sum_, dtnh = Sum(), DTNH()
    steps = {
        f"{backbone} host: Sum direction ({len(shapes)} one-element tensors)": lambda: sum_(g_J, g_Omega),
        f"{backbone} host: zero g_Omega + DTNH direction ({len(shapes)} one-element tensors)": lambda: dtnh(
            g_J, dtnh.zero_gradient(g_J)
        ),
    }
    results = compare(steps, argparse.Namespace(steps=max(args.steps, 10) * 50, warmup=args.warmup * 10), 1, device)
    for r in results:
        r.notes["us per step"] = f"{1000 * r.ms_per_step:.0f}"
    return results


def dtnh_dots(args, device, backbone: str) -> list[Result]:
    """DTNH's two dot products, <g_J, g_Omega> and ||g_J||^2, over all trainable parameters as
    one vector: float32 BLAS (which accumulates in float32) against Dots64 (exact products,
    float64 sums), with the relative error of each one's ||g_J||^2 against NumPy's float64 sum
    of the same float32 values."""
    count = sum(p.numel() for p in TransferNet(backbone, args.classes).parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(0)
    g_J = (1e-3 * torch.randn(count, generator=generator)).to(device)
    g_Omega = (1e-3 * torch.randn(count, generator=generator) - 2e-4).to(device)
    dots = Dots64()
    steps = {
        f"{backbone} DTNH dots: float32 (torch.dot)": lambda: (torch.dot(g_J, g_Omega), torch.dot(g_J, g_J)),
        f"{backbone} DTNH dots: float64 sums (Dots64)": lambda: dots(g_J, g_Omega),
    }
    results = compare(steps, argparse.Namespace(steps=max(args.steps, 10) * 5, warmup=args.warmup), 1, device)
    values = g_J.cpu().double().numpy()
    exact = float(np.dot(values, values))
    for r, squared in zip(results, (torch.dot(g_J, g_J), dots(g_J, g_Omega)[1])):
        r.notes["||g_J||^2 relative error"] = f"{abs(float(squared) - exact) / exact:.1e}"
        r.notes["parameters"] = count
    return results


FEATURE_TERMS = ("knowdist", "delta")  # the terms whose gradient needs a backward pass of its own


def backward_passes(args, device, backbone: str) -> list[Result]:
    """DTNH on a feature term against the least it can cost: it needs g_J and g_Omega apart,
    so forward + two backward passes (g_J keeping the graph, then g_Omega) and an SGD step is
    its bound; beside it forward + one backward (the sum's step) and one batched backward of
    both at once (autograd.grad with is_grads_batched, a vmap over the backward pass)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)
    results = []
    for regularizer in [r for r in FEATURE_TERMS if r in args.regularizers]:
        cfg = seed_config(
            args,
            device,
            f"backbone={backbone}",
            f"regularizer={regularizer}",
            "direction=dtnh",
            f"train.precision={args.precision}",
        )
        p = project_pieces(cfg, backbone, args.classes, device, images, labels)

        def forward():
            with p.precision:
                logits, features = p.model(p.images)
                loss_J = F.cross_entropy(logits, p.labels)
                values = p.omega.autograd_values(p.model, features)
            return loss_J, torch.stack(list(values.values())).sum()

        def step_along(g_J, g_Omega):
            p.omega.add_closed_form_gradient(p.params, g_Omega)
            for param, a, b in zip(p.params, g_J, g_Omega):
                param.grad = a + b
            p.optimizer.step()

        def one_backward():
            loss_J, omega = forward()
            grads = torch.autograd.grad(loss_J + omega, p.params)
            step_along(grads, [torch.zeros_like(g) for g in grads])

        def two_backwards():
            loss_J, omega = forward()
            g_J = torch.autograd.grad(loss_J, p.params, retain_graph=True)
            step_along(g_J, torch.autograd.grad(omega, p.params, allow_unused=True, materialize_grads=True))

        def batched_backward():
            loss_J, omega = forward()
            both = torch.autograd.grad(
                torch.stack([loss_J, omega]),
                p.params,
                grad_outputs=torch.eye(2, device=device),
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            step_along([g[0] for g in both], [g[1] for g in both])

        def dtnh():
            training_step(p.model, p.images, p.labels, p.omega, p.direction, p.optimizer, p.params, p.precision)

        steps = {
            f"{backbone} {regularizer}: forward + one backward": one_backward,
            f"{backbone} {regularizer}: forward + two backwards (bound)": two_backwards,
            f"{backbone} {regularizer}: DTNH step (engine)": dtnh,
        }
        try:
            batched_backward()
            steps[f"{backbone} {regularizer}: forward + one batched backward (is_grads_batched)"] = batched_backward
        except Exception as error:  # noqa: BLE001 (a vmap rule missing for an operator: reported, not timed)
            results.append(
                Result(
                    f"{backbone} {regularizer}: forward + one batched backward (is_grads_batched)",
                    0.0,
                    None,
                    0.0,
                    {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"},
                )
            )
        results += compare(steps, args, args.batch, device)
    return results


def attention_time(args, device, backbone: str) -> list[Result]:
    """DELTA's one-time channel attention (source head fit and every channel's ablation over
    the training images) on random images: the time build_seed takes with DELTA (its attention,
    computed in the bind, is almost all of it), with a cache folder of its own (no cached
    attention to find)."""
    count = args.attention_images
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 3, args.size, args.size, generator=generator)
    labels = torch.arange(count) % args.classes
    with tempfile.TemporaryDirectory() as cache:
        cfg = config(
            f"backbone={backbone}",
            "regularizer=delta",
            f"regularizer.terms.delta.ablation_images={count}",
            f"runtime.device={device}",
            f"train.batch_size={args.batch}",
            "runtime.num_workers=0",
            f"paths.cache_dir={cache}",
        )
        with peak_memory(device) as peak:
            start = time.perf_counter()
            build_seed(cfg, 0, Data.from_tensors(images, labels, args.classes), None)
            synchronize(device)
            seconds = time.perf_counter() - start
    return [
        Result(
            f"{backbone} DELTA attention (one-time, {count} images)",
            count / seconds,
            None,
            peak.mib,
            {"seconds": f"{seconds:.1f}"},
        )
    ]


def end_to_end(args, device, backbone: str, root: Path) -> list[Result]:
    resize = args.size * 8 // 7  # 256 -> 224
    reference_data = torchvision.datasets.ImageFolder(str(root / "train"), reference_transform(resize, args.size))
    loader = DataLoader(
        reference_data,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    model, optimizer = reference_model(backbone, args.classes, device)
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        reference_step(model, optimizer, images.to(device, non_blocking=True), labels.to(device, non_blocking=True))

    results = [timed(step, args.steps, args.warmup, args.batch, device, f"{backbone} reference loop, end to end")]

    cfg = config(
        f"backbone={backbone}",
        "target=imagefolder",
        f"target.root={root}",
        "regularizer=l2",
        "direction=sum",
        f"data.resize={resize}",
        f"data.crop={args.size}",
        f"train.batch_size={args.batch}",
        f"runtime.num_workers={args.workers}",
        f"runtime.device={device}",
        "runtime.log_every=0",
        "runtime.checkpoint_every=0",
        f"paths.cache_dir={root / 'cache'}",
        "runtime.progress=log",
        f"train.precision={args.precision}",
    )
    start = time.perf_counter()
    data = prepare_data(cfg, ImageFolderTarget(str(root)))  # builds the decoded-image cache once
    build_s = time.perf_counter() - start
    parts = build_seed(cfg, 0, data, None).parts  # as run_seed builds a seed
    augment = parts.batch_transform

    def run(iterations):
        fit(parts, Loop(iterations, precision=cfg.train.precision, log_every=0))

    run(args.warmup)  # workers up, autotuning done
    synchronize(device)
    with peak_memory(device) as peak:
        start = time.perf_counter()
        run(args.steps)
        synchronize(device)
        seconds = time.perf_counter() - start
    results.append(
        Result(
            f"{backbone} safetransfer, end to end ({'cached, augment on device' if augment else 'cached'})",
            args.steps * args.batch / seconds,
            1000 * seconds / args.steps,
            peak.mib,
            {"cache build (one-time)": f"{build_s:.1f} s"},
        )
    )
    return results


def pipeline(args, device, root: Path) -> list[Result]:
    resize = args.size * 8 // 7
    direct = DataLoader(
        torchvision.datasets.ImageFolder(str(root / "train"), reference_transform(resize, args.size)),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    cfg = config(
        "target=imagefolder",
        f"target.root={root}",
        f"data.resize={resize}",
        f"data.crop={args.size}",
        f"train.batch_size={args.batch}",
        f"runtime.num_workers={args.workers}",
        f"runtime.device={device}",
        f"paths.cache_dir={root / 'cache'}",
    )
    data = prepare_data(cfg, ImageFolderTarget(str(root)))
    cached = create_loader(data.train, cfg, train=True, seed=0, device=device)
    augment = DeviceAugment(args.size, cfg.data.mean, cfg.data.std, 0, device) if data.on_device else None
    batches = max(args.steps, 2 * args.images // args.batch)
    results = []
    for what, loader, transform in (
        ("per-image PIL decoding (reference)", direct, None),
        ("decoded-image cache", cached, augment),
    ):
        with peak_memory(device) as peak:
            rate = loader_rate(loader, device, batches, transform)
        results.append(Result(f"data pipeline: {what}", rate, None, peak.mib))
    return results


def concurrent_seeds(args, device, backbone: str = "resnet18") -> list[Result]:
    """Five models stepped round-robin on five CUDA streams, against the same five one after another."""
    if device.type != "cuda":
        return []
    cfg = seed_config(
        args, device, f"backbone={backbone}", "regularizer=l2", "direction=sum", f"train.precision={args.precision}"
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)
    steps = [project_step(cfg, backbone, args.classes, device, images, labels) for _ in range(CELL_SEEDS)]
    streams = [torch.cuda.Stream(device) for _ in steps]

    def sequential():
        for step in steps:
            step()

    def concurrent():
        for stream, step in zip(streams, steps):
            with torch.cuda.stream(stream):
                step()

    return [
        timed(
            sequential,
            args.steps,
            args.warmup,
            args.batch * CELL_SEEDS,
            device,
            f"{backbone} five seeds, one after another",
        ),
        timed(
            concurrent,
            args.steps,
            args.warmup,
            args.batch * CELL_SEEDS,
            device,
            f"{backbone} five seeds, concurrent (CUDA streams)",
        ),
    ]


# -- report --------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    text = f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return f"{text}; torch {torch.__version__}, torchvision {torchvision.__version__}"


def find(results: list[Result], what: str) -> Result:
    return next(r for r in results if r.what == what)


def report(args, device, results: list[Result]) -> str:
    lines = [
        f"Machine: {machine(device)}.",
        f"Settings: {args.size} px, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.workers} loader workers, {args.images} JPEGs of 500x375, precision {args.precision}.",
        "Command: `python scripts/benchmark.py " + " ".join(args.argv) + "`",
        "",
        "| measurement | images/s | ms/step | peak memory (MiB) | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        step = f"{r.ms_per_step:.1f}" if r.ms_per_step is not None else ""
        notes = "; ".join(f"{k}: {v}" for k, v in r.notes.items())
        lines.append(f"| {r.what} | {r.images_per_s:.1f} | {step} | {r.peak_mib:.0f} | {notes} |")
    lines += ["", "Ratios (same run):", ""]
    for backbone in args.backbones:
        ref, ours = (
            find(results, f"{backbone} reference step (fp32)"),
            find(results, f"{backbone} Fine-tuning step (fp32)"),
        )
        lines.append(
            f"- {backbone} Fine-tuning model-only step / reference step: "
            f"{ours.images_per_s / ref.images_per_s:.3f}x (target >= 0.97)"
        )
        for variant in ("bf16", "fp32, compiled"):
            found = [r for r in results if r.what == f"{backbone} Fine-tuning step ({variant})"]
            if found:
                lines.append(
                    f"- {backbone} Fine-tuning step ({variant}) / fp32 eager: "
                    f"{found[0].images_per_s / ours.images_per_s:.2f}x"
                )
        e2e = [r for r in results if r.what.startswith(f"{backbone} safetransfer, end to end")]
        if e2e:
            reference = find(results, f"{backbone} reference loop, end to end")
            lines.append(
                f"- {backbone} end to end / reference loop: {e2e[0].images_per_s / reference.images_per_s:.2f}x"
                " (target on a GPU >= 2)"
            )
        for regularizer in args.regularizers:
            s, d = find(results, f"{backbone} {regularizer} sum"), find(results, f"{backbone} {regularizer} dtnh")
            lines.append(f"- {backbone} DTNH / sum step time, {regularizer}: {d.ms_per_step / s.ms_per_step:.3f}")
        if "l2sp" in args.regularizers and "l2" in args.regularizers:
            l2sp, dtnh = find(results, f"{backbone} l2sp sum"), find(results, f"{backbone} l2sp dtnh")
            lines.append(
                f"- {backbone} DTNH (L2-SP) / L2-SP: {dtnh.ms_per_step / l2sp.ms_per_step:.3f} (target <= 1.05)"
            )
        host = [r for r in results if r.what.startswith(f"{backbone} host: ")]
        if host:
            lines.append(
                f"- {backbone} host time per step of the direction (one-element tensors): Sum "
                f"{host[0].notes['us per step']} us, zero g_Omega + DTNH {host[1].notes['us per step']} us"
            )
        dots = [r for r in results if r.what.startswith(f"{backbone} DTNH dots: ")]
        if dots:
            extra = dots[1].ms_per_step - dots[0].ms_per_step
            share = [r for r in results if r.what == f"{backbone} l2sp dtnh"]
            lines.append(
                f"- {backbone} DTNH's dot products in float64: {extra:+.2f} ms a step against float32"
                + (f", {100 * extra / share[0].ms_per_step:.1f} % of a DTNH (L2-SP) step" if share else "")
                + f"; ||g_J||^2 relative error {dots[0].notes['||g_J||^2 relative error']} (float32) -> "
                f"{dots[1].notes['||g_J||^2 relative error']} (float64)"
            )
        if "l2_bss" in args.regularizers:
            svd, term = (find(results, f"{backbone} BSS spectrum: {what}") for what in SPECTRUM_ROWS)
            bss = find(results, f"{backbone} l2_bss sum")
            lines.append(
                f"- {backbone} BSS's spectrum / L2+BSS step: {100 * term.ms_per_step / bss.ms_per_step:.1f} % "
                f"(target on a GPU <= 5 %); with torch.linalg.svdvals it would be "
                f"{100 * svd.ms_per_step / bss.ms_per_step:.1f} %"
            )
        for regularizer in [r for r in FEATURE_TERMS if r in args.regularizers]:
            if not any(r.what.startswith(f"{backbone} {regularizer}: ") for r in results):
                continue
            one, two, engine = (
                find(results, f"{backbone} {regularizer}: {what}")
                for what in ("forward + one backward", "forward + two backwards (bound)", "DTNH step (engine)")
            )
            lines.append(
                f"- {backbone} {regularizer}: DTNH step / two-backward bound: "
                f"{engine.ms_per_step / two.ms_per_step:.3f} (target <= 1.10); two backwards / one: "
                f"{two.ms_per_step / one.ms_per_step:.3f}"
            )
            batched = find(results, f"{backbone} {regularizer}: forward + one batched backward (is_grads_batched)")
            lines.append(
                f"- {backbone} {regularizer}: one batched backward (is_grads_batched) / two backwards: "
                + (
                    f"{batched.ms_per_step / two.ms_per_step:.3f}"
                    if batched.ms_per_step
                    else f"not measured, it failed ({batched.notes['failed']})"
                )
            )
        attention = [r for r in results if r.what.startswith(f"{backbone} DELTA attention")]
        if attention:
            lines.append(
                f"- {backbone} DELTA attention, one-time per cell: {attention[0].notes['seconds']} s "
                f"({args.attention_images} images at {args.size} px)"
            )
        step = find(results, f"{backbone} Fine-tuning step (fp32)").ms_per_step / 1000
        lines.append(
            f"- {backbone} projected wall time of one cell ({CELL_SEEDS} seeds x {CELL_ITERATIONS} steps, "
            f"model-only Fine-tuning at these settings): {CELL_SEEDS * CELL_ITERATIONS * step / 3600:.2f} h"
        )
    pipeline_rows = [r for r in results if r.what.startswith("data pipeline")]
    if pipeline_rows:
        direct, cached = pipeline_rows
        model = find(results, f"{args.backbones[-1]} Fine-tuning step (fp32)")
        lines.append(
            f"- data pipeline: cache / per-image decoding {cached.images_per_s / direct.images_per_s:.2f}x; "
            f"per-image decoding / {args.backbones[-1]} model {direct.images_per_s / model.images_per_s:.2f}x, "
            f"cache / model {cached.images_per_s / model.images_per_s:.2f}x"
        )
    seeds = [r for r in results if r.what.startswith("resnet18 five seeds")]
    if seeds:
        lines.append(
            f"- five seeds concurrent / one after another: {seeds[1].images_per_s / seeds[0].images_per_s:.2f}x"
        )
    else:
        lines.append("- five seeds concurrently: measured on CUDA only (not on this machine)")
    return "\n".join(lines) + "\n"


#: the figures `safetransfer-reproduce --plan` projects from: beside BENCHMARKS.md, as JSON
FIGURES = Path(__file__).resolve().parent.parent / "BENCHMARKS.json"


def write_figures(path: Path, kind: str, figures: dict) -> None:
    """Replace this kind's entry of the figures file (cuda, cpu, cuda-cell, cpu-cell), keeping the
    others: the numbers the plan reads, beside the prose of BENCHMARKS.md."""
    import json

    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, kind: figures}, indent=1, sort_keys=True) + "\n")


def step_figures(args, results: list[Result]) -> dict:
    """What the plan needs of a run of this script: the settings, the model-only step time of
    each 'backbone regularizer direction' row (at args.precision), and the Fine-tuning step in
    each precision measured beside them (which scales those rows to the precision a job uses)."""
    by_precision: dict[str, dict[str, float]] = {}
    steps: dict[str, dict[str, dict[str, float]]] = {}  # backbone -> regularizer -> direction -> ms
    for r in results:
        found = re.fullmatch(r"(resnet\d+) Fine-tuning step \((fp32|bf16)\)", r.what)
        if found and r.ms_per_step is not None:
            by_precision.setdefault(found[1], {})[found[2]] = round(r.ms_per_step, 3)
        row = re.fullmatch(r"(resnet\d+) (\w+) (sum|dtnh)", r.what)  # this script's own row names
        if row and r.ms_per_step is not None:
            steps.setdefault(row[1], {}).setdefault(row[2], {})[row[3]] = round(r.ms_per_step, 3)
    return {
        "px": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "ms_per_step": steps,
        "fine_tuning_ms_by_precision": by_precision,
    }


def write_section(path: Path, kind: str, text: str, title: str | None = None) -> None:
    """Replace this device kind's section of BENCHMARKS.md, keeping the others."""
    begin, end = f"<!-- {kind} -->", f"<!-- /{kind} -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `python scripts/benchmark.py`.\n"
    block = f"{begin}\n## {title or kind.upper()}\n\n{text}{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for key, kind in (
        ("size", int),
        ("batch", int),
        ("steps", int),
        ("warmup", int),
        ("images", int),
        ("workers", int),
        ("attention_images", int),
    ):
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=kind, default=None, help="default: by device (see PROFILES)"
        )
    parser.add_argument("--backbones", nargs="*", default=None)
    parser.add_argument("--regularizers", nargs="*", default=REGULARIZERS)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    parser.add_argument("--figures", type=Path, default=FIGURES, help="the plan's figures (JSON)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["end_to_end", "pipeline", "regularizers", "backward", "attention", "host", "dots"],
    )
    parser.add_argument("--compile", action="store_true", help="also time the Fine-tuning step under torch.compile")
    import sys

    args = parser.parse_args()
    args.argv = sys.argv[1:]
    device = torch.device(args.device)
    profile = PROFILES[device.type]
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if "regularizers" in args.skip:
        args.regularizers = []
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results: list[Result] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        args.cache = root / "cache"  # DELTA's attention of the fixed batches, and the decoded images
        write_photos(root, args.images, args.classes)

        def add(found: list[Result]) -> None:  # printed as measured: a run cut short keeps what it saw
            results.extend(found)
            for r in found:
                print(
                    f"{r.what}: {r.images_per_s:.1f} images/s, {r.ms_per_step or 0:.1f} ms/step, "
                    f"{r.peak_mib:.0f} MiB {r.notes or ''}",
                    flush=True,
                )

        for backbone in args.backbones:
            add(model_only(args, device, backbone))
            if "host" not in args.skip:
                add(host_overhead(args, device, backbone))
            if "dots" not in args.skip:
                add(dtnh_dots(args, device, backbone))
            if "backward" not in args.skip:
                add(backward_passes(args, device, backbone))
            if "attention" not in args.skip and "delta" in args.regularizers:
                add(attention_time(args, device, backbone))
            if "end_to_end" not in args.skip:
                add(end_to_end(args, device, backbone, root))
        if "pipeline" not in args.skip:
            add(pipeline(args, device, root))
        add(concurrent_seeds(args, device))
    text = report(args, device, results)
    print(text)
    write_section(args.out, device.type, text)
    write_figures(args.figures, device.type, step_figures(args, results))
    print(f"written to {args.out} and {args.figures}")


if __name__ == "__main__":
    main()
