"""DAPO dynamic sampling under torchrun: ranks that find informative groups at different rates
must still run the same refill rounds (their prompt samplers stay in step) and keep the same
number of rollouts (the same minibatches, so FSDP's collectives match)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # the drivers run by path, and toytask


def test_ranks_agree_on_refill_rounds_and_counts(tmp_path):
    out = tmp_path / "ranks.json"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    driver = HELPERS / "run_refill.py"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29541", str(driver)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0 == rank1  # same sampler position and rollout count after each step
    # Rank 1 (one prompt in three informative) needed refills, so rank 0 ran them too, and
    # rank 0 kept only as many groups as rank 1 found.
    assert rank0[0]["sampler"]["offset"] > 4
    assert all(step["rollouts"] % 2 == 0 and step["rollouts"] > 0 for step in rank0)
