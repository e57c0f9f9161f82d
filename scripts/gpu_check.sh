#!/usr/bin/env bash
# The GPU check for a lent device: one call of at most 8 minutes. World-size-1 FSDP2 with the
# hf engine (vLLM's GPU wheel cannot be carried there) and bfloat16 compute over float32
# masters, on SmolLM2-135M's architecture (random weights), 4 steps at lr 1e-6 with memory
# capped at 80 GB: step time, per-phase peak memory and the fraction of weights moved
# (benchmarks/gpu_step.py writes $OUT/gpu_step.json), then the `gpu`-marked tests.
#
#   bash scripts/gpu_check.sh --prepare   # here: the model's config and tokenizer into .device/
#   bash scripts/gpu_check.sh             # there (carry .device): the check
#   .venv/bin/python benchmarks/gpu_step.py --record <the json>   # here: into BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=.device/smollm2-135m
if [ "${1:-}" = "--prepare" ]; then
  .venv/bin/python - "$MODEL" <<'PY'
import shutil, sys
from pathlib import Path
from dphrl.embedded import resolve_model_path
src, dst = Path(resolve_model_path("embedded:smollm2-135m")), Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():  # config and tokenizer; the weights are drawn at random there
    if f.is_file() and f.suffix != ".safetensors":
        shutil.copy(f, dst / f.name)
PY
  echo "gpu_check: $MODEL ready; carry .device"
  exit 0
fi
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
DPHRL_GPU_CAP_GIB=80 timeout 330 torchrun --nproc_per_node 1 benchmarks/gpu_step.py "$MODEL" \
  "$OUT/gpu_step.json"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/
