#!/usr/bin/env bash
# Reproduce one of the papers' tables as its paper made it (safetransfer-reproduce): per
# cell, a search on a validation split held out of the training images, the best setting
# trained on the whole training split with five seeds and scored on the test split; then
# results/<table>.md in the paper's layout, the published values and the chosen settings.
#
#   bash scripts/reproduce.sh dtnh_table2    # DTNH Table II:  ResNet-18 from ImageNet
#   bash scripts/reproduce.sh dtnh_table3    # DTNH Table III: ResNet-18 from Places365
#   bash scripts/reproduce.sh dtnh_table4    # DTNH Table IV:  ResNet-18 from Stanford Dogs
#   bash scripts/reproduce.sh bss_table2     # BSS Table 2:    ResNet-50 from ImageNet
#   bash scripts/reproduce.sh TABLE --plan   # every job of both stages and the projected GPU hours; trains nothing
#
# Further arguments go to both stages' safetransfer-train, e.g.
#   paths.data_root=/data launcher=slurm hydra.launcher.partition=gpu   # a SLURM cluster
#   launcher=gpus                                  # every GPU of this machine, one job on each
#   --dir multirun/mine                            # where both stages run (default multirun/TABLE)
# Rerunning the same command keeps every finished seed and trains only what is missing.
set -euo pipefail
# the commands: from the active environment, else from the Quick start's .venv beside this script
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tool() {
    if command -v "$1" >/dev/null 2>&1; then echo "$1"
    elif [[ -x "$root/.venv/bin/$1" ]]; then echo "$root/.venv/bin/$1"
    else
        echo "scripts/reproduce.sh: $1 not found: activate the environment safetransfer is installed in" \
             "(source .venv/bin/activate after the README's Quick start)" >&2
        exit 2
    fi
}
reproduce=$(tool safetransfer-reproduce)
tables="dtnh_table2 dtnh_table3 dtnh_table4 bss_table2"
table=${1:-}
if [[ " $tables " != *" $table "* || -z "$table" ]]; then
    echo "usage: bash scripts/reproduce.sh TABLE [--plan] [overrides...]; TABLE is one of: $tables" >&2
    exit 2
fi
shift
# safetransfer-reproduce does the whole table, Table IV's Stanford Dogs source included: this
# script is an alias for it that works without activating the environment
exec "$reproduce" "$table" "$@"
