#!/usr/bin/env bash
# Set-up, then the main job on the embedded default (SmolLM2-135M-Instruct warmed up on arith's
# answer format, task arith, CPU):
# split -> precompute-ref -> train -> eval-passk of the base model vs the trained one, on the
# held-out prompts and on the split's D_pef prompts (the ones the base model already solved).
# Every step prints the command it runs (DRY_RUN=1: prints them only, after set-up). Extra
# arguments are Hydra overrides for every step. The last line says what the eval shows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-runs/quickstart}
step() { echo "+ $(printf '%q ' "$@")"; if [ -z "${DRY_RUN:-}" ]; then "$@"; fi; }
# what the composed config says, as `dphrl train --cfg job` prints it: $1 = package, $2 = key
setting() { .venv/bin/dphrl train "${@:3}" --cfg job --package "$1" | sed -n "s/^$2: //p"; }
step .venv/bin/dphrl split "hydra.run.dir=$RUN/split" "$@"
step .venv/bin/dphrl precompute-ref "hydra.run.dir=$RUN/precompute-ref" "$@"
step .venv/bin/dphrl train "hydra.run.dir=$RUN/train" "$@"
base=$(setting model path "$@")
pef="$(setting split out "$@")/pef.jsonl"
step .venv/bin/dphrl eval-passk "hydra.run.dir=$RUN/eval" \
  "eval.models=[$base,$RUN/train/model]" "eval.datasets=[arith,'arith=$pef']" task.limit=32 \
  eval.n=8 "eval.k=[1,2,4,8]" "$@"
echo "quickstart: done; pass@k of base vs trained is in $RUN/eval/passk.md"
[ -n "${DRY_RUN:-}" ] || .venv/bin/python - "$RUN/eval" "$base" "$RUN/train/model" \
  "$(setting trainer max_steps "$@")" "$(setting divergence name "$@")" <<'PY'
import sys

from dphrl.report import before_after, read_passk

folder, base, trained, steps, divergence = sys.argv[1:]
change = before_after(read_passk(folder), base, trained, ("held-out", "D_pef"))
print(f"quickstart: {steps} steps of RL (divergence={divergence}), base -> trained: {change}.")
print("A smoke run: a few points either way are sampling noise at this size; RESULTS.md has")
print("the comparison of the methods at a size where RL learns.")
PY
