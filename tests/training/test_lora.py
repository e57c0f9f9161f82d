"""LoRA (model.lora.r > 0) on the tiny model: merged pushes, the adapter-free reference, the
adapter folder and merged model that train writes, and eval-passk's loading of an adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dphrl import dist
from dphrl.commands import train as trainer
from dphrl.config import LoraConfig
from dphrl.presample.inputs import training_data
from dphrl.training.lora import add_adapters, base_of, merged_model_dir
from dphrl.training.trainer import Trainer
from dphrl.training.weight_sync import merged_tensors
from tests.conftest import compose_config
from tests.helpers import toytask
from tests.training.test_trainer import FAST


@pytest.fixture(autouse=True)
def coin(monkeypatch):
    toytask.register(monkeypatch)


def _randomize_adapters(model) -> None:
    """peft starts B at 0 (delta 0); a trained adapter has B != 0."""
    import torch

    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)


def test_merged_tensors_are_peft_merge_under_the_base_names(tiny_model):
    base_names = {name for name, _ in tiny_model.named_parameters()}
    peft_model = add_adapters(
        tiny_model, LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "down_proj"])
    )
    _randomize_adapters(tiny_model)
    pushed = dict(merged_tensors(tiny_model))
    assert set(pushed) == base_names
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, tensor in merged.named_parameters():
        assert pushed[name].allclose(tensor, atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not pushed[q].allclose(
        dict(tiny_model.named_parameters())[q.replace(".weight", ".base_layer.weight")]
    )


def _cfg(tmp: Path, model: str, *extra: str):
    return compose_config(
        [
            *FAST,
            "task.name=coin",
            f"model.path={model}",
            "model.lora.r=4",
            "model.lora.alpha=8",
            "divergence=reverse_kl",  # online reference: the policy with adapters disabled
            "divergence.beta=0.1",
            f"trainer.run_dir={tmp}/run",
            *extra,
        ]
    )


def test_reference_is_the_policy_without_adapters(tiny_model_dir, tmp_path):
    import torch

    from dphrl.models import load_policy
    from dphrl.rl.batching import pack
    from dphrl.rl.logprobs import batch_logprobs

    cfg = _cfg(tmp_path, tiny_model_dir)
    layout = dist.resolve_layout(cfg.layout)
    prompts, _ = training_data(cfg, layout.is_main, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "run", layout, prompts, [], tiny_model_dir)
    assert t.ref_model is None  # no second copy
    trainable = {n for n, p in t.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _randomize_adapters(t.policy)
    batch = pack([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], t.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = t.reference_logprobs(batch, 1.0)
        base = batch_logprobs(load_policy(tiny_model_dir), batch)[0]
        adapted = t.logprobs(t.policy, batch, 1.0)
    assert ref.allclose(base, atol=1e-5)
    assert not adapted.allclose(base, atol=1e-3)  # the adapters are on again after the block
    t.engine.close()


@pytest.mark.slow  # a whole LoRA train run
def test_lora_train_writes_adapter_and_merged_model_that_eval_loads(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from dphrl.commands.eval_passk import _model_path

    out = trainer.run(_cfg(tmp_path, tiny_model_dir, "trainer.max_steps=2"), tmp_path)
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["grad_norm"] > 0 and "kl_ref" in metrics[0]
    adapter = run / "adapter"
    assert base_of(adapter) == tiny_model_dir
    before, after = (
        load_file(Path(tiny_model_dir) / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert set(after) == set(before)  # a plain HF model: base names, no adapter weights
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0
    merged = Path(_model_path(str(adapter), None, tmp_path / "eval"))
    again = load_file(merged / "model.safetensors")
    for k in after:
        assert again[k].allclose(after[k], atol=1e-5), k
    assert (
        merged_model_dir(adapter, tiny_model_dir, tmp_path / "eval" / "merged") == merged
    )  # reused


@pytest.mark.slow  # the real 135M model: one LoRA step, then eval-passk on its adapter
def test_lora_on_the_embedded_model_trains_and_its_adapter_evaluates(tmp_path):
    from dphrl.commands import eval_passk as passk

    cfg = compose_config(
        ["model=smollm2-135m", "model.lora.r=8", "divergence=reverse_kl", "engine=hf"]
        + ["task.limit=4", "algo.prompts_per_step=2", "algo.group_size=2"]
        + ["model.max_new_tokens=16", "trainer.max_steps=1", "trainer.tensorboard=false"]
        + [f"trainer.run_dir={tmp_path}/run"]
    )
    trainer.run(cfg, tmp_path)
    adapter = tmp_path / "run" / "adapter"
    assert base_of(adapter) == "embedded:smollm2-135m"
    ev = compose_config(
        ["engine=hf", "task.limit=2", "eval.n=2", "eval.k=[1,2]", "model.max_new_tokens=16"]
        + [f"eval.models=[{adapter}]", f"eval.out={tmp_path}/eval"],
        "eval-passk",
    )
    payload = passk.run(ev, tmp_path / "eval")
    (result,) = payload["results"]
    assert result["model"] == str(adapter) and result["prompts"] == 2
