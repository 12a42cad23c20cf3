#!/usr/bin/env bash
# Here, where the package index is reachable: the wheels the GPU machine's image lacks (it has
# torch, torchvision, numpy, pandas, scipy, matplotlib, pillow, filelock, tqdm, tabulate, pytest,
# hypothesis; see the device tool's KINDS.md), built into .whl/ (ignored by git) at the versions
# of this environment. A device run then names .whl in `carry` and starts with
# `bash scripts/gpu_session.sh` (issue 27's measurements).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
pins=$("$python" -m pip freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime)==')
[ "$(echo "$pins" | wc -l)" -eq 3 ] || { echo "gpu_wheels.sh: $python lacks hydra-core, omegaconf or antlr4" >&2; exit 2; }
rm -rf .whl
mkdir .whl
# pip wheel: antlr4's runtime is published as a source archive; its wheel (pure Python) is built here
"$python" -m pip wheel --quiet --no-deps -w .whl $pins
ls .whl
