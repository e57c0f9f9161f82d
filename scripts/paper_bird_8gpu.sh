#!/usr/bin/env bash
# The paper's BIRD runs on one 8-GPU node: split and precompute-ref once, then one training
# run per divergence (DPH-RL with forward KL / JS / alpha, and the baselines GRPO, GRPO + reverse
# KL, DAPO), then pass@k of every checkpoint on BIRD dev (in-domain) and Spider dev (out-of-domain).
# Needs BIRD=<folder with train/ and dev/> and SPIDER=<spider folder>. Prints every command it runs.
set -euo pipefail
: "${BIRD:?set BIRD to the BIRD folder (train/train.json, train/train_databases, dev/...)}"
: "${SPIDER:?set SPIDER to the Spider folder (dev.json, database/)}"
OUT=${OUT:-runs/paper_bird}
DATA=(task.path="$BIRD/train/train.json" task.db_root="$BIRD/train/train_databases"
      task.eval_path="$BIRD/dev/dev.json" split.out="$OUT/split" ref.out="$OUT/ref")
step() { echo "+ $*"; "$@"; }

step dphrl split +experiment=paper_bird layout=gpu1 "${DATA[@]}" "hydra.run.dir=$OUT/logs/split"
step dphrl precompute-ref +experiment=paper_bird layout=gpu1 "${DATA[@]}" "hydra.run.dir=$OUT/logs/ref"
models=()
for run in "divergence=forward_kl divergence.beta=0.01" "divergence=js divergence.beta=0.1" \
           "divergence=alpha divergence.beta=0.05" "divergence=none" \
           "divergence=reverse_kl divergence.beta=0.01" "divergence=none algo=dapo"; do
  name=$(echo "$run" | tr ' =' '_-')
  # shellcheck disable=SC2086
  step torchrun --nproc_per_node 8 -m dphrl train +experiment=paper_bird $run "${DATA[@]}" \
    "hydra.run.dir=$OUT/$name"
  models+=("$OUT/$name/model")
done
list=$(IFS=,; echo "${models[*]}")
step dphrl eval-passk +experiment=paper_bird layout=gpu1 "eval.models=[meta-llama/Llama-3.1-8B-Instruct,$list]" \
  "eval.datasets=[bird=$BIRD/dev/dev.json,spider=$SPIDER/dev.json]" "hydra.run.dir=$OUT/eval"
