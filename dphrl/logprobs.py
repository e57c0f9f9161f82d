"""Per-token log-probs of response tokens without a [batch, sequence, vocab] float32 log-softmax.

At Llama-3's vocabulary (128k) and a 4k response, one float32 copy of the logits is 2 GiB per
sequence, and the naive `logits.float().log_softmax(-1).gather(...)` holds several such copies
(upcast, log-softmax, and their gradients). Only two numbers per token are needed:

    log pi(y_t) = z_t[y_t] / tau - logsumexp(z_t / tau)      (tau = sampling temperature)

so the rows are processed in chunks of `chunk` tokens, each computing its logsumexp and gathered
logit, under activation checkpointing: the backward pass recomputes a chunk's logits instead of
keeping them. From hidden states (`hidden_logprobs`) the logits themselves are made chunk by
chunk from the lm_head weight, so neither full logits nor their float32 copy ever exist.
Dividing by the rollout temperature makes the log-probs those of the distribution that sampled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_stats(z: Tensor, ids: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
    """Log-prob of `ids` under logits `z` `# (n, V)` (float32), and the entropy when asked."""
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, logp.new_zeros(())
    with torch.no_grad():  # a metric: H = logsumexp(z) - sum_v softmax(z)_v z_v
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    return logp, entropy


def _from_logits(
    logits: Tensor, ids: Tensor, with_entropy: bool, temperature: float
) -> tuple[Tensor, Tensor]:
    return _chunk_stats(logits.float() / temperature, ids, with_entropy)


def _from_hidden(
    hidden: Tensor,
    ids: Tensor,
    with_entropy: bool,
    weight: Tensor,
    bias: Tensor | None,
    temperature: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    z = torch.nn.functional.linear(hidden, weight, bias).float()  # (n, V), as lm_head then .float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return _chunk_stats(z / temperature, ids, with_entropy)


def _chunked(
    fn: Callable[..., tuple[Tensor, Tensor]],
    rows: Tensor,
    ids: Tensor,
    chunk: int,
    with_entropy: bool,
    *params: object,
) -> tuple[Tensor, Tensor | None]:
    """Apply fn(rows, ids, with_entropy, *params) chunk by chunk over rows `# (N, ...)`, ids `# (N,)`.

    Checkpointing keeps only each chunk's inputs for the backward pass, so at most one chunk's
    `# (chunk, V)` float32 logits are alive at a time, forward or backward.
    """
    tensors = [rows, *(p for p in params if isinstance(p, Tensor))]
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    logps, entropies = [], []
    for start in range(0, rows.shape[0], chunk):
        part = (rows[start : start + chunk], ids[start : start + chunk], with_entropy, *params)
        if use_ckpt:
            logp, ent = checkpoint(fn, *part, use_reentrant=False)
        else:
            logp, ent = fn(*part)
        logps.append(logp)
        entropies.append(ent)
    logp = torch.cat(logps) if logps else rows.new_zeros(0, dtype=torch.float32)
    entropy = torch.cat(entropies) if with_entropy and entropies else None
    return logp, entropy


def token_logprobs(
    logits: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature)[ids], chunked over tokens, in float32.

    logits `# (..., V)` (any float dtype), ids `# (...)` -> log-probs `# (...)` float32, and the
    per-token entropy `# (...)` (detached, for metrics) when `with_entropy`, else None.
    Equal to `(logits.float() / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]`
    in value and gradient.
    """
    shape = ids.shape
    logp, entropy = _chunked(
        _from_logits,
        logits.reshape(-1, logits.shape[-1]),
        ids.reshape(-1),
        chunk,
        with_entropy,
        temperature,
    )
    return logp.view(shape), None if entropy is None else entropy.view(shape)


def hidden_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ids from final hidden states, making the logits chunk by chunk.

    hidden `# (..., H)`, weight `# (V, H)` (lm_head), ids `# (...)` -> `# (...)` float32.
    logits = hidden @ weight.T + bias, optionally soft-capped (tanh(z / c) c, as Gemma-2),
    then divided by `temperature`. Peak extra memory is about `chunk x V` float32 values
    rather than the `N x V` of full logits; gradients reach hidden, weight and bias.
    """
    shape = ids.shape
    logp, entropy = _chunked(
        _from_hidden,
        hidden.reshape(-1, hidden.shape[-1]),
        ids.reshape(-1),
        chunk,
        with_entropy,
        weight,
        bias,
        temperature,
        softcap,
    )
    return logp.view(shape), None if entropy is None else entropy.view(shape)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    from_hidden: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens of a batch under a Hugging Face causal LM.

    Layout (as verl's): each row of input_ids `# (B, L)` is a prompt (left-padded) followed by
    its response (right-padded) in the last T columns; response_mask `# (B, T)` marks the real
    response tokens; attention_mask `# (B, L)` marks every real token. Positions count real
    tokens only (cumsum of the attention mask), as in generation.
    Returns log-probs `# (B, T)` float32, 0 where response_mask is 0, and the entropy `# (B, T)`
    (detached) when `with_entropy`.

    `from_hidden=True` runs the decoder body and makes logits chunk by chunk from the lm_head
    weight, so full logits never exist. It calls `model.base_model` directly, bypassing the
    root module's forward; under FSDP2 with the lm_head in the root group use
    `from_hidden=False`, which calls the whole model for the response logits (in model dtype)
    and only chunks the float32 log-softmax.
    """
    T = response_mask.shape[1]
    L = input_ids.shape[1]
    if T >= L:
        raise ValueError(f"response length {T} must be shorter than the sequence {L}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    targets = input_ids[:, L - T :] * response_mask.long()  # (B, T); masked ids -> 0, valid index
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if from_hidden:
        hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state  # (B, L, H)
        head = model.get_output_embeddings()
        logp, entropy = hidden_logprobs(
            hidden[:, L - T - 1 : L - 1],  # position t predicts token t + 1
            head.weight,
            targets,
            bias=head.bias,
            temperature=temperature,
            softcap=getattr(model.config, "final_logit_softcapping", None),
            chunk=chunk,
            with_entropy=with_entropy,
        )
    else:
        logits = model(input_ids=input_ids, logits_to_keep=T + 1, **kwargs).logits  # (B, T+1, V)
        logp, entropy = token_logprobs(
            logits[:, :-1], targets, temperature=temperature, chunk=chunk, with_entropy=with_entropy
        )
    mask = response_mask.to(logp.dtype)
    return logp * mask, None if entropy is None else entropy * mask
