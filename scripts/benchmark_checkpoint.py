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

from safetransfer.data.preparation import Data
from safetransfer.job.build import build_seed
from safetransfer.training.checkpoints import Checkpointer
from safetransfer.training.engine import Loop, fit


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
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (each run; at least 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = max(2, args.steps)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch * 2, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, args.classes, (args.batch * 2,), generator=generator)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"backbone={args.backbone}",
                    f"regularizer={args.regularizer}",
                    f"runtime.device={device}",
                    f"train.batch_size={args.batch}",
                    "runtime.num_workers=0",
                    f"paths.cache_dir={folder}",
                ],
            )
        every = cfg.runtime.checkpoint_every
        parts = build_seed(cfg, 0, Data.from_tensors(images, labels, args.classes), None).parts  # as run_seed builds
        path = Path(folder) / "checkpoint.pt"

        def run(checkpointer: Checkpointer | None) -> float:
            """Seconds for `steps` steps of the training loop; with `checkpointer`, a checkpoint
            after each but the last."""
            synchronize(device)
            start = time.perf_counter()
            fit(parts, Loop(steps, log_every=0), checkpointer=checkpointer)
            synchronize(device)
            return time.perf_counter() - start

        run(None)  # warm-up, and the momentum buffers exist from here on
        plain = run(None)
        saving = run(Checkpointer(path, "benchmark", every=1))
        size_mb = path.stat().st_size / 2**20
    step_s = plain / steps
    save_s = max(0.0, saving - plain) / (steps - 1)

    share = save_s / (every * step_s + save_s)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(f"{args.backbone}, {args.regularizer}, batch {args.batch} at {args.size} px")
    print(
        f"checkpoint: {save_s * 1e3:.1f} ms per write ({size_mb:.1f} MiB), from {steps} steps of the loop with and "
        "without a checkpoint after each"
    )
    print(f"training step: {step_s * 1e3:.1f} ms")
    print(f"share of training time at runtime.checkpoint_every={every}: {100 * share:.3f} %")


if __name__ == "__main__":
    main()
