#!/usr/bin/env bash
# Issue 27's GPU measurements on a lent GPU, in at most two device commands on one warm machine:
#   bash scripts/gpu_session.sh core    # install, tests/test_gpu.py, scripts/benchmark.py --device cuda (~8 min)
#   bash scripts/gpu_session.sh cells   # scripts/benchmark_cell.py (both cells), scripts/benchmark_devices.py
# with carry [".whl"] (made here by scripts/gpu_wheels.sh). Every log and figure goes under $OUT; each
# step has its own time box, so a slow one leaves the others their time. The machine runs its image's
# python3 (its torch, not .ci/constraints.txt's): the install adds only what the image lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-core}
OUT=${OUT:-/tmp/safetransfer-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SAFETRANSFER_CACHE=${SAFETRANSFER_CACHE:-/tmp/safetransfer-cache}

if ! python3 -c "import hydra, omegaconf, safetransfer" 2>/dev/null; then
    python3 -m pip install --quiet --no-index --find-links .whl hydra-core omegaconf antlr4-python3-runtime
    python3 -m pip install --quiet --no-deps --no-build-isolation -e .
fi
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
torch.cuda.get_device_name(0))" | tee "$OUT/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/machine.txt"

case "$part" in
core)
    timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -15
    timeout 330 python3 scripts/benchmark.py --device cuda --regularizers l2 l2sp knowdist l2_bss \
        --skip attention --out "$OUT/BENCHMARKS.md" --figures "$OUT/BENCHMARKS.json" 2>&1 \
        | tee "$OUT/benchmark.log" | tail -40
    ;;
cells)
    timeout 360 python3 scripts/benchmark_cell.py --probe 150 --json "$OUT/cells.json" \
        --out "$OUT/BENCHMARKS.md" --figures "$OUT/BENCHMARKS.json" 2>&1 | tee "$OUT/cells.log" | tail -30
    timeout 180 python3 scripts/benchmark_devices.py --seeds 0 1 2 --iterations 120 --out "$OUT/BENCHMARKS.md" 2>&1 \
        | tee "$OUT/devices.log" | tail -20
    ;;
*)
    echo "gpu_session.sh: the part is core or cells, not $part" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
