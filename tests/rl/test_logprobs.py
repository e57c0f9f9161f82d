"""Chunked log-probs equal the naive log_softmax().gather(), in value and gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from dphrl.rl.logprobs import hidden_logprobs, response_logprobs, token_logprobs
from tests.conftest import tiny_llama_config

V = 96


def _naive(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]


def _naive_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # untied: the head is its own weight, as in the 7-8B models
    config = tiny_llama_config(vocab_size=V, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_naive(chunk, temperature):
    logits = torch.randn(3, 7, V, requires_grad=True)
    ids = torch.randint(0, V, (3, 7))
    ours, entropy = token_logprobs(
        logits, ids, temperature=temperature, chunk=chunk, with_entropy=True
    )
    naive = _naive(logits, ids, temperature)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, _naive_entropy(logits, temperature), atol=1e-5, rtol=1e-5)
    weights = torch.randn(3, 7)  # a non-uniform upstream gradient
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (grad_naive,) = torch.autograd.grad((naive * weights).sum(), logits)
    torch.testing.assert_close(grad_ours, grad_naive, atol=1e-5, rtol=1e-5)


def test_token_logprobs_half_precision_logits_are_upcast():
    logits = torch.randn(2, 4, V).bfloat16()
    ids = torch.randint(0, V, (2, 4))
    ours, entropy = token_logprobs(logits, ids, chunk=3)
    assert ours.dtype == torch.float32 and entropy is None
    torch.testing.assert_close(ours, _naive(logits, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_hidden_logprobs_match_naive(softcap):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    ids = torch.randint(0, V, (2, 9))
    ours, entropy = hidden_logprobs(
        hidden, weight, ids, bias=bias, temperature=0.8, softcap=softcap, chunk=4, with_entropy=True
    )
    logits = hidden @ weight.T + bias
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    naive = _naive(logits, ids, 0.8)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, _naive_entropy(logits, 0.8), atol=1e-5, rtol=1e-5)
    grads_ours = torch.autograd.grad(ours.sum(), (hidden, weight, bias))
    grads_naive = torch.autograd.grad(naive.sum(), (hidden, weight, bias))
    for a, b in zip(grads_ours, grads_naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _batch():
    """Two rows: prompts left-padded to 4, responses right-padded to 5 (pad id 0)."""
    input_ids = torch.tensor([[0, 5, 6, 7, 11, 12, 13, 0, 0], [21, 22, 23, 24, 31, 32, 33, 34, 35]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 9])
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return input_ids, attention_mask, response_mask


def _naive_response_logprobs(model, input_ids, attention_mask, response_mask, temperature):
    T, L = response_mask.shape[1], input_ids.shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    logp = _naive(logits[:, L - T - 1 : L - 1], input_ids[:, L - T :], temperature)
    return logp * response_mask


@pytest.mark.parametrize("from_hidden", [True, False])
def test_response_logprobs_match_naive_on_tiny_llama(tiny_llama, from_hidden):
    input_ids, attention_mask, response_mask = _batch()
    ours, entropy = response_logprobs(
        tiny_llama, input_ids, attention_mask, response_mask, temperature=0.9, chunk=3,
        with_entropy=True, from_hidden=from_hidden,
    )  # fmt: skip
    naive = _naive_response_logprobs(tiny_llama, input_ids, attention_mask, response_mask, 0.9)
    assert ours.shape == (2, 5) and entropy.shape == (2, 5)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    assert (ours[0, 3:] == 0).all() and (ours[:, :3] < 0).all()
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    grads_ours = torch.autograd.grad(ours.sum(), params, allow_unused=True)
    grads_naive = torch.autograd.grad(naive.sum(), params, allow_unused=True)
    for a, b in zip(grads_ours, grads_naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_response_logprobs_without_grad(tiny_llama):
    input_ids, attention_mask, response_mask = _batch()
    with torch.no_grad():
        ours, entropy = response_logprobs(tiny_llama, input_ids, attention_mask, response_mask)
        naive = _naive_response_logprobs(tiny_llama, input_ids, attention_mask, response_mask, 1.0)
    assert entropy is None and not ours.requires_grad
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


def test_response_must_be_shorter_than_sequence(tiny_llama):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="shorter"):
        response_logprobs(tiny_llama, ids, torch.ones_like(ids), torch.ones_like(ids))


def test_bfloat16_hidden_and_weight_match_the_model_computation():
    """lm_head in bf16, then .float(), as the model does; gradients come back in bf16."""
    hidden = torch.randn(6, 16).bfloat16().requires_grad_(True)
    weight = torch.randn(V, 16).bfloat16().requires_grad_(True)
    ids = torch.randint(0, V, (6,))
    ours, _ = hidden_logprobs(hidden, weight, ids, chunk=4)
    naive = _naive(hidden @ weight.T, ids)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    grads_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    grads_naive = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(grads_ours, grads_naive, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_the_head_ignores_autocast_and_stays_in_the_weights_dtype():
    """Under `model.autocast` only the decoder body is bf16: the lm_head's logits (and so the
    log-probs and their gradients) are exactly those of float32, not bf16's rounding."""
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    ids = torch.randint(0, V, (6,))
    plain, _ = hidden_logprobs(hidden, weight, ids, chunk=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = hidden_logprobs(hidden, weight, ids, chunk=4)
        rounded = _naive(hidden @ weight.T, ids)  # what an autocast head would give
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)
    assert not torch.allclose(rounded, plain, atol=1e-4)  # the test would see bf16's error
    grads_plain = torch.autograd.grad(plain.sum(), (hidden, weight))
    grads_mixed = torch.autograd.grad(mixed.sum(), (hidden, weight))
    for a, b in zip(grads_mixed, grads_plain, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_no_tokens_gives_empty_log_probs():
    logp, entropy = hidden_logprobs(
        torch.zeros(0, 16), torch.randn(V, 16), torch.zeros(0, dtype=torch.long), with_entropy=True
    )
    assert logp.shape == (0,) and entropy.shape == (0,)
    with pytest.raises(ValueError, match="chunk"):
        token_logprobs(torch.zeros(1, V), torch.zeros(1, dtype=torch.long), chunk=0)


def _grouped_batch():
    """Six rollouts of two prompts (interleaved, as a ref batch may be), mixed lengths: one
    response empty, one masked out as an overlong filter would, pad id 0."""
    from dphrl.rl.batching import pack

    a, b = [5, 6, 7], [21, 22, 23, 24]
    prompts = [a, b, a, a, b, b]
    responses = [[11, 12, 13], [31, 32, 33, 34, 35], [14], [15, 16, 17, 18, 19, 20], [], [36, 37]]
    batch = pack(prompts, responses, pad_id=0)
    batch.response_mask[3] = 0  # scored by the forward, then masked, as in the padded layout
    return batch


@pytest.mark.parametrize("pack_tokens", [4, 9, 1000])
@pytest.mark.parametrize("from_hidden", [True, False])
def test_shared_prefix_layout_matches_padded_rows(tiny_llama, pack_tokens, from_hidden):
    """Prompt once per packed row, responses masked from each other: the same log-probs,
    entropies and gradients as one padded row per response. pack_tokens=4 gives every response
    a row of its own, 9 splits each group over rows, 1000 packs each group in one row."""
    from dphrl.rl.batching import share_prefixes
    from dphrl.rl.logprobs import batch_logprobs

    batch = _grouped_batch()
    kw = dict(temperature=0.8, chunk=4, with_entropy=True, from_hidden=from_hidden)
    padded, ent_padded = batch_logprobs(tiny_llama, batch, pack_tokens=0, **kw)
    shared, ent_shared = batch_logprobs(tiny_llama, batch, pack_tokens=pack_tokens, **kw)
    rows = share_prefixes(batch, pack_tokens).input_ids.shape[0]
    assert rows == {4: 5, 9: 4, 1000: 2}[pack_tokens]  # the empty response takes no row
    assert shared.shape == padded.shape == (6, 6)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_shared, ent_padded, atol=1e-5, rtol=1e-5)
    assert (shared[3] == 0).all() and (shared[4] == 0).all() and (shared[0, :3] < 0).all()
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    weights = torch.randn(padded.shape)  # a loss that weighs every token differently
    g_padded = torch.autograd.grad((padded * weights).sum(), params, allow_unused=True)
    g_shared = torch.autograd.grad((shared * weights).sum(), params, allow_unused=True)
    for x, y in zip(g_shared, g_padded, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_shared_prefix_rows_hold_each_prompt_once():
    """A group's responses follow one copy of its prompt, positions continue from it, and the
    mask keeps responses apart."""
    from dphrl.rl.batching import share_prefixes

    sp = share_prefixes(_grouped_batch(), 1000)
    assert sp.input_ids[0, :13].tolist() == [5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert sp.position_ids[0, :13].tolist() == [0, 1, 2, 3, 4, 5, 3, 3, 4, 5, 6, 7, 8]
    bias = sp.attention_bias(torch.float32)[0, 0]  # (S, S)
    visible = (bias == 0).nonzero().tolist()
    assert [6, 2] in visible and [6, 6] in visible  # response 2 sees the prompt and itself
    assert [6, 5] not in visible and [7, 6] not in visible  # but not response 1, nor 2 from 3
    assert sp.source[:3].tolist() == [2, 3, 4]  # the prompt's last token predicts token 1
    assert sp.source[3].item() == 2 and sp.slot[3].item() == 2 * 6  # row 2's only token


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_several_ids_per_position_and_the_entropy_have_the_naive_gradient(softcap):
    """ids `# (..., J)` score J tokens a position (the ref store's top-k); the entropy is
    differentiable (dH/dz = -p (log p + H)): both equal log_softmax's, values and gradients."""
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(V, 16, requires_grad=True)
    ids = torch.randint(0, V, (2, 5, 3))
    ours, entropy = hidden_logprobs(
        hidden, weight, ids, temperature=0.7, softcap=softcap, chunk=3, with_entropy=True
    )
    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    naive = (logits / 0.7).log_softmax(-1).gather(-1, ids)
    assert ours.shape == (2, 5, 3) and entropy.shape == (2, 5)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    w, u = torch.randn(2, 5, 3), torch.randn(2, 5)
    loss_ours = (ours * w).sum() + (entropy * u).sum()
    loss_naive = (naive * w).sum() + (_naive_entropy(logits, 0.7) * u).sum()
    for a, b in zip(
        torch.autograd.grad(loss_ours, (hidden, weight)),
        torch.autograd.grad(loss_naive, (hidden, weight)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    logits2 = torch.randn(4, V, requires_grad=True)
    _, ent = token_logprobs(logits2, torch.zeros(4, dtype=torch.long), chunk=3, with_entropy=True)
    (g,) = torch.autograd.grad(ent.sum(), logits2)
    (g_naive,) = torch.autograd.grad(_naive_entropy(logits2).sum(), logits2)
    torch.testing.assert_close(g, g_naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack_tokens", [0, 9])
def test_extra_ids_and_topk_on_both_layouts(tiny_llama, pack_tokens):
    """`batch_topk_logprobs` is the top-k of the full log-softmax; `batch_logprobs` with those
    ids as `extra_ids` gives `# (N, T, 1 + k)`: the response token, then the same top-k values."""
    from dphrl.rl.logprobs import batch_logprobs, batch_topk_logprobs

    batch = _grouped_batch()
    top_logp, top_ids = batch_topk_logprobs(tiny_llama, batch, 4, pack_tokens=pack_tokens)
    assert top_logp.shape == top_ids.shape == (6, 6, 4)
    plain, _ = batch_logprobs(tiny_llama, batch, pack_tokens=0)
    T, L = batch.response_mask.shape[1], batch.input_ids.shape[1]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = tiny_llama(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits[:, L - T - 1 : L - 1]
    naive = logits.log_softmax(-1).topk(4, dim=-1)
    m = batch.response_mask.bool()
    torch.testing.assert_close(top_logp[m], naive.values[m], atol=1e-5, rtol=1e-5)
    assert (top_ids[m] == naive.indices[m]).all() and (top_logp[~m] == 0).all()
    both, _ = batch_logprobs(tiny_llama, batch, pack_tokens=pack_tokens, extra_ids=top_ids)
    assert both.shape == (6, 6, 5)
    torch.testing.assert_close(both[..., 0], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[..., 1:], top_logp, atol=1e-5, rtol=1e-5)
