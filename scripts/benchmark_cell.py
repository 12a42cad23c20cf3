"""One paper cell at full size, end to end through `safetransfer-train` on generated 224 px
photos (no download): five seeds, wall time, in bf16 and fp32, the seeds one after another
against `runtime.concurrent_seeds=true`, and `runtime.compile=true` against eager.

    python scripts/benchmark_cell.py                      # every variant of both cells, --probe iterations each
    python scripts/benchmark_cell.py --cells dtnh --full  # also the DTNH cell at its full length (fastest variant)

The cells (what one cell of each paper's table costs; the data is generated, so top-1 means nothing):
  dtnh: ResNet-18, DTNH (L2-SP), batch 48, 8,000 iterations, random crop, 1 test crop
  bss:  ResNet-50, L2+BSS, batch 48, 9,000 iterations, random resized crop, 10 test crops
Each variant runs the whole job (process start, source, data, every seed, evaluation,
spectrum, table) for --probe iterations per seed. Each seed's log.csv gives its elapsed time
every 50 iterations (angles every 100, as a cell's defaults log them): the time per iteration is the slope after the first row (which holds
cuDNN's autotuning and the workers' start); the projection to the cell's length adds
(length - probe) x slope per seed one after another, or once for concurrent seeds (their
slope is measured while all five share the GPU). The decoded-image cache is built once
before any timing, as a real run's first job builds it once for every later one.
Written to BENCHMARKS.md, section cuda-cell (or cpu-cell), which `safetransfer-reproduce
--plan` reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import machine, write_photos, write_section  # noqa: E402

SEEDS = 5
CELLS = {
    "dtnh": dict(iterations=8000, overrides=["backbone=resnet18", "regularizer=l2sp", "direction=dtnh"],
                 drop=6000),
    "bss": dict(iterations=9000, overrides=["backbone=resnet50", "regularizer=l2_bss", "direction=sum",
                                             "data.train_crop=random_resized_crop",
                                             "data.test_crops=10"], drop=6000),
}


@dataclass
class Variant:
    precision: str
    concurrent: bool
    compiled: bool = False

    @property
    def name(self) -> str:
        mode = "concurrent seeds" if self.concurrent else "seeds one after another"
        return f"{self.precision}, {mode}" + (", compiled" if self.compiled else "")

    @property
    def overrides(self) -> list[str]:
        return [f"train.precision={self.precision}", f"runtime.concurrent_seeds={self.concurrent}",
                f"runtime.compile={self.compiled}"]


def job(cell: str, variant: Variant, iterations: int, root: Path, out: Path, args, seeds: int = SEEDS) -> dict:
    """Run one job in a fresh process; its wall time and each seed's time per iteration."""
    run_dir = out / f"{cell}-{variant.precision}-{'c' if variant.concurrent else 's'}{'-compiled' if variant.compiled else ''}-{iterations}"
    arguments = [*CELLS[cell]["overrides"], *variant.overrides, "source=scratch", "target=imagefolder",
                 f"target.root={root}", "train.batch_size=48", f"train.iterations={iterations}",
                 f"optim.scheduler.milestones=[{min(CELLS[cell]['drop'], iterations)}]",  # the lr drop costs nothing
                 f"seeds=[{','.join(map(str, range(seeds)))}]", f"runtime.device={args.device}",
                 f"runtime.num_workers={args.workers}", f"runtime.log_every={args.log_every}",
                 f"runtime.diagnostics_every={2 * args.log_every}",
                 "runtime.progress=log", f"paths.cache_dir={root / 'cache'}", f"results.dir={run_dir / 'results'}",
                 f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "safetransfer.train", *arguments], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cell} {variant.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    slopes = []
    for seed in range(seeds):
        with open(run_dir / f"seed_{seed}" / "log.csv", newline="") as handle:
            rows = [(int(r["iteration"]), float(r["elapsed_s"])) for r in csv.DictReader(handle)]
        (i0, t0), (i1, t1) = rows[0], rows[-1]
        slopes.append((t1 - t0) / (i1 - i0) if i1 > i0 else t1 / i1)  # one row: the mean, warm-up included
    return {"wall_s": wall, "ms_per_iteration": [1000 * s for s in slopes], "iterations": iterations,
            "seeds": seeds}


def projected(result: dict, variant: Variant, length: int) -> float:
    """The job's wall time at `length` iterations per seed, from the probe's."""
    more = length - result["iterations"]
    slopes = np.array(result["ms_per_iteration"]) / 1000
    return result["wall_s"] + more * (slopes.max() if variant.concurrent else slopes.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--probe", type=int, default=200, help="iterations per seed of each variant's job")
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp32"])
    parser.add_argument("--compile", action="store_true", help="also the fastest eager variant with runtime.compile=true")
    parser.add_argument("--full", action="store_true", help="also each cell at its full length, fastest variant")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=50, help="log.csv rows (angles every second row)")
    parser.add_argument("--size", type=int, default=224, help="the crop (resize: 8/7 of it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    device = torch.device(args.device)

    lines, records = [], []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "photos"
        per_class = args.train_per_class + args.test_per_class
        write_photos(root, args.classes * per_class, args.classes, test_every=per_class // args.test_per_class)
        if args.size != 224:
            for cell in CELLS.values():
                cell["overrides"] = [*cell["overrides"], f"data.crop={args.size}", f"data.resize={args.size * 8 // 7}"]
        for cell in args.cells:
            start = time.perf_counter()  # the decoded-image cache, once (a real sweep's first job builds it)
            job(cell, Variant("fp32", False), 1, root, Path(folder) / "warm", args, seeds=1)
            print(f"{cell}: cache and first start {time.perf_counter() - start:.0f} s", flush=True)
            length = CELLS[cell]["iterations"]
            variants = [Variant(p, c) for p in args.precisions for c in (False, True)]
            results = {}
            for variant in variants:
                results[variant.name] = job(cell, variant, args.probe, root, Path(folder) / "runs", args)
                print(f"{cell} {variant.name}: {results[variant.name]}", flush=True)
            fastest = min(variants, key=lambda v: projected(results[v.name], v, length))
            if args.compile:
                variant = Variant(fastest.precision, fastest.concurrent, compiled=True)
                variants.append(variant)
                results[variant.name] = job(cell, variant, args.probe, root, Path(folder) / "runs", args)
                print(f"{cell} {variant.name}: {results[variant.name]}", flush=True)
            for variant in variants:
                r = results[variant.name]
                records.append({"cell": cell, "variant": variant.name, "precision": variant.precision,
                                "concurrent": variant.concurrent, "compiled": variant.compiled, **r,
                                "projected_s": projected(r, variant, length), "length": length})
            if args.full:
                r = job(cell, fastest, length, root, Path(folder) / "full", args)
                print(f"{cell} full length, {fastest.name}: {r}", flush=True)
                records.append({"cell": cell, "variant": fastest.name, "precision": fastest.precision,
                                "concurrent": fastest.concurrent, "compiled": False, **r, "projected_s": r["wall_s"],
                                "length": length, "full": True})

    lines = [f"Machine: {machine(device)}.",
             f"Data: generated photos (500x375 JPEG), {args.classes} classes x {args.train_per_class} training and "
             f"{args.test_per_class} test images, decoded once into the cache before timing; crop {args.size} px, "
             f"batch 48, {SEEDS} seeds, {args.workers} loader workers per process.",
             "Command: `python scripts/benchmark_cell.py " + " ".join(sys.argv[1:]) + "`", "",
             "| cell | variant | iterations per seed (run) | job wall time (s) | ms per iteration (per seed) "
             "| projected 5-seed cell (min) |", "|---|---|---:|---:|---|---:|"]
    for r in records:
        label = {"dtnh": "DTNH: ResNet-18, DTNH (L2-SP), 8,000 it", "bss": "BSS: ResNet-50, L2+BSS, 9,000 it"}[r["cell"]]
        slopes = ", ".join(f"{s:.1f}" for s in r["ms_per_iteration"])
        projection = f"{r['projected_s'] / 60:.1f}" + (" (measured, full length)" if r.get("full") else "")
        lines.append(f"| {label} | {r['variant']} | {r['iterations']} | {r['wall_s']:.0f} | {slopes} | {projection} |")
    lines += ["", "Fastest per cell (projected; cell-seconds per iteration = projected wall / (seeds x length), "
                  "which `safetransfer-reproduce --plan` reads):", ""]
    for cell in args.cells:
        mine = [r for r in records if r["cell"] == cell and not r.get("full")]
        best = min(mine, key=lambda r: r["projected_s"])
        lines.append(f"- {cell}: {best['variant']}: {best['projected_s'] / 60:.1f} min; "
                     f"cell-seconds per iteration {best['projected_s'] / (SEEDS * best['length']):.4f}")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, f"{device.type}-cell", text)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
