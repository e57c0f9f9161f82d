#!/usr/bin/env bash
# Set-up, then the whole test suite (fast tier and the slow tests on the real model, vLLM and
# torchrun). Extra arguments go to pytest. Exit 5 ("no tests collected") counts as success.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit $?
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest "$@"
rc=$?
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
