#!/usr/bin/env bash
# A Hydra multirun sweep over divergences and seeds: one job folder each under $OUT.
# DRY_RUN=1 prints the command only.
# Default: the embedded model and task on this machine (a few minutes per job); pass overrides to
# aim it elsewhere, e.g. `bash scripts/sweep_divergences.sh +experiment=paper_bird layout=gpu1 task.path=...`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-multirun/sweep_divergences}
DIVERGENCES=${DIVERGENCES:-forward_kl,js,alpha,reverse_kl,none}
SEEDS=${SEEDS:-0,1,2}
cmd=(.venv/bin/dphrl train --multirun "divergence=$DIVERGENCES" "seed=$SEEDS" "hydra.sweep.dir=$OUT" "$@")
echo "+ $(printf '%q ' "${cmd[@]}")"
if [ -z "${DRY_RUN:-}" ]; then "${cmd[@]}"; fi
