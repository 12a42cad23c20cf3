"""The cost of checkpointing: time to write one checkpoint of the whole training state
(weights, SGD momentum, scheduler, RNGs; atomic write with fsync) against the time of
the training steps between two checkpoints, measured in one process.

    python scripts/benchmark_checkpoint.py --backbone resnet50 --size 224 --batch 48 --device cuda
    python scripts/benchmark_checkpoint.py --size 64 --steps 5      # a quick look on a CPU

Prints ms per checkpoint, ms per step, and the share of training time spent writing
checkpoints at the given interval (the default runtime.checkpoint_every).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from safetransfer.backbones import TransferNet
from safetransfer.engine import Batches, training_step
from safetransfer.experiment import create_direction, create_omega, create_optimizer
from safetransfer.regularizers import BindContext
from safetransfer.resume import rng_state, save_checkpoint


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--regularizer", default="l2sp")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--saves", type=int, default=5, help="timed checkpoint writes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    device = torch.device(args.device)

    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"backbone={args.backbone}", f"regularizer={args.regularizer}"])
    every = cfg.runtime.checkpoint_every
    torch.manual_seed(0)
    model = TransferNet(args.backbone, args.classes).to(device)
    omega = create_omega(cfg)
    omega.bind(model, BindContext(device=device))
    optimizer, scheduler = create_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    direction = create_direction(cfg)

    def step():
        training_step(model, images, labels, omega, direction, optimizer, params)
        scheduler.step()

    step()  # warm-up, and the momentum buffers exist from here on
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps

    loader = torch.utils.data.DataLoader(list(range(args.batch * 2)), batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = Batches(loader)
    next(batches)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "checkpoint.pt"
        start = time.perf_counter()
        for i in range(args.saves):
            save_checkpoint(path, {"key": "benchmark", "iteration": i, "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "position": batches.position(), "rng": rng_state(), "augment": None,
                                   "window": {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long),
                                              "steps": 0, "images": 0}, "elapsed_s": 0.0})
        save_s = (time.perf_counter() - start) / args.saves
        size_mb = path.stat().st_size / 2**20

    share = save_s / (every * step_s + save_s)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{args.backbone}, {args.regularizer}, batch {args.batch} at {args.size} px")
    print(f"checkpoint: {save_s * 1e3:.1f} ms per write ({size_mb:.1f} MiB)")
    print(f"training step: {step_s * 1e3:.1f} ms")
    print(f"share of training time at runtime.checkpoint_every={every}: {100 * share:.3f} %")


if __name__ == "__main__":
    main()
