"""Step time of every regularizer under `direction=sum` and `direction=dtnh`, in one process.

    python scripts/benchmark_steps.py --backbone resnet18 --batch 48 --size 224 --device cuda
    python scripts/benchmark_steps.py --size 64 --steps 10          # a quick look on a CPU

Each configuration runs `--warmup` untimed steps, then `--steps` timed ones on the same
in-memory batch (model-only: no data loading), with the real configs from conf/ and
the engine's own training_step. Prints ms per step and the ratio dtnh / sum.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from hydra import compose, initialize_config_module

from safetransfer.backbones import TransferNet
from safetransfer.engine import autocast, training_step
from safetransfer.experiment import create_direction, create_omega
from safetransfer.regularizers import BindContext
from safetransfer.targets import TensorImages

REGULARIZERS = ["l2", "l2sp", "knowdist", "delta", "l2_bss", "l2sp_bss", "delta_bss"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(regularizer: str, direction: str, args, images, labels, device) -> float:
    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"regularizer={regularizer}", f"direction={direction}",
                                           f"backbone={args.backbone}"])
    torch.manual_seed(0)
    model = TransferNet(args.backbone, args.classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    omega = create_omega(cfg)
    # DELTA's attention is computed once before training; here from a few of the same images
    context = BindContext(device=device, train_data=TensorImages(images.cpu(), labels.cpu()),
                          batch_size=args.batch, cache_dir=None, identity={})
    for term in omega.terms.values():
        if hasattr(term, "settings"):
            term.settings["ablation_images"] = min(term.settings["ablation_images"], args.batch)
    omega.bind(model, context)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": params}], lr=1e-3, momentum=0.9)
    precision, direction_strategy = autocast(device, args.precision), create_direction(cfg)
    step = lambda: training_step(model, images, labels, omega, direction_strategy, optimizer, params, precision)  # noqa: E731
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--regularizers", nargs="*", default=REGULARIZERS)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# step time: {args.backbone}, batch {args.batch}, {args.size} px, {args.precision}, {device} ({machine}), "
          f"torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up")
    print("| regularizer | sum (ms/step) | dtnh (ms/step) | dtnh / sum |")
    print("|---|---:|---:|---:|")
    for regularizer in args.regularizers:
        times = {d: time_steps(regularizer, d, args, images, labels, device) for d in ("sum", "dtnh")}
        print(f"| {regularizer} | {1000 * times['sum']:.1f} | {1000 * times['dtnh']:.1f} | "
              f"{times['dtnh'] / times['sum']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
