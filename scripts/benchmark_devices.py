"""Accuracy parity across devices and precisions: the same short jobs (the demo's target and
source, --iterations per seed) on the CPU in fp32, on CUDA in fp32 and on CUDA in bf16, with
the same seeds, so the same sampled images, initial head and data order. Each pair of runs is
compared seed by seed: the mean paired difference of top-1 with its 95 % t interval.

    python scripts/benchmark_devices.py                      # needs CUDA; writes BENCHMARKS.md, section devices

Augmentation runs on the loader workers on both devices (data.augment_on=workers), so that
the two devices see the same crops and mirrors; what differs is the arithmetic: CPU kernels
against cuDNN's (which, by PyTorch's default, computes fp32 convolutions in TF32 on
Ampere and later), and bf16 autocast against fp32. Tolerances, fixed before measuring:
CUDA fp32 against the CPU "within noise" (the interval holds zero); bf16 against fp32 within
2 points of top-1 (the interval inside [-2, 2]).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from scipy import stats

from safetransfer.job.run import run_job

VARIANTS = [("cuda", "fp32"), ("cuda", "bf16"), ("cpu", "fp32")]  # CUDA first: it pretrains the demo source, once
PAIRS = [
    (("cpu", "fp32"), ("cuda", "fp32"), "CUDA fp32 - CPU fp32", None),
    (("cuda", "fp32"), ("cuda", "bf16"), "CUDA bf16 - CUDA fp32", 2.0),
]


def run(method: str, device: str, precision: str, args, out: Path) -> list[dict]:
    overrides = [
        "experiment=demo",
        f"method={method}",
        f"seeds=[{','.join(map(str, args.seeds))}]",
        f"train.iterations={args.iterations}",
        f"optim.scheduler.milestones=[{args.iterations * 3 // 4}]",
        f"runtime.device={device}",
        f"train.precision={precision}",
        "data.augment_on=workers",
        "runtime.eval_every=0",
        "runtime.checkpoint_every=0",
        "runtime.progress=log",
        f"results.dir={out / 'results'}",
    ]
    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir = out / f"{method}-{device}-{precision}"
    run_job(cfg, run_dir)
    return [json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text()) for s in args.seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["fine_tuning", "dtnh_l2sp"])
    parser.add_argument("--seeds", nargs="*", type=int, default=list(range(10)))
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmark_devices.py needs a CUDA GPU (it compares CUDA with the CPU)")

    lines = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}.",
        f"Jobs: the demo's target and source, {args.iterations} iterations, seeds {args.seeds}; "
        "augmentation on the loader workers for every variant.",
        "Command: `python scripts/benchmark_devices.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| method | device, precision | top-1 (mean ± std) | test loss (mean ± std) |",
        "|---|---|---:|---:|",
    ]
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            runs = {variant: run(method, *variant, args, Path(folder)) for variant in VARIANTS}
            for (device, precision), metrics in runs.items():
                top1, loss = [m["top1"] for m in metrics], [m["test_loss"] for m in metrics]
                lines.append(
                    f"| {method} | {device}, {precision} | {statistics.mean(top1):.2f} ± "
                    f"{statistics.stdev(top1):.2f} | {statistics.mean(loss):.4f} ± {statistics.stdev(loss):.4f} |"
                )
            for a, b, what, tolerance in PAIRS:
                diff = [y["top1"] - x["top1"] for x, y in zip(runs[a], runs[b])]
                mean, sem = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
                half = stats.t.ppf(0.975, len(diff) - 1) * sem
                low, high = mean - half, mean + half
                verdict = (
                    ("within noise (the interval holds 0)" if low <= 0 <= high else "a difference")
                    if tolerance is None
                    else (
                        f"within ±{tolerance:g} points"
                        if -tolerance <= low and high <= tolerance
                        else f"outside ±{tolerance:g} points"
                    )
                )
                summary.append(
                    f"- {method}: {what}: {mean:+.2f} points top-1, 95 % interval [{low:+.2f}, {high:+.2f}] "
                    f"over {len(diff)} paired seeds: {verdict}"
                )
    text = "\n".join(lines + ["", "Paired differences (same seeds):", ""] + summary) + "\n"
    print(text)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark import write_section

    write_section(Path(args.out), "devices", text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
