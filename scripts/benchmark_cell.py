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
every 50 iterations (angles every 100, as a cell's defaults log them): the time per
iteration is the slope after the first row (which holds cuDNN's autotuning and the
workers' start); the projection to the cell's length adds
(length - probe) x slope per seed one after another, or once for concurrent seeds (their
slope is measured while all five share the GPU). The decoded-image cache is built once
before any timing, as a real run's first job builds it once for every later one.
Written to BENCHMARKS.md, section cuda-cell (or cpu-cell), and the cell-seconds per
iteration to BENCHMARKS.json, which `safetransfer-reproduce --plan` reads.
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
from benchmark import FIGURES, machine, write_figures, write_photos, write_section  # noqa: E402

SEEDS = 5
CELLS = {
    "dtnh": dict(iterations=8000, overrides=["backbone=resnet18", "regularizer=l2sp", "direction=dtnh"], drop=6000),
    "bss": dict(
        iterations=9000,
        overrides=[
            "backbone=resnet50",
            "regularizer=l2_bss",
            "direction=sum",
            "data.train_crop=random_resized_crop",
            "data.test_crops=10",
        ],
        drop=6000,
    ),
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
        return [
            f"train.precision={self.precision}",
            f"runtime.concurrent_seeds={self.concurrent}",
            f"runtime.compile={self.compiled}",
        ]


def job(cell: str, variant: Variant, iterations: int, root: Path, out: Path, args, seeds: int = SEEDS) -> dict:
    """Run one job in a fresh process; its wall time and each seed's time per iteration."""
    mode = ("c" if variant.concurrent else "s") + ("-compiled" if variant.compiled else "")
    run_dir = out / f"{cell}-{variant.precision}-{mode}-{iterations}"
    arguments = [
        *CELLS[cell]["overrides"],
        *variant.overrides,
        "source=scratch",
        "target=imagefolder",
        f"target.root={root}",
        "train.batch_size=48",
        f"train.iterations={iterations}",
        f"optim.scheduler.milestones=[{min(CELLS[cell]['drop'], iterations)}]",  # the lr drop costs nothing
        f"seeds=[{','.join(map(str, range(seeds)))}]",
        f"runtime.device={args.device}",
        f"runtime.num_workers={args.workers}",
        f"runtime.log_every={args.log_every}",
        f"runtime.diagnostics_every={2 * args.log_every}",
        "runtime.progress=log",
        f"paths.cache_dir={root / 'cache'}",
        f"results.dir={run_dir / 'results'}",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "safetransfer.commands.train", *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cell} {variant.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    slopes = []
    for seed in range(seeds):
        with open(run_dir / f"seed_{seed}" / "log.csv", newline="") as handle:
            rows = [(int(r["iteration"]), float(r["elapsed_s"])) for r in csv.DictReader(handle)]
        (i0, t0), (i1, t1) = rows[0], rows[-1]
        slopes.append((t1 - t0) / (i1 - i0) if i1 > i0 else t1 / i1)  # one row: the mean, warm-up included
    return {"wall_s": wall, "ms_per_iteration": [1000 * s for s in slopes], "iterations": iterations, "seeds": seeds}


def projected(result: dict, variant: Variant, length: int) -> float:
    """The job's wall time at `length` iterations per seed, from the probe's."""
    more = length - result["iterations"]
    slopes = np.array(result["ms_per_iteration"]) / 1000
    return result["wall_s"] + more * (slopes.max() if variant.concurrent else slopes.sum())


def parse_variant(text: str) -> Variant:
    """'bf16:s' (seeds one after another), 'fp32:c' (concurrent), 'bf16:c:compiled'."""
    precision, mode, *rest = text.split(":")
    return Variant(precision, mode == "c", rest == ["compiled"])


def record(cell: str, variant: Variant, result: dict, full: bool = False) -> dict:
    length = CELLS[cell]["iterations"]
    return {
        "cell": cell,
        "variant": variant.name,
        "precision": variant.precision,
        "concurrent": variant.concurrent,
        "compiled": variant.compiled,
        **result,
        "length": length,
        "full": full,
        "projected_s": result["wall_s"] if full else projected(result, variant, length),
    }


def report(records: list[dict], header: list[str]) -> str:
    lines = [
        *header,
        "",
        "| cell | variant | iterations per seed (run) | job wall time (s) | ms per iteration (per seed) "
        "| projected 5-seed cell (min) |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in records:
        label = {"dtnh": "DTNH: ResNet-18, DTNH (L2-SP), 8,000 it", "bss": "BSS: ResNet-50, L2+BSS, 9,000 it"}[
            r["cell"]
        ]
        slopes = ", ".join(f"{s:.1f}" for s in r["ms_per_iteration"])
        projection = f"{r['projected_s'] / 60:.1f}" + (" (measured, full length)" if r.get("full") else "")
        lines.append(f"| {label} | {r['variant']} | {r['iterations']} | {r['wall_s']:.0f} | {slopes} | {projection} |")
    lines += [
        "",
        "Fastest per cell and way of running the seeds (projected; cell-seconds per iteration = projected "
        "wall time / (seeds x length), which `safetransfer-reproduce --plan` reads):",
        "",
    ]
    for cell in CELLS:
        for concurrent, mode in ((False, "seeds one after another"), (True, "concurrent seeds")):
            mine = [r for r in records if r["cell"] == cell and not r.get("full") and r["concurrent"] == concurrent]
            if mine:
                best = min(mine, key=lambda r: r["projected_s"])
                fastest = best["precision"] + (", compiled" if best["compiled"] else "")
                lines.append(
                    f"- {cell}, {mode}: fastest {fastest}: {best['projected_s'] / 60:.1f} min; "
                    f"cell-seconds per iteration {best['projected_s'] / (SEEDS * best['length']):.4f}"
                )
    return "\n".join(lines) + "\n"


def cell_figures(records: list[dict]) -> dict:
    """What the plan reads of the cells: per cell and way of running the seeds, the fastest
    variant's projected wall time per seed and iteration (cell-seconds per iteration), and the
    precision that variant trained in."""
    figures, precisions = {}, {}
    for cell in CELLS:
        for concurrent in (False, True):
            mine = [r for r in records if r["cell"] == cell and not r.get("full") and r["concurrent"] == concurrent]
            if mine:
                best = min(mine, key=lambda r: r["projected_s"])
                mode = "concurrent" if concurrent else "sequential"
                figures.setdefault(cell, {})[mode] = round(best["projected_s"] / (SEEDS * best["length"]), 5)
                precisions.setdefault(cell, {})[mode] = best.get("precision", "bf16")
    return {"seconds_per_iteration": figures, "precision": precisions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--probe", type=int, default=200, help="iterations per seed of each variant's job")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["bf16:s", "bf16:c", "fp32:s", "fp32:c"],
        help="precision:s (seeds one after another) or precision:c (concurrent), :compiled to compile",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also the fastest eager variant with runtime.compile=true"
    )
    parser.add_argument("--full", action="store_true", help="also each cell at its full length, fastest variant")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=50, help="log.csv rows (angles every second row)")
    parser.add_argument("--size", type=int, default=224, help="the crop (resize: 8/7 of it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    parser.add_argument("--figures", type=Path, default=FIGURES, help="the plan's figures (JSON)")
    parser.add_argument("--json", type=Path, help="write every measurement here as it is made")
    parser.add_argument(
        "--report",
        nargs="*",
        type=Path,
        help="only write the section from these --json files "
        "(runs split over several sessions), the first one's machine",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    data = (
        f"Data: generated photos (500x375 JPEG), {args.classes} classes x {args.train_per_class} training and "
        f"{args.test_per_class} test images, decoded once into the cache before timing; crop {args.size} px, "
        f"batch 48, {SEEDS} seeds, {args.workers} loader workers per process."
    )
    command = "python scripts/benchmark_cell.py " + " ".join(sys.argv[1:])
    if args.report:  # the machine and command of each file; the data settings are the defaults above
        files = [json.loads(path.read_text()) for path in args.report]
        header = [files[0]["machine"], data, *(f"Command: `{f['command']}`" for f in files)]
        text = report([r for f in files for r in f["records"]], header)
        print(text)
        kind = "cuda-cell" if "NVIDIA" in files[0]["machine"] else "cpu-cell"
        write_section(args.out, kind, text, "One paper cell, end to end (CUDA)")
        write_figures(args.figures, kind, cell_figures([r for f in files for r in f["records"]]))
        return
    header = [f"Machine: {machine(device)}.", data, f"Command: `{command}`"]

    records = []

    def keep(entry: dict) -> None:
        records.append(entry)
        print(entry, flush=True)
        if args.json:
            args.json.write_text(json.dumps({"machine": header[0], "command": command, "records": records}, indent=1))

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
            variants = [parse_variant(v) for v in args.variants]
            for variant in variants:
                keep(record(cell, variant, job(cell, variant, args.probe, root, Path(folder) / "runs", args)))
            mine = [r for r in records if r["cell"] == cell]
            fastest = min(variants, key=lambda v: next(r["projected_s"] for r in mine if r["variant"] == v.name))
            if args.compile:
                variant = Variant(fastest.precision, fastest.concurrent, compiled=True)
                keep(record(cell, variant, job(cell, variant, args.probe, root, Path(folder) / "runs", args)))
            if args.full:
                length = CELLS[cell]["iterations"]
                keep(record(cell, fastest, job(cell, fastest, length, root, Path(folder) / "full", args), full=True))

    text = report(records, header)
    print(text)
    write_section(args.out, f"{device.type}-cell", text, f"One paper cell, end to end ({device.type.upper()})")
    write_figures(args.figures, f"{device.type}-cell", cell_figures(records))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
