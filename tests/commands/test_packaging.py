"""The wheel carries its configs (dphrl/conf) and runs from outside the source tree; users add
their own config files with `--config-dir` without touching the package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow  # a wheel build, a venv and three CLI processes: ~40 s on the shared machine
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path, tiny_model_dir):
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", tmp_path / "dist", ROOT, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("dphrl-*.whl")
    venv = tmp_path / "venv"
    _run(
        sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path
    )
    # The heavy dependencies come from the test venv (its site-packages, without its .pth files,
    # so its editable dphrl stays out); dphrl itself only from the wheel.
    py = venv / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel,
         cwd=tmp_path)  # fmt: skip
    where = _run(py, "-c", "import dphrl, os; print(os.path.dirname(dphrl.__file__))", cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv))
    dphrl = venv / "bin" / "dphrl"
    job = _run(dphrl, "train", "--cfg", "job", "divergence=forward_kl", cwd=tmp_path)
    assert yaml.safe_load(job.stdout)["divergence"]["name"] == "forward_kl"
    env = {**os.environ, "COLUMNS": "300"}
    dry = _run(
        dphrl, "train", "dry_run=true", f"model.path={tiny_model_dir}", cwd=tmp_path, env=env
    )
    assert "dphrl train (dry run): task arith" in dry.stdout
    assert list((tmp_path / "runs" / "train").glob("*/.hydra/config.yaml"))  # run folder in cwd


def test_user_config_dir_adds_a_task_and_a_model(tmp_path, tiny_model_dir):
    """`--config-dir my_conf task=my_task model=my_model`: the user's files compose with the
    shipped ones (README, "Your own configs")."""
    rows = tmp_path / "problems.jsonl"
    rows.write_text(
        '{"problem": "What is 2+3?", "answer": "5"}\n{"problem": "What is 7*6?", "answer": "42"}\n'
    )
    conf = tmp_path / "my_conf"
    (conf / "task").mkdir(parents=True)
    (conf / "model").mkdir()
    (conf / "task" / "my_task.yaml").write_text(f"name: math\npath: {rows}\n")
    (conf / "model" / "my_model.yaml").write_text(f"name: my-model\npath: {tiny_model_dir}\n")
    args = ["--config-dir", str(conf), "task=my_task", "model=my_model"]
    env = {**os.environ, "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "dphrl", "train", *args]
    job = _run(*cmd, "--cfg", "job", cwd=tmp_path, env=env)
    cfg = yaml.safe_load(job.stdout)
    assert (cfg["task"]["name"], cfg["task"]["path"]) == ("math", str(rows))
    assert cfg["model"]["path"] == tiny_model_dir and cfg["divergence"]["name"] == "js"
    dry = _run(*cmd, "dry_run=true", cwd=tmp_path, env=env)
    assert f"task math: 2 prompts; model {tiny_model_dir}" in dry.stdout
