"""Images per second of the data pipeline, cached versus per-image JPEG decoding, against
what the model consumes, measured in one process on the same images.

    python scripts/benchmark_loader.py --images 960 --workers 4 --backbone resnet50 --device cuda
    python scripts/benchmark_loader.py --images 192 --workers 2 --size 224   # a quick look on a CPU

It writes `--images` JPEGs of `--width` x `--height` pixels (about the size of the
papers' datasets' photos) to a temporary folder, then measures:
1. direct: DataLoader over the files, PIL decode + resize + crop + mirror per image;
2. cached: the same images after one pass into the decoded-image cache (the pass is
   timed separately), crop + mirror on the cached uint8 tensors;
3. model: a training step (forward, backward, SGD) of the backbone at batch `--batch`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from safetransfer.backbones import TransferNet
from safetransfer.targets import IMAGENET_MEAN, IMAGENET_STD, Transformed, augment_transform, train_transform
from safetransfer.targets.cache import cached_split
from safetransfer.targets.files import ImageList


def images_per_second(loader: DataLoader, device: torch.device, epochs: int = 2) -> float:
    count, start = 0, None
    for epoch in range(epochs + 1):  # the first pass warms the workers up and is not timed
        if epoch == 1:
            start = time.perf_counter()
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if epoch:
                count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def model_images_per_second(backbone: str, batch: int, size: int, device: torch.device, steps: int) -> float:
    model = TransferNet(backbone, 100).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images)[0], labels).backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):  # smooth random photos: JPEG sizes like real ones, not like noise
            small = rng.integers(0, 256, (args.height // 8, args.width // 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((args.width, args.height), Image.BILINEAR)
            paths.append(folder / f"{i:05d}.jpg")
            image.save(paths[-1], quality=90)
        dataset = ImageList(paths, [i % 10 for i in range(args.images)])
        indices = np.arange(args.images)
        loader_options = dict(batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
        direct = DataLoader(Transformed(dataset, indices, train_transform(args.resize, args.size, IMAGENET_MEAN,
                                                                          IMAGENET_STD)), **loader_options)
        start = time.perf_counter()
        cached_all = cached_split(dataset, indices, "train", args.resize, args.size, folder / "cache",
                                  {"benchmark": args.images}, num_workers=args.workers)
        build_seconds = time.perf_counter() - start
        cached = DataLoader(Transformed(cached_all, indices, augment_transform(args.size, IMAGENET_MEAN,
                                                                               IMAGENET_STD)), **loader_options)
        rates = {"direct": images_per_second(direct, device), "cached": images_per_second(cached, device)}
    rates["model"] = model_images_per_second(args.backbone, args.batch, args.size, device, args.steps)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# loader benchmark: {args.images} JPEGs {args.width}x{args.height}, resize {args.resize}, crop {args.size}, "
          f"batch {args.batch}, {args.workers} workers, {args.backbone} on {device} ({name})")
    print(f"one-time cache build: {build_seconds:.1f} s ({args.images / build_seconds:.0f} images/s)")
    print("| pipeline | images/s | / model |")
    print("|---|---:|---:|")
    for key in ("direct", "cached", "model"):
        print(f"| {key} | {rates[key]:.0f} | {rates[key] / rates['model']:.2f} |")
    print(f"cached / direct: {rates['cached'] / rates['direct']:.2f}")


if __name__ == "__main__":
    main()
