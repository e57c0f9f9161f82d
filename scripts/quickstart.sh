#!/usr/bin/env bash
# Set-up, then the main job on the embedded default (SmolLM2-135M-Instruct warmed up on arith's
# answer format, task arith, CPU):
# split -> precompute-ref -> train -> eval-passk of the base model vs the trained one.
# Every step prints the command it runs (DRY_RUN=1: prints them only, after set-up). Extra
# arguments are Hydra overrides for every step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-runs/quickstart}
step() { echo "+ $(printf '%q ' "$@")"; if [ -z "${DRY_RUN:-}" ]; then "$@"; fi; }
step .venv/bin/dphrl split "hydra.run.dir=$RUN/split" "$@"
step .venv/bin/dphrl precompute-ref "hydra.run.dir=$RUN/precompute-ref" "$@"
step .venv/bin/dphrl train "hydra.run.dir=$RUN/train" "$@"
base=$(.venv/bin/dphrl train "$@" --cfg job --package model | sed -n 's/^path: //p')
step .venv/bin/dphrl eval-passk "hydra.run.dir=$RUN/eval" \
  "eval.models=[$base,$RUN/train/model]" task.limit=32 "$@"
echo "quickstart: done; pass@k of base vs trained is in $RUN/eval/passk.md"
