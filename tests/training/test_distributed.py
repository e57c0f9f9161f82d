"""torchrun --nproc_per_node 2 over gloo gives the losses and the Adam updates of one process
on the same global batch."""

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

COMMON = [
    "task.name=coin",
    "engine=hf",
    "layout=cpu",
    "model.max_new_tokens=10",
    "algo.group_size=4",
    "algo.prompts_per_step=4",
    "split.k=2",
    "ref.keep=all",
    "trainer.ref_batch_size=4",
    "algo.minibatch_size=8",  # 16 rollouts a step over all ranks: 2 Adam updates on 1 or 2
    "trainer.max_steps=2",
    "trainer.lr=1e-2",
    "trainer.tensorboard=false",
    "task.limit=12",
    "divergence=js",
    "eval.every=1",  # every rank evaluates its share of the held-out prompts
    "eval.limit=8",
]


def _train(nproc: int, run: Path, data: Path, model: str, *extra: str) -> list[dict]:
    args = [
        *COMMON,
        f"model.path={model}",
        f"split.out={data}/split",
        f"ref.out={data}/ref",
        f"hydra.run.dir={run}",
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
    }
    if nproc == 1:
        cmd = [sys.executable, str(HELPERS / "run_train.py"), *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        cmd = [
            torchrun,
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            "29533",
            str(HELPERS / "run_train.py"),
            *args,
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[dict]]:
    """The reference: one process on the global batch (it also makes the split and ref store)."""
    tmp = tmp_path_factory.mktemp("one")
    return tmp / "data", _train(1, tmp / "run", tmp / "data", tiny_model_dir)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp-style", "fsdp2"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, one_process, fsdp):
    data, one = one_process
    two = _train(2, tmp_path / "two", data, tiny_model_dir, f"layout.fsdp={str(fsdp).lower()}")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["adam_updates"] == b["adam_updates"] == 2
        for key in ("reward_mean", "pg_loss", "div_loss", "kl_ref", "grad_norm", "eval_pass@1",
                    "eval_greedy"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    assert (tmp_path / "two" / "model" / "config.json").exists()
