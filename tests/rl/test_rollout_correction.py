"""The engine's sampled-token log-probs against the trainer's, on a tiny model: fp32 engine and
fp32 trainer agree, a bf16 engine does not (and TIS truncates at C), and with top_p < 1 the
ratio is exactly the nucleus mass, the importance weight of sampling from the truncated policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dphrl.commands import train as trainer
from dphrl.engine import Sampling
from dphrl.engine.hf import HFEngine
from dphrl.rl import mismatch
from dphrl.rl.batching import pack, repad
from dphrl.rl.logprobs import batch_logprobs
from tests.conftest import compose_config
from tests.helpers import toytask

PROMPTS = [[1, 9, 4, 7], [1, 3, 3]]


def _engine_vs_trainer(model_dir: str, engine_dtype: str, sampling: Sampling):
    """Sample with the hf engine in `engine_dtype`; score the same tokens with the fp32 trainer
    forward. Returns (trainer logp, engine logp, mask, packed batch), all `# (N, T)`."""
    from transformers import AutoModelForCausalLM

    engine = HFEngine(model_dir, dtype=engine_dtype, device="cpu")
    outs = [c for group in engine.generate(PROMPTS, 3, sampling) for c in group]
    prompts = [p for p in PROMPTS for _ in range(3)]
    batch = pack(prompts, [c.token_ids for c in outs], pad_id=0)
    engine_logp = repad([c.logprobs for c in outs], batch.response_mask)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        old, _ = batch_logprobs(policy, batch, temperature=sampling.temperature)
    return old, engine_logp, batch.response_mask.float(), batch, policy


def test_fp32_engine_and_fp32_trainer_agree(tiny_model_dir):
    old, eng, mask, _, _ = _engine_vs_trainer(tiny_model_dir, "float32", Sampling(1.0, 1.0, 8, 3))
    stats = mismatch.mismatch_stats(old, eng, mask)
    assert stats["mismatch_abs_max"] < 1e-4
    assert stats["mismatch_kl_k3"] < 1e-8 and stats["mismatch_frac_large"] == 0
    weights, kept, rc = mismatch.correct("tis", old, eng, mask, 0.5, 2.0)
    assert torch.allclose(weights[mask > 0], torch.ones(()), atol=1e-4)
    assert rc["rc_frac_truncated"] == 0 and torch.equal(kept, mask)


def test_bf16_engine_mismatch_is_measured_and_truncated_at_c(tiny_model_dir):
    sampling = Sampling(1.0, 1.0, 8, 3)
    old, eng, mask, _, _ = _engine_vs_trainer(tiny_model_dir, "bfloat16", sampling)
    stats = mismatch.mismatch_stats(old, eng, mask)
    assert stats["mismatch_abs_mean"] > 1e-4  # bf16 logits: a visible, small disagreement
    assert stats["mismatch_kl_k3"] > 0
    log_w = (old - eng)[mask > 0]
    cap = float(torch.exp(log_w).median())  # half the tokens above it: truncation must show
    weights, _, rc = mismatch.correct("tis", old, eng, mask, 0.5, cap)
    assert float(weights[mask > 0].max()) <= cap + 1e-7
    above = float((torch.exp(log_w) > cap).float().mean())
    assert rc["rc_frac_truncated"].item() == above > 0


def _nucleus_mass(policy, batch, temperature: float, top_p: float) -> torch.Tensor:
    """Z per response token `# (N, T)`: the mass of the top_p nucleus the engine drew from,
    from the full softmax of a plain padded forward (the hf engine's rule: a token is kept
    while the tokens ranked above it hold less than top_p)."""
    T = batch.response_mask.shape[1]
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    probs = (logits[:, -T - 1 : -1].float() / temperature).softmax(-1)  # (N, T, V)
    sorted_p, _ = probs.sort(-1, descending=True)
    kept = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return (sorted_p * kept).sum(-1)


def test_top_p_weight_is_the_nucleus_mass(tiny_model_dir):
    """With top_p < 1 the engine reports log-probs of the renormalised nucleus and the trainer
    those of the full policy, so log w_t = log Z_t exactly: in [log top_p, 0], a weight TIS
    keeps (nothing above C) and mismatch metrics read as the truncation's KL, -E[log Z]."""
    top_p, temperature = 0.8, 1.3
    sampling = Sampling(temperature, top_p, 8, 5)
    old, eng, mask, batch, policy = _engine_vs_trainer(tiny_model_dir, "float32", sampling)
    z = _nucleus_mass(policy, batch, temperature, top_p)
    valid = mask > 0
    torch.testing.assert_close((old - eng)[valid], z.log()[valid], atol=2e-4, rtol=1e-4)
    weights, _, rc = mismatch.correct("tis", old, eng, mask, 0.5, 2.0)
    assert float(weights[valid].min()) >= top_p - 1e-4 and float(weights[valid].max()) <= 1 + 1e-4
    assert rc["rc_frac_truncated"] == 0
    kl = mismatch.mismatch_stats(old, eng, mask)["mismatch_kl_k3"]
    assert kl > 0


# ---- through the trainer: every objective and correction trains a step, with DPH-JS ----------

TRAIN = [
    "engine=hf",
    "model.max_new_tokens=8",
    "algo.group_size=4",
    "algo.prompts_per_step=2",
    "split.k=2",
    "ref.keep=all",
    "trainer.ref_batch_size=4",
    "trainer.lr=1e-2",
    "trainer.max_steps=1",
    "trainer.tensorboard=false",
    "task.name=coin",
    "task.limit=8",
]


@pytest.fixture(scope="module")
def coin_data(tmp_path_factory, tiny_model_dir):
    """The coin toy task registered, and its split and ref store for the tiny model."""
    mp = pytest.MonkeyPatch()
    toytask.register(mp)
    data = tmp_path_factory.mktemp("coin")
    trainer.run(_cfg(data, tiny_model_dir, data), data)
    yield data
    mp.undo()


def _cfg(tmp, model, data, *extra):
    return compose_config(
        [
            *TRAIN,
            f"model.path={model}",
            f"split.out={data}/split",
            f"ref.out={data}/ref",
            f"trainer.run_dir={tmp}/run",
            "divergence=js",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "extra",
    [
        ["algo=gspo"],
        ["algo=dr_grpo"],
        ["algo.advantage=passk", "algo.passk_k=2"],
        ["algo.loss=clip_cov", "algo.clip_cov.ratio=0.1", "algo.clip_cov.low=-9"],
        ["algo.loss=kl_cov", "algo.kl_cov.ratio=0.1"],
        ["algo.rollout_correction.name=tis", "engine.dtype=bfloat16"],
        ["algo.rollout_correction.name=mis_token", "algo.ppo_epochs=2", "algo.minibatch_size=4"],
        ["algo.rollout_correction.name=mis_seq"],
    ],
    ids=lambda o: "+".join(o),
)
@pytest.mark.slow  # a split, a ref store and a train step per case
def test_each_objective_and_correction_trains_with_dph_js(
    extra, coin_data, tiny_model_dir, tmp_path
):
    from safetensors.torch import load_file

    out = trainer.run(_cfg(tmp_path, tiny_model_dir, coin_data, *extra), tmp_path)
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0
    (m,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("mismatch_abs_mean", "mismatch_abs_max", "mismatch_kl_k3", "mismatch_frac_large"):
        assert key in m
    for key in ("rc_weight_mean", "rc_weight_max", "rc_frac_truncated", "rc_frac_masked"):
        assert key in m
    if "engine.dtype=bfloat16" in extra:
        assert m["mismatch_abs_mean"] > 1e-5 and m["rc_weight_max"] <= 2.0
    elif "algo.ppo_epochs=2" not in extra:  # fp32 engine and trainer, before any update
        assert m["mismatch_abs_max"] < 1e-3 and m["rc_frac_masked"] == 0
