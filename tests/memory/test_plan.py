"""The memory plan (dphrl.memory): every line of a small model's plan computed by hand, the
refusals and their knobs, and the 8B preset on 80 GB cards; then the plan for the one
measured GPU step (BENCHMARKS.md, benchmarks/gpu_step_h200.json) against its peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dphrl.memory.formulas import GIB, head_bytes
from dphrl.memory.plan import PlanExceedsMemory, build_plan, plan_before_launch
from dphrl.memory.shape import KNOWN, find_shape
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]

# hidden 64, 2 layers, vocab 1000, 4 heads of 16 (2 KV heads), MLP 128, tied embeddings
SMALL = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "tie_word_embeddings": True,
}


@pytest.fixture
def small_model(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    return str(tmp_path)


def small_cfg(path: str, *more: str):
    return compose_config(
        [
            f"model.path={path}",
            "model.dtype=bfloat16",
            "model.max_prompt_len=16",
            "model.max_new_tokens=32",
            "layout=gpu1",
            "layout.gpu_memory_gib=4",
            "engine=vllm",
            "engine.vllm.gpu_memory_utilization=0.5",
            "divergence=reverse_kl",  # an online reference, no ref store
            "algo.prompts_per_step=2",
            "algo.group_size=4",
            *more,
        ]
    )


def test_small_model_plan_line_by_line(small_model):
    shape = find_shape(small_model)
    # per layer: q 64x64, k and v 64x32 each, o 64x64, MLP 3x64x128, two norms of 64
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert layer == 36_992
    P = 2 * layer + 1000 * 64 + 64  # + embeddings (tied lm_head) + final norm
    assert shape.params == P == 138_048

    plan = build_plan(small_cfg(small_model), "train", shape, 1, 4 * GIB, "layout.gpu_memory_gib")
    # vLLM: half the card; its weights bf16, its profile (8192 tokens x (2 x 128 + 4 x 64) x 2 B)
    # and the sampler's logits (256 x 1000 x 4 B); the rest is KV at 2 x 2 layers x 32 x 2 B
    share = 2 * GIB
    kv = share - 2 * P - 8192 * (2 * 128 + 4 * 64) * 2 - 256 * 1000 * 4
    assert kv // 256 == 8_350_761
    # one forward: 2 prompts x 16 + 8 responses x 32 = 288 tokens (packed; rows of 16 + 4 x 32)
    # per token per layer: norms 2 (4 + 2 x 2) 64, attention 5 x 2 x 64 + 4 x 4, MLP 4 x 2 x 128
    a = 2 * 8 * 64 + 5 * 2 * 64 + 4 * 4 + 4 * 2 * 128
    assert a == 2704
    expected = [  # item, sampling, training
        ("weights, fp32 master", 4 * P, 4 * P),
        ("gradients, fp32", 0, 4 * P),  # freed after each step: none while sampling
        ("AdamW moments, fp32", 8 * P, 8 * P),
        ("online reference, float32", 4 * P, 4 * P),  # float32 like the policy it starts as
        ("vLLM engine (weights + KV)", share, share),  # no sleep_mode: kept while training
        ("bfloat16 layer copies", None, 2 * 2 * layer),  # autocast's casts (not sharded)
        ("activations, 288 tokens", None, 288 * (2 * a + 8 * 64)),
        ("log-prob head", None, 1024 * 1000 * (4 + 4)),  # fp32 chunk + its fp32 gradient
        ("attention mask", None, 2 * 144 * 144 * 2),  # 2 rows of 144 tokens, bf16
        ("CUDA context, workspaces", GIB, GIB),
    ]
    assert [(ln.item, ln.sampling, ln.training) for ln in plan.lines] == expected
    assert plan.total("sampling") == 12 * P + 4 * P + share + GIB
    assert plan.total("training") == sum(t for _, _, t in expected)
    assert plan.over() is None and plan.kv_short is None

    table = plan.table()
    assert "8,350,761 tokens" in table
    for item, sampling, training in expected:
        row = next(line for line in table.splitlines() if line.startswith(item))
        shown = [f"{v / GIB:.2f}" if v is not None else "-" for v in (sampling, training)]
        assert row.split()[len(item.split()) : len(item.split()) + 2] == shown, row
    assert "total" in table and "layout.gpu_memory_gib" in table


def test_sleep_mode_frees_the_engine_while_training(small_model):
    cfg = small_cfg(small_model, "engine.sleep_mode=true")
    plan = build_plan(cfg, "train", find_shape(small_model), 1, 4 * GIB)
    engine = next(ln for ln in plan.lines if ln.item.startswith("vLLM"))
    assert (engine.sampling, engine.training) == (2 * GIB, 0)


def test_refusal_names_the_phase_and_the_knob_that_fits(small_model):
    cfg = small_cfg(small_model, "engine.vllm.gpu_memory_utilization=0.9")
    with pytest.raises(PlanExceedsMemory) as err:
        plan_before_launch("train", cfg, dry_run=False)
    msg = str(err.value)
    # 18 B x P of trainer state + 0.9 x 4 GiB for vLLM + 1 GiB of context = 4.60 GiB
    assert msg.startswith("memory plan: the sampling phase needs 4.6 GiB per rank, ")
    assert "more than the 4.0 GiB of the device (layout.gpu_memory_gib)" in msg
    assert "vLLM engine (weights + KV) 3.6 GiB: engine.vllm.gpu_memory_utilization" in msg
    # (4 GiB - 1 GiB of context - 2.5 MB of trainer state) / 4 GiB = 0.749..., down to 0.70
    assert msg.endswith("engine.vllm.gpu_memory_utilization=0.7 fits.")
    plan_before_launch(
        "train", small_cfg(small_model, "engine.vllm.gpu_memory_utilization=0.7"), False
    )


def test_refusal_when_vllm_has_no_room_for_one_sequence():
    # 0.2 x 80 GiB - 2 B x 8.03 B weights - 8192 x 45056 x 2 B profile - 256 x 128256 x 4 B
    kv = int(0.2 * 80 * GIB) - 2 * 8_030_261_248 - 8192 * 45056 * 2 - 256 * 128256 * 4
    assert kv // (2 * 32 * 8 * 128 * 2) == 1905  # tokens: below one 4,096 + 4,096 sequence
    cfg = compose_config(
        ["model=llama3.1-8b-instruct", "layout=gpu8", "layout.gpu_memory_gib=80", "engine=vllm"]
        + ["engine.vllm.gpu_memory_utilization=0.2", "trainer.micro_batch_tokens=8192"]
    )
    with pytest.raises(
        PlanExceedsMemory,
        match=r"leaves KV cache for 1,905 tokens .* is 8,192: vLLM would refuse to start; "
        "raise engine.vllm.gpu_memory_utilization",
    ):
        plan_before_launch("train", cfg, dry_run=True)


PAPER = ["+experiment=paper_bird", "divergence=js", "task=arith", "engine=vllm"]
PAPER += ["layout.gpu_memory_gib=80"]


def test_8b_preset_on_80gb_needs_a_token_budget_and_fits_with_it():
    shape = KNOWN["meta-llama/Llama-3.1-8B-Instruct"]
    assert shape.params == 8_030_261_248
    assert plan_before_launch("train", compose_config(PAPER), dry_run=True)  # fits as shipped
    with pytest.raises(PlanExceedsMemory) as err:  # the whole minibatch in one forward
        plan_before_launch(
            "train", compose_config([*PAPER, "trainer.micro_batch_tokens=0"]), dry_run=True
        )
    msg = str(err.value)
    assert "the training phase needs" in msg and "activations, 1,947,648 tokens" in msg
    assert "trainer.micro_batch_tokens" in msg
    budget = int(msg.rsplit("trainer.micro_batch_tokens=", 1)[1].split()[0])
    assert budget % 1024 == 0 and budget >= 20_096  # at least one 16,000 + 4,096 row
    assert msg.endswith(f"trainer.micro_batch_tokens={budget} fits (in 90% of the card).")
    fits = compose_config([*PAPER, f"trainer.micro_batch_tokens={budget}"])
    assert build_plan(fits, "train", shape, 8, 80 * GIB).total("training") <= 0.9 * 80 * GIB
    over = compose_config([*PAPER, f"trainer.micro_batch_tokens={budget + 1024}"])
    assert build_plan(over, "train", shape, 8, 80 * GIB).total("training") > 0.9 * 80 * GIB

    plan = plan_before_launch(
        "train", compose_config([*PAPER, "trainer.micro_batch_tokens=16384"]), dry_run=True
    )
    by_item = {ln.item.split(",")[0]: ln for ln in plan.lines}
    assert by_item["weights"].training == 4 * shape.params // 8
    assert by_item["AdamW moments"].training == 8 * shape.params // 8
    assert (
        by_item["vLLM engine (weights + KV)"].sampling,
        by_item["vLLM engine (weights + KV)"].training,
    ) == (int(0.6 * 80 * GIB), 0)
    assert "activations" in by_item and by_item["activations"].item.endswith("20,096 tokens")
    assert round(plan.total("sampling") / GIB, 2) == 60.22
    assert round(plan.total("training") / GIB, 2) == 35.25


def test_no_card_no_check_and_an_unknown_hub_model_has_no_plan(caplog):
    cfg = compose_config(["model=llama3.1-8b-instruct", "layout=cpu"])
    assert plan_before_launch("train", cfg, dry_run=False) is None  # CPU run: nothing to check
    plan = plan_before_launch("train", cfg, dry_run=True)  # a dry run still shows the plan
    assert plan.capacity is None and "set layout.gpu_memory_gib" in plan.table()
    cfg = compose_config(["model.path=nobody/no-such-model", "layout.gpu_memory_gib=80"])
    with caplog.at_level("INFO"):
        assert plan_before_launch("train", cfg, dry_run=True) is None
    assert "memory plan: unavailable, nobody/no-such-model" in caplog.text


def test_plan_of_the_measured_h200_step():
    """benchmarks/gpu_step.py's run: SmolLM2-135M in bf16, FSDP2 on 1 rank, hf engine,
    16 prompts x 8 rollouts of 256 tokens (prompts of 38), 16 ref rows, divergence js, no
    checkpointing. The run kept bf16 weights, gradients and AdamW (8 B a parameter); the plan
    counts float32 masters (16 B), so 8 B x P come off before comparing allocator peaks. The
    run's code also made full logits under FSDP2 and kept the root group in bfloat16; the plan
    is of today's (chunked log-probs from the hidden states, a float32 root), so those two
    lines are put back as the run had them."""
    measured = json.loads((ROOT / "benchmarks" / "gpu_step_h200.json").read_text())
    cfg = compose_config(
        ["model=smollm2-135m", "model.dtype=bfloat16", "engine=hf", "layout=gpu1"]
        + ["layout.fsdp=true", "algo.prompts_per_step=16", "algo.group_size=8"]
        + ["algo.minibatch_size=0"]  # one update over all 128, as the run did (not arith's default)
        + ["model.max_new_tokens=256", "model.max_prompt_len=38", "trainer.ref_batch_size=16"]
    )
    shape = KNOWN["embedded:smollm2-135m"]
    plan = build_plan(cfg, "train", shape, 1, None)
    allocated = plan.total("training") - GIB - 8 * shape.params  # no context; bf16 state
    head = next(ln for ln in plan.lines if ln.item == "log-prob head").training
    response_tokens = 16 * 8 * 256 + 16 * 256  # the minibatch's rollouts and ref rows
    allocated += head_bytes(shape, response_tokens, 2, True) - head
    allocated -= 2 * (shape.root_params + shape.head_params)  # its root: bfloat16, not float32
    ratio = allocated / (measured["peak_mem_gib"] * GIB)
    assert 0.9 <= ratio <= 1.1, f"plan {allocated / GIB:.1f} GiB vs {measured['peak_mem_gib']:.1f}"
