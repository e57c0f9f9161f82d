"""One Hydra sweep trains every objective against every divergence: the comparison a researcher
runs, at tiny sizes, through the real CLI."""

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


@pytest.mark.slow
def test_joblib_jobs_racing_on_one_missing_split_build_it_once(tiny_model_dir, tmp_path):
    """Two jobs of a `hydra/launcher=joblib` multirun start at once on one missing split: the
    first to take the split's folder lock builds it (and then the ref store), the other waits
    at the lock and uses what was built; both train. The test holds the lock itself until
    both jobs wait at it, so the race is certain rather than likely."""
    import time

    from dphrl.lock import folder_lock

    split, sweep = tmp_path / "split", tmp_path / "sweep"
    args = [sys.executable, "-m", "dphrl", "train", "--multirun", "hydra/launcher=joblib"]
    args += ["hydra.launcher.n_jobs=2", "seed=0,1", "divergence=js", "engine=hf"]
    args += [
        f"model.path={tiny_model_dir}",
        "model.max_new_tokens=6",
        "task.limit=4",
        "algo.group_size=2",
        "algo.prompts_per_step=2",
        "split.k=2",
        "ref.keep=all",
        "trainer.max_steps=1",
        "trainer.ref_batch_size=2",
        "trainer.tensorboard=false",
        f"split.out={split}",
        f"ref.out={tmp_path}/ref",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    env = {**os.environ, "COLUMNS": "100"}
    with folder_lock(split, "the test, holding the split until both jobs wait"):
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        logs = [sweep / str(job) / "train.log" for job in (0, 1)]
        deadline = time.time() + 300
        while not all(p.exists() and "waiting for it" in p.read_text() for p in logs):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the jobs never both waited at the split's lock"
            time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    texts = [p.read_text() for p in logs]
    builders = [t for t in texts if "split: chunk" in t]
    assert len(builders) == 1, "the split was sampled by both jobs, or by none"
    samples = (split / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 2  # 4 prompts x k = 2, once
    for job in (0, 1):
        metrics = (sweep / str(job) / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1 and (sweep / str(job) / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("launcher", ["slurm", "joblib"])
def test_shipped_launchers_compose(launcher):
    """`hydra/launcher=slurm` is dphrl's file over hydra-submitit-launcher's SLURM schema: one
    node of 8 tasks and 8 GPUs per sweep job; joblib is the plugin's own."""
    from hydra import compose, initialize_config_dir

    from dphrl import config
    from dphrl.cli import CONF_DIR

    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=2"]
            if launcher == "joblib"
            else [f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher_cfg = cfg.hydra.launcher
    if launcher == "joblib":
        assert launcher_cfg._target_.endswith("JoblibLauncher") and launcher_cfg.n_jobs == 2
        return
    assert launcher_cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher_cfg.nodes, launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node) == (
        1,
        8,
        8,
    )
    assert launcher_cfg.partition == "gpu"


def test_submitit_tasks_become_torchrun_ranks(monkeypatch):
    """Each task of a submitit job (SLURM's, or its local executor's as here) gets torchrun's
    variables, so dphrl.dist sees rank 1 of 2 as it would under torchrun."""
    from dphrl import dist

    # set, then removed: monkeypatch then restores each as it was (absent), although
    # `ranks_from_submitit` sets them behind its back; a rank left in os.environ would make
    # every later in-process run of the suite wait for a torchrun peer
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in (*keys, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in {"NTASKS": "2", "GLOBALID": "1", "LOCALID": "1", "JOB_ID": "4242"}.items():
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", value)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_NUM_NODES", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_NODEID", "0")
    dist.ranks_from_submitit()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "1",
        "2",
        "1",
    )
    assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) >= 20000
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # every task sees the node's GPUs
