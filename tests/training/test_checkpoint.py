"""Checkpoints: exact resume of every piece of state, atomicity, pruning, no pickles."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dphrl.errors import ConfigError, DphrlError
from dphrl.training.checkpoint import (
    MARKER,
    check_resume,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_hf_model,
)
from dphrl.training.sampler import EpochSampler


def _parts(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    _train_on(model, optimizer, scheduler, steps, "cpu")


def _train_on(model, optimizer, scheduler, steps: int, device: str) -> None:
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 6), device=device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v.clone() for state in optimizer.state.values() for v in state.values()]


def test_resume_restores_model_optimizer_scheduler_rng_and_data_position(tiny_model, tmp_path):
    model = tiny_model
    optimizer, scheduler = _parts(model)
    sampler = EpochSampler(10, seed=3)
    _train(model, optimizer, scheduler, 3)
    sampler.next_batch(4)
    state = {"step": 3, "sampler": sampler.state_dict()}
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, state, keep=2)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    moments = _optimizer_tensors(optimizer)
    lr = scheduler.get_last_lr()
    draws = _draws()
    next_batch = sampler.next_batch(4)

    _train(model, optimizer, scheduler, 2)  # perturb everything
    _draws()
    sampler.next_batch(7)

    loaded = load_checkpoint(path, model, optimizer, scheduler)
    assert loaded == state
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, params[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives the load
    after = _optimizer_tensors(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    assert scheduler.get_last_lr() == lr
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.9, 0.999)  # DCP hands back a list
    assert _draws() == draws
    resumed = EpochSampler(10, seed=3)
    resumed.load_state_dict(loaded["sampler"])
    assert resumed.next_batch(4) == next_batch


def test_resumed_training_matches_uninterrupted(tiny_model, tmp_path):
    """Two steps after a resume equal two steps of a run that never stopped."""
    model = tiny_model
    optimizer, scheduler = _parts(model)
    _train(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2}, keep=1)
    _train(model, optimizer, scheduler, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    load_checkpoint(path, model, optimizer, scheduler)
    _train(model, optimizer, scheduler, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_checkpoint_with_flat_algo_keys_resumes_under_their_grouped_names(tiny_model, tmp_path):
    """Checkpoints saved before the algo groups record `algo.clip_cov_ratio`; a resume compares
    it with `algo.clip_cov.ratio`, so an equal value resumes and a changed one is refused."""
    old = {"algo.clip_cov_ratio": 0.0002, "algo.rollout_correction": "none"}
    save_checkpoint(tmp_path, 1, tiny_model, None, None, {"step": 1, "settings": old}, keep=1)
    new = {"algo.clip_cov.ratio": 0.0002, "algo.rollout_correction.name": "none"}
    assert check_resume(tmp_path, True, new) == checkpoint_dir(tmp_path, 1)
    with pytest.raises(ConfigError, match="algo.rollout_correction.name: checkpoint has 'none'"):
        check_resume(tmp_path, True, {**new, "algo.rollout_correction.name": "tis"})


def test_keep_last_n(tiny_model, tmp_path):
    optimizer, scheduler = _parts(tiny_model)
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, tiny_model, optimizer, scheduler, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 8)


def test_half_written_checkpoints_are_ignored(tiny_model, tmp_path):
    assert latest_checkpoint(tmp_path) is None
    optimizer, scheduler = _parts(tiny_model)
    save_checkpoint(tmp_path, 2, tiny_model, optimizer, scheduler, {"step": 2}, keep=3)
    # A save killed mid-way: the temp folder, and a step folder without the marker.
    for name in (".tmp_step_000004", "step_000006"):
        torn = tmp_path / "checkpoints" / name
        torn.mkdir()
        (torn / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    with pytest.raises(DphrlError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step_000006", tiny_model)
    save_checkpoint(tmp_path, 4, tiny_model, optimizer, scheduler, {"step": 4}, keep=3)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / ".tmp_step_000004").exists()


def test_resave_of_a_step_replaces_it(tiny_model, tmp_path):
    optimizer, scheduler = _parts(tiny_model)
    save_checkpoint(tmp_path, 2, tiny_model, optimizer, scheduler, {"step": 2, "v": 1}, keep=2)
    save_checkpoint(tmp_path, 2, tiny_model, optimizer, scheduler, {"step": 2, "v": 2}, keep=2)
    path = latest_checkpoint(tmp_path)
    assert json.loads((path / "trainer_state.json").read_text())["v"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]


def test_no_pickles_written(tiny_model, tmp_path):
    optimizer, scheduler = _parts(tiny_model)
    _train(tiny_model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, 1, tiny_model, optimizer, scheduler, {"step": 1}, keep=1)
    save_hf_model(tiny_model, None, tmp_path / "final")
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    assert json.loads((path / MARKER).read_text())["step"] == 1


def test_unstorable_trainer_state_is_refused_before_writing(tiny_model, tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, tiny_model, None, None, {"step": object()}, keep=1)
    assert latest_checkpoint(tmp_path) is None


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def test_save_hf_model_round_trips_through_from_pretrained(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_hf_model(tiny_model, _tiny_tokenizer(), tmp_path / "final")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: stored once
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("w1 w5 w9 w3", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 7, 11, 5]]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)
    assert not list(tmp_path.glob(".tmp_*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_restores_device_state_and_cuda_rng(tiny_model, tmp_path):
    model = tiny_model.to("cuda", torch.bfloat16)
    optimizer, scheduler = _parts(model)
    _train_on(model, optimizer, scheduler, 2, "cuda")
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"step": 2}, keep=1)
    cuda_draw = torch.rand(4, device="cuda")
    _train_on(model, optimizer, scheduler, 2, "cuda")
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    load_checkpoint(path, model, optimizer, scheduler)
    assert torch.equal(torch.rand(4, device="cuda"), cuda_draw)
    assert all(
        v.is_cuda for state in optimizer.state.values() for k, v in state.items() if k != "step"
    )
    assert model.lm_head.weight.dtype == torch.bfloat16
    _train_on(model, optimizer, scheduler, 2, "cuda")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    from transformers import AutoModelForCausalLM

    out = save_hf_model(model, None, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to("cuda").eval()
    saved = loaded.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # Logits only close: `.to(bfloat16)` also cast the rotary buffer, which loading keeps fp32.
    ids = torch.randint(0, 128, (1, 8), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, atol=2e-2, rtol=0)


def _pythonpath() -> str:
    """This checkout first, so the torchrun script imports this dphrl, installed or not, and
    the tests' conftest (the tiny model's shape)."""
    tests = Path(__file__).resolve().parents[1]
    return os.pathsep.join(
        filter(None, [str(tests.parent), str(tests), os.environ.get("PYTHONPATH")])
    )


_FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM
from dphrl.training.checkpoint import load_checkpoint, save_checkpoint, save_hf_model

dist.init_process_group("gloo")
torch.manual_seed(0)
model = LlamaForCausalLM(tiny_llama_config())
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

def train(steps):
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 6))  # per-rank RNG: each rank draws its own batch
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()

def full():
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))

torch.manual_seed(1 + dist.get_rank())
train(2)
path = save_checkpoint(sys.argv[1], 2, model, optimizer, scheduler, {"step": 2}, keep=1)
save_hf_model(model, None, sys.argv[1] + "/final")
train(2)
expected = {k: v.clone() for k, v in full().items()}
assert load_checkpoint(path, model, optimizer, scheduler) == {"step": 2}
train(2)
assert all(torch.equal(v, expected[k]) for k, v in full().items())
print("rank", dist.get_rank(), "resumed exactly", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_save_and_resume_over_gloo(tmp_path):
    """Two FSDP2 ranks on CPU: gathered save, per-rank RNG, broadcast load, exact continuation."""
    script = tmp_path / "fsdp_resume.py"
    script.write_text(_FSDP_SCRIPT)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        str(run),
    ]
    # CPU ranks even where there is a GPU: two ranks would ask for two devices.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": _pythonpath(),
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resumed exactly") == 2
    files = {p.name for p in latest_checkpoint(run).iterdir()}
    assert {"rng_rank00000.json", "rng_rank00001.json", "model.safetensors"} <= files

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")
