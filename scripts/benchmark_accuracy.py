"""Accuracy parity: the project's Fine-tuning against a plain PyTorch fine-tuning loop on
the same images with the same hyper-parameters, five seeds each; mean top-1 and test loss
side by side with their spread, and Welch's t-test of the difference.

    python scripts/benchmark_accuracy.py                 # the demo's generated domain, 32 px: minutes on a CPU
    python scripts/benchmark_accuracy.py --iterations 600 --seeds 0 1 2 3 4 5 6 7

The plain loop is what public fine-tuning scripts write (torchvision's ResNet with its own
fc, a DataLoader with torchvision transforms, SGD with momentum and weight_decay, the
final weights scored in eval mode); it shares no training code with the project. Both
train from a random initialisation (from scratch; no source), every layer at the same lr
(optim.head_lr_mult=1), with weight decay 1e-4 (the project's L2 term, alpha/2 ||w||^2,
has the same gradient as SGD's weight_decay), no lr drop (the project's milestone sits at
the last iteration, where it no longer acts), the same random crop + mirror of the same
36 x 36 resized images and the same centre crop at test time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_module
from scipy import stats
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from safetransfer.data.targets.demo import DemoTarget
from safetransfer.job.run import run_job


def project(seeds: list[int], args, out: Path, head_lr_mult: float = 1) -> list[dict]:
    overrides = [
        "experiment=demo",
        "source=scratch",
        "method=fine_tuning",
        f"seeds=[{','.join(map(str, seeds))}]",
        f"train.iterations={args.iterations}",
        f"train.batch_size={args.batch}",
        f"optim.optimizer.lr={args.lr}",
        f"optim.head_lr_mult={head_lr_mult}",
        f"optim.scheduler.milestones=[{args.iterations}]",
        f"regularizer.terms.l2.alpha={args.weight_decay}",
        "target.sampling_rate=100",
        f"target.train_images_per_class={args.train_per_class}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        "runtime.eval_every=0",
        "runtime.spectrum_batches=0",
        "runtime.checkpoint_every=0",
        "runtime.progress=log",
        f"results.dir={out / 'results'}",
    ]
    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir = out / f"project_head_x{head_lr_mult:g}"
    run_job(cfg, run_dir)
    return [json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text()) for s in seeds]


class Images(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def plain(seed: int, args) -> dict:
    """The plain loop: nothing from safetransfer but the generated images."""
    target = DemoTarget(train_images_per_class=args.train_per_class)
    train, test = target.train_set(), target.test_set()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = v2.Compose(
        [
            v2.Resize((36, 36), antialias=True),
            v2.RandomCrop(32),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    test_tf = v2.Compose(
        [
            v2.Resize(36, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=len(target.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    loader = DataLoader(
        Images(train.images, train.labels, train_tf),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    step = 0
    while step < args.iterations:
        for images, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            step += 1
            if step == args.iterations:
                break
    model.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in DataLoader(Images(test.images, test.labels, test_tf), batch_size=100):
            logits = model(images)
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    return {"seed": seed, "top1": 100.0 * correct / count, "test_loss": loss / count}


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--train-per-class", type=int, default=20, help="few images: accuracy away from 100 %%")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"),
        help="the section 'accuracy' of this file is replaced (--out '' prints only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        ours = project(args.seeds, args, Path(directory))
        # the project's default puts the new head at 10 x the lr: not the plain loop's set-up,
        # shown to size what that one difference does
        default_head = project(args.seeds, args, Path(directory), head_lr_mult=10)
    theirs = [plain(seed, args) for seed in args.seeds]
    lines = [
        f"{len(args.seeds)} seeds each, {args.iterations} iterations, batch {args.batch}, lr {args.lr} (all "
        f"layers), weight decay {args.weight_decay}, ResNet-18 from scratch, the demo's 6 generated classes at "
        f"32 px, {args.train_per_class} training images per class ({time.perf_counter() - start:.0f} s on "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).",
        f"Command: `python scripts/benchmark_accuracy.py {' '.join(sys.argv[1:])}`",
        "",
        "| loop | top-1 (%) | test loss | per seed top-1 |",
        "|---|---:|---:|---|",
    ]
    for name, runs in (
        ("safetransfer Fine-tuning", ours),
        ("plain PyTorch loop", theirs),
        ("safetransfer Fine-tuning, head lr x10 (its default)", default_head),
    ):
        top1 = [r["top1"] for r in runs]
        lines.append(
            f"| {name} | {spread(top1)} | {spread([r['test_loss'] for r in runs])} | "
            f"{', '.join(f'{v:.1f}' for v in top1)} |"
        )
    lines.append("")
    for label, runs in (("safetransfer - plain", ours), ("head x10 - plain", default_head)):
        for quantity in ("top1", "test_loss"):
            a, b = [r[quantity] for r in runs], [r[quantity] for r in theirs]
            t = stats.ttest_ind(a, b, equal_var=False)
            lines.append(
                f"- {label}, {quantity}: difference of means {np.mean(a) - np.mean(b):+.3f}, "
                f"Welch's t-test p = {t.pvalue:.2f}"
            )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        from benchmark import write_section  # scripts/benchmark.py, beside this file

        write_section(Path(args.out), "accuracy", text)


if __name__ == "__main__":
    main()
