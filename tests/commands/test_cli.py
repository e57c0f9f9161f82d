"""The CLI: help, composition, validation errors and multirun folders, through real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def dphrl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dphrl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**__import__("os").environ, "COLUMNS": "100"},
        timeout=300,
    )


def test_top_help_lists_the_five_commands_one_line_each():
    out = dphrl("--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name, word in [
        ("split", "D_pef"),
        ("precompute-ref", "reference"),
        ("train", "PPO-clip"),
        ("eval-passk", "pass@k"),
        ("report", "table"),
    ]:
        line = next(line for line in lines if line.strip("│ ").startswith(f"{name} "))
        assert word in line, line


def test_command_help_shows_groups_and_options():
    out = dphrl("train", "--help")
    assert out.returncode == 0, out.stderr
    assert (
        "divergence: alpha, forward_kl, forward_kl_topk, js, js_full, none, reverse_kl"
        in out.stdout
    )
    assert "task: arith, bird, gsm8k, math, minisql, spider" in out.stdout
    assert "layout: auto, cpu, gpu1, gpu8, multinode" in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = dphrl("train", "--cfg", "job", "divergence=forward_kl", "algo=dapo_ds", "seed=3")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["divergence"]["name"] == "forward_kl"
    assert cfg["algo"]["clip_high"] == 0.28 and cfg["algo"]["dynamic_sampling"] is True
    assert cfg["algo"]["overlong"]["filter"] is True
    assert cfg["seed"] == 3


def test_cfg_job_prints_resolved_values_of_a_paper_preset():
    out = dphrl("train", "+experiment=paper_bird", "divergence=js", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["divergence"]["beta"] == 0.00125 and cfg["algo"]["clip_high"] == 0.28
    assert "${" not in out.stdout


def test_unknown_group_option_lists_the_allowed_ones():
    out = dphrl("train", "divergence=jss")
    assert out.returncode != 0
    assert "divergence/jss" in out.stderr
    assert "forward_kl" in out.stderr and "reverse_kl" in out.stderr


def test_out_of_range_value_names_key_and_bound():
    out = dphrl("train", "divergence.beta=-1")
    assert out.returncode == 2
    assert "divergence.beta=-1.0" in out.stderr and ">= 0" in out.stderr


def test_wrong_type_names_the_key():
    out = dphrl("train", "trainer.max_steps=many")
    assert out.returncode != 0
    assert "max_steps" in out.stderr


def test_missing_data_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    out = dphrl("train", "task=bird", f"task.path={missing}")
    assert out.returncode == 2
    assert str(missing) in out.stderr


@pytest.mark.slow  # four jobs, each resolving the real model
def test_multirun_makes_one_folder_per_job(tmp_path):
    out = dphrl(
        "train",
        "--multirun",
        "divergence=forward_kl,js",
        "seed=0,1",
        "dry_run=true",
        "task.limit=4",
        "model=smollm2-135m",  # the converted instruct model: no warm-up to make first
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        seen.add((cfg["divergence"]["name"], cfg["seed"]))
    assert seen == {("forward_kl", 0), ("forward_kl", 1), ("js", 0), ("js", 1)}
    assert out.stdout.count("(dry run): task arith: 4 prompts") == 4


def test_torchrun_ranks_share_one_run_folder_and_keep_their_own_logs():
    from dphrl.cli import torchrun_overrides

    one = {"WORLD_SIZE": "1"}
    assert torchrun_overrides(["seed=1"], one) == []
    env = {"WORLD_SIZE": "8", "RANK": "0", "TORCHELASTIC_RUN_ID": "abc"}
    assert torchrun_overrides([], env) == ["hydra.run.dir=outputs/${now:%Y-%m-%d}/torchrun-abc"]
    assert torchrun_overrides(["hydra.run.dir=runs/x"], env) == []  # the user's folder wins
    assert torchrun_overrides(["--multirun", "seed=0,1"], env) == []
    rank3 = torchrun_overrides(["hydra.run.dir=runs/x"], {**env, "RANK": "3"})
    assert rank3 == [
        "hydra.job_logging.handlers.file.filename="
        "${hydra.runtime.output_dir}/${hydra.job.name}_rank3.log"
    ]


def test_nested_algo_key_composes_through_the_cli():
    out = dphrl("train", "--cfg", "job", "algo.loss=cispo", "algo.cispo.high=3")
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["algo"]["cispo"] == {"low": 1.0, "high": 3.0}


@pytest.mark.parametrize(
    "arg,new",
    [
        ("algo.clip_cov_ratio=1e-3", "algo.clip_cov.ratio"),
        ("++algo.rollout_correction=tis", "algo.rollout_correction.name"),
    ],
)
def test_renamed_key_on_the_command_line_names_the_new_one(arg, new):
    out = dphrl("train", "--cfg", "job", arg)  # --cfg job: nothing runs even if it composed
    assert out.returncode == 2
    assert f"{arg.lstrip('+').split('=')[0]} was renamed: use {new}" in out.stderr
