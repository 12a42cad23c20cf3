#!/usr/bin/env bash
# Reproduce one of the papers' tables: the whole Hydra multirun of its preset, five seeds
# per cell; when it ends, results/<table>.md holds the table in the paper's layout with
# the published values beside each cell.
#
#   bash scripts/reproduce.sh dtnh_table2    # DTNH Table II:  ResNet-18 from ImageNet      (25 jobs)
#   bash scripts/reproduce.sh dtnh_table3    # DTNH Table III: ResNet-18 from Places365     (25 jobs)
#   bash scripts/reproduce.sh dtnh_table4    # DTNH Table IV:  ResNet-18 from Stanford Dogs (25 jobs)
#   bash scripts/reproduce.sh bss_table2     # BSS Table 2:    ResNet-50 from ImageNet     (120 jobs)
#
# Further arguments go to safetransfer-train, e.g.
#   paths.data_root=/data launcher=slurm hydra.launcher.partition=gpu   # a SLURM cluster
#   launcher=gpus                                  # every GPU of this machine, one job on each
#   hydra.sweep.dir=multirun/dtnh_table2           # a rerun into it keeps every finished seed
set -euo pipefail
tables="dtnh_table2 dtnh_table3 dtnh_table4 bss_table2"
table=${1:-}
if [[ " $tables " != *" $table "* || -z "$table" ]]; then
    echo "usage: bash scripts/reproduce.sh TABLE [overrides...]; TABLE is one of: $tables" >&2
    exit 2
fi
shift
if [[ $table == dtnh_table4 ]]; then
    # Table IV's source: ImageNet weights fine-tuned on all of Stanford Dogs (made once;
    # a rerun finds the finished seed in outputs/sources/ and keeps it)
    safetransfer-train experiment=pretrain_source target=stanford_dogs backbone=resnet18 \
        hydra.run.dir=outputs/sources/resnet18_stanford_dogs "$@"
fi
exec safetransfer-train "experiment=$table" "$@"
