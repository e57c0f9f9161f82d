"""One Hydra sweep trains every objective against every divergence (issue 14): the comparison a
researcher runs, at tiny sizes, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_multirun_over_objectives_and_divergences_trains_each(tiny_model_dir, tmp_path):
    tiny = [
        "engine=hf",
        f"model.path={tiny_model_dir}",
        "model.max_new_tokens=6",
        "task.limit=4",
        "algo.group_size=2",
        "algo.prompts_per_step=2",
        "split.k=2",
        "trainer.max_steps=1",
        "trainer.ref_batch_size=2",
        "trainer.tensorboard=false",
        f"split.out={tmp_path}/split",
        f"ref.out={tmp_path}/ref",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra.sweep.subdir=${hydra.job.num}",  # the default names a folder by the overrides
    ]
    out = subprocess.run(
        [sys.executable, "-m", "dphrl", "train", "--multirun"]
        + ["algo=grpo,gspo,dr_grpo", "divergence=none,js", *tiny],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "100"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    seen = set()
    for job in jobs:
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        seen.add((cfg["algo"]["name"], cfg["divergence"]["name"]))
        metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1
        assert "mismatch_abs_mean" in metrics[0] and "rc_weight_mean" in metrics[0]
        assert (job / "model" / "model.safetensors").exists()
    assert seen == {(a, d) for a in ("grpo", "gspo", "dr_grpo") for d in ("none", "js")}
