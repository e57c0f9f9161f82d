#!/usr/bin/env bash
# The paper's BIRD runs on one 8-GPU node, each method with its preset (docs/PAPER.md lists
# every official setting and its dphrl value): split and precompute-ref once, then one training
# run per method -- DPH-RL with JS / forward KL / alpha, and the baselines GRPO, GRPO + reverse
# KL, DAPO as the paper ran it -- then pass@k of every model on BIRD dev (in-domain) and Spider
# dev (out-of-domain). Needs BIRD=<folder with train/ and dev/> and SPIDER=<spider folder>.
# Every stage runs on all $GPUS GPUs under torchrun: split, precompute-ref and eval-passk
# data-parallel (each rank samples its share of the chunks with its own vLLM engine, rank 0
# writes), training with FSDP2. Prints every command (shell-quoted, ready to paste) before it
# runs; DRY_RUN=1 only prints them.
set -euo pipefail
: "${BIRD:?set BIRD to the BIRD folder (train/train.json, train/train_databases, dev/...)}"
: "${SPIDER:?set SPIDER to the Spider folder (dev.json, database/)}"
OUT=${OUT:-runs/paper_bird}
GPUS=${GPUS:-8}
RUN=(torchrun --nproc_per_node "$GPUS" -m dphrl)
DATA=(task.path="$BIRD/train/train.json" task.db_root="$BIRD/train/train_databases"
      task.eval_path="$BIRD/dev/dev.json" split.out="$OUT/split" ref.out="$OUT/ref")
step() { echo "+ $(printf '%q ' "$@")"; if [ -z "${DRY_RUN:-}" ]; then "$@"; fi; }

echo "split, precompute-ref: $GPUS GPUs, data parallel"
step "${RUN[@]}" split +experiment=paper_bird "${DATA[@]}" "hydra.run.dir=$OUT/logs/split"
step "${RUN[@]}" precompute-ref +experiment=paper_bird "${DATA[@]}" "hydra.run.dir=$OUT/logs/ref"
# method name -> the overrides next to the preset (the table at the top of docs/PAPER.md)
methods=(
  "dph_js:divergence=js"
  "dph_forward_kl:divergence=forward_kl"
  "dph_alpha:divergence=alpha"
  "grpo:divergence=none"
  "grpo_reverse_kl:divergence=reverse_kl"
  "dapo:divergence=reverse_kl algo=dapo"
)
models=()
echo "train: $GPUS GPUs, FSDP2, one vLLM engine per GPU"
for entry in "${methods[@]}"; do
  name=${entry%%:*}
  read -ra overrides <<< "${entry#*:}"
  step "${RUN[@]}" train +experiment=paper_bird "${overrides[@]}" \
    "${DATA[@]}" "hydra.run.dir=$OUT/$name"
  models+=("$OUT/$name/model")
done
list=$(IFS=,; echo "${models[*]}")
# Each dataset entry is quoted (Hydra reads `name=file` in a list only as a string), and each
# SQL set takes its own databases (`++` adds keys to the empty eval.db_roots): BIRD dev's are
# not BIRD train's, Spider's are its own.
echo "eval-passk: $GPUS GPUs, data parallel, one model after another"
step "${RUN[@]}" eval-passk +experiment=paper_bird "${DATA[@]}" \
  "eval.models=[meta-llama/Llama-3.1-8B-Instruct,$list]" \
  "eval.datasets=['bird=$BIRD/dev/dev.json','spider=$SPIDER/dev.json']" \
  "++eval.db_roots={bird:'$BIRD/dev/dev_databases',spider:'$SPIDER/database'}" \
  "hydra.run.dir=$OUT/eval"
