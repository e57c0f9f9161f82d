"""Per-token log-probs of response tokens without a [batch, sequence, vocab] float32 log-softmax.

At Llama-3's vocabulary (128k) and a 4k response, one float32 copy of the logits is 2 GiB per
sequence, and the naive `logits.float().log_softmax(-1).gather(...)` holds several such copies
(upcast, log-softmax, and their gradients). Only two numbers per token are needed:

    log pi(y_t) = z_t[y_t] - logsumexp(z_t),   z_t = logits_t / tau   (tau: sampling temperature)

and the gradient has a closed form, d log pi(y_t) / d z_t = onehot(y_t) - softmax(z_t). So rows
are processed in chunks of `chunk` tokens with a hand-written backward: the forward pass keeps
only the logsumexp per token, the backward pass remakes a chunk's logits and turns them into
their gradient in place. From hidden states (`hidden_logprobs`) the logits are made chunk by
chunk from the lm_head weight, so neither full logits nor their float32 copy ever exist; peak
extra memory is about one `# (chunk, V)` float32 buffer. Dividing by the rollout temperature
makes the log-probs those of the distribution that sampled the tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from dphrl.rl.batching import Packed, share_prefixes


def _forward_stats(z: Tensor, ids: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of ids, logsumexp and entropy (or an empty tensor) from scaled logits z `# (n, V)`.

    ids `# (n,)` (one token per row) or `# (n, J)` (J tokens per row: log-probs `# (n, J)`).
    z is a float32 scratch buffer and is overwritten. Entropy, with e = exp(z - max), s = sum e:
    H = -sum p log p = log s - sum(e (z - max)) / s.
    """
    picked = z.gather(-1, ids.view(len(ids), -1))  # (n, J)
    top = z.amax(dim=-1, keepdim=True)  # (n, 1)
    z.sub_(top)
    if with_entropy:
        e = torch.exp(z)
        total = e.sum(dim=-1)
        entropy = total.log() - e.mul_(z).sum(dim=-1) / total
    else:
        total = z.exp_().sum(dim=-1)
        entropy = z.new_empty(0)
    lse = top.squeeze(-1) + total.log()
    return (picked - lse.unsqueeze(-1)).view(ids.shape), lse, entropy


def _concat(outs: list[tuple[Tensor, Tensor, Tensor]], like: Tensor) -> tuple[Tensor, ...]:
    """Join the per-chunk (logp, lse, entropy); no chunks (no tokens) gives empty tensors."""
    if not outs:
        return tuple(like.new_empty(0, dtype=torch.float32) for _ in range(3))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def _grad_scaled_logits(
    z: Tensor,
    lse: Tensor,
    ids: Tensor,
    grad: Tensor | None,
    entropy: Tensor | None = None,
    grad_entropy: Tensor | None = None,
) -> Tensor:
    """d(sum grad * logp + sum grad_entropy * H) / dz, computed in place in z `# (n, V)`.

    With p = softmax(z): d log p(y) / dz = onehot(y) - p, and the entropy's
    dH / dz = -p (log p + H). ids `# (n,)` or `# (n, J)`, grad shaped like ids (None: 0)."""
    n = len(ids)
    cols = ids.view(n, -1)  # (n, J)
    g = (
        torch.zeros(cols.shape, dtype=z.dtype, device=z.device)
        if grad is None
        else grad.view(n, -1)
    )
    z.sub_(lse.unsqueeze(-1))  # log p
    if grad_entropy is None:
        z.exp_().mul_(-g.sum(-1, keepdim=True))
    else:
        p = torch.exp(z)
        z.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
        z.sub_(p.mul_(g.sum(-1, keepdim=True)))
    return z.scatter_add_(-1, cols, g)


def _part(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if t is None else t[start:stop]


class _LogitsLogprobs(torch.autograd.Function):
    """Chunked log-softmax-gather over given logits `# (N, V)`; keeps only logsumexp `# (N,)`."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, with_entropy):
        outs = []
        for s in range(0, logits.shape[0], chunk):
            z = logits[s : s + chunk].to(torch.float32, copy=True).div_(temperature)
            outs.append(_forward_stats(z, ids[s : s + chunk], with_entropy))
        logp, lse, entropy = _concat(outs, logits)
        ctx.save_for_backward(logits, ids, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused entropy costs no backward work
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        logits, ids, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            z = logits[s:e].to(torch.float32, copy=True).div_(ctx.temperature)
            gz = _grad_scaled_logits(
                z, lse[s:e], ids[s:e], _part(grad_logp, s, e), _part(entropy, s, e),
                _part(grad_entropy, s, e),
            )  # fmt: skip
            grad_logits[s:e] = gz.div_(ctx.temperature)
        return grad_logits, None, None, None, None


def _scaled_logits(h, weight, bias, temperature, softcap) -> tuple[Tensor, Tensor | None]:
    """z = cap(h W^T + b) / tau as a fresh float32 `# (n, V)`, and tanh(raw / c) when soft-capped.

    The matmul runs in the lm_head's dtype even inside a `torch.autocast` region (the trainer's
    `model.autocast`): bfloat16 keeps 8 bits of mantissa, so a logit near 20 would carry an
    error near 0.06 into every log-prob, the PPO ratio and log(pi / pi_ref) alike.
    """
    with torch.autocast(h.device.type, enabled=False):
        raw = F.linear(h.to(weight.dtype), weight, bias).float()  # as lm_head, then .float()
    if softcap is None:
        return raw.div_(temperature), None
    t = raw.div_(softcap).tanh_()
    return t * (softcap / temperature), t


class _HiddenLogprobs(torch.autograd.Function):
    """Chunked lm_head + log-softmax-gather from hidden `# (N, H)`; logits never exist in full."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, softcap, chunk, with_entropy):
        outs = []
        for s in range(0, hidden.shape[0], chunk):
            z, _ = _scaled_logits(hidden[s : s + chunk], weight, bias, temperature, softcap)
            outs.append(_forward_stats(z, ids[s : s + chunk], with_entropy))
        logp, lse, entropy = _concat(outs, hidden)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, entropy)
        ctx.args = (temperature, softcap, chunk)
        ctx.set_materialize_grads(False)  # an unused entropy costs no backward work
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, lse, entropy = ctx.saved_tensors
        temperature, softcap, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # The weight's gradient accumulates in its own dtype, as autograd would: a float32
        # accumulator for a bf16 lm_head would cost more than a chunk (128k x 4096 x 4 B = 2 GiB).
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_b
            else None
        )
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            z, t = _scaled_logits(h, weight, bias, temperature, softcap)
            e = s + chunk
            g = _grad_scaled_logits(
                z, lse[s:e], ids[s:e], _part(grad_logp, s, e), _part(entropy, s, e),
                _part(grad_entropy, s, e),
            )  # fmt: skip
            if t is not None:  # z = c tanh(raw / c) / tau  =>  dz/draw = (1 - tanh^2) / tau
                g.mul_(t.square_().neg_().add_(1))
            g.div_(temperature)  # (n, V) float32: gradient w.r.t. the raw logits h W^T + b
            if need_b:
                grad_b += g.sum(dim=0)
            g = g.to(weight.dtype)  # matmuls in the model's dtype (tensor cores for bf16)
            if need_h:
                grad_h[s : s + chunk] = g @ weight
            if need_w:
                grad_w.addmm_(g.T, h.to(weight.dtype))
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def autocast(device: str, dtype: str | None):
    """`torch.autocast` in `dtype` on `device`'s kind (`model.autocast`; the backward follows
    the forward's dtypes), or a context that changes nothing when `dtype` is None. The lm_head
    and log-softmax inside it stay in the weights' dtype (`_scaled_logits`)."""
    return torch.autocast(
        device.split(":")[0], dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None
    )


def _flat_ids(ids: Tensor, row_dims: int) -> Tensor:
    """ids `# (...)` -> `# (n,)`, or `# (..., J)` (J tokens per row) -> `# (n, J)`."""
    return ids.reshape(-1) if ids.dim() == row_dims else ids.reshape(-1, ids.shape[-1])


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 token")


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
    per-token entropy `# (...)` when `with_entropy` (differentiable: dH/dz = -p (log p + H)),
    else None. ids `# (..., J)` scores J tokens per position: log-probs `# (..., J)`.
    Equal to `(logits.float() / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]`
    in value and gradient; the logits and their gradient exist in full, but no float32
    log-softmax copy does.
    """
    _check_chunk(chunk)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = ids.shape[: logits.dim() - 1]
    flat_ids = _flat_ids(ids, logits.dim() - 1)
    logp, entropy = _LogitsLogprobs.apply(flat, flat_ids, temperature, chunk, with_entropy)
    return logp.view(ids.shape), entropy.view(rows) if with_entropy else None


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

    hidden `# (..., H)`, weight `# (V, H)` (lm_head), ids `# (...)` -> `# (...)` float32, or
    ids `# (..., J)` -> `# (..., J)` (J tokens per position); entropy `# (...)` as `token_logprobs`.
    logits = hidden @ weight.T + bias, optionally soft-capped (tanh(z / c) c, as Gemma-2),
    then divided by `temperature`. Peak extra memory is about one `# (chunk, V)` float32 buffer
    rather than several `# (N, V)` ones; gradients reach hidden, weight and bias.
    """
    _check_chunk(chunk)
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = ids.shape[: hidden.dim() - 1]
    logp, entropy = _HiddenLogprobs.apply(
        flat, weight, bias, _flat_ids(ids, hidden.dim() - 1), temperature, softcap, chunk,
        with_entropy,
    )  # fmt: skip
    return logp.view(ids.shape), entropy.view(rows) if with_entropy else None


def decoder_hidden(model: torch.nn.Module, input_ids: Tensor, **kwargs: Any) -> Tensor:
    """The decoder body's last hidden states `# (B, L, H)` (after its final norm).

    On one process the body runs alone (`model.base_model`). Under FSDP2 the root module's
    forward must run, since it is what all-gathers the root's parameters (embeddings, final
    norm, lm_head) and registers their gradients' reduce-scatter; so the whole model runs with
    one position's logits kept, and a hook takes the body's output. FSDP2 leaves the root's
    parameters gathered after the forward (they are needed again in the backward), so the
    lm_head weight read next (`model.get_output_embeddings().weight`) is the full one, and
    its gradient is reduce-scattered with the root's at the end of the backward.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model.base_model(input_ids=input_ids, **kwargs).last_hidden_state
    captured: list[Tensor] = []
    hook = model.base_model.register_forward_hook(
        lambda _module, _args, out: captured.append(out.last_hidden_state)
    )
    try:
        model(input_ids=input_ids, logits_to_keep=1, **kwargs)
    finally:
        hook.remove()
    return captured[0]


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
    extra_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens of a batch under a Hugging Face causal LM.

    Layout (as verl's): each row of input_ids `# (B, L)` is a prompt (left-padded) followed by
    its response (right-padded) in the last T columns; response_mask `# (B, T)` marks the real
    response tokens; attention_mask `# (B, L)` marks every real token. Positions count real
    tokens only (cumsum of the attention mask), as in generation.
    Returns log-probs `# (B, T)` float32, 0 where response_mask is 0, and the entropy `# (B, T)`
    when `with_entropy`. `extra_ids` `# (B, T, J)` scores J more tokens at each response
    position (the ref store's top-k): log-probs `# (B, T, 1 + J)`, [..., 0] the response token.

    `from_hidden=True` runs the decoder body (`decoder_hidden`, FSDP2 too) and makes logits
    chunk by chunk from the lm_head weight, so full logits never exist. `from_hidden=False`
    calls the whole model for the response logits (in model dtype) and only chunks the float32
    log-softmax: the reference the chunked path is tested against.
    """
    T = response_mask.shape[1]
    L = input_ids.shape[1]
    if T >= L:
        raise ValueError(f"response length {T} must be shorter than the sequence {L}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    targets = input_ids[:, L - T :] * response_mask.long()  # (B, T); masked ids -> 0, valid index
    if extra_ids is not None:  # (B, T, 1 + J)
        targets = torch.cat(
            [targets.unsqueeze(-1), extra_ids * response_mask.long()[..., None]], -1
        )
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if from_hidden:
        hidden = decoder_hidden(model, input_ids, **kwargs)  # (B, L, H)
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
    return logp * (mask if extra_ids is None else mask[..., None]), (
        None if entropy is None else entropy * mask
    )


def batch_logprobs(
    model: torch.nn.Module,
    batch: Packed,
    *,
    pack_tokens: int = 0,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    from_hidden: bool = True,
    extra_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`response_logprobs` of a Packed batch, with responses to one prompt sharing its forward.

    With `pack_tokens > 0` the batch is re-laid by `dphrl.rl.batching.share_prefixes` (rows of at
    most that many tokens: one prompt, then its responses, each masked from the others), so the
    forward runs over the real tokens once each: a group of G responses of mean length t to a
    prompt of p tokens costs p + G t token-forwards instead of G (p + T_max). The values are
    those of the padded layout up to float rounding (same positions, same visible tokens), and
    so are the gradients. `pack_tokens=0` is the padded layout. Returns `# (N, T)` like
    `response_logprobs`, 0 where `batch.response_mask` is 0; with `extra_ids` `# (N, T, J)`,
    `# (N, T, 1 + J)` as there.
    """
    T = batch.response_mask.shape[1]
    if pack_tokens <= 0 or not batch.attention_mask[:, -T:].any():
        return response_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_mask,
            temperature=temperature,
            chunk=chunk,
            with_entropy=with_entropy,
            from_hidden=from_hidden,
            extra_ids=extra_ids,
        )
    attn_impl = getattr(model.config, "_attn_implementation", None) or ""
    if "flash" in attn_impl:
        raise ValueError(
            f"model.pack_tokens={pack_tokens} needs an attention that takes a 4D mask "
            f"(sdpa or eager), not {attn_impl}; set model.pack_tokens=0"
        )
    sp = share_prefixes(batch, pack_tokens)
    target = sp.target  # (K,), or (K, 1 + J) with the extra ids of each token's position
    if extra_ids is not None:
        extra = extra_ids.reshape(-1, extra_ids.shape[-1])[sp.slot]  # (K, J)
        target = torch.cat([target.unsqueeze(-1), extra], -1)
    dtype = next(model.parameters()).dtype
    kwargs = dict(
        attention_mask=sp.attention_bias(dtype), position_ids=sp.position_ids, use_cache=False
    )
    R, S = sp.input_ids.shape
    if from_hidden:
        hidden = decoder_hidden(model, sp.input_ids, **kwargs)  # (R, S, H)
        head = model.get_output_embeddings()
        logp, entropy = hidden_logprobs(
            hidden.reshape(R * S, -1)[sp.source],  # (K, H)
            head.weight,
            target,
            bias=head.bias,
            temperature=temperature,
            softcap=getattr(model.config, "final_logit_softcapping", None),
            chunk=chunk,
            with_entropy=with_entropy,
        )
    else:  # the whole model's forward (FSDP2's root unshards the lm_head), logits where needed
        keep = torch.unique(sp.source % S)  # (K',) sorted positions that predict some token
        logits = model(input_ids=sp.input_ids, logits_to_keep=keep, **kwargs).logits  # (R, K', V)
        column = torch.searchsorted(keep, sp.source % S)
        picked = logits.reshape(R * len(keep), -1)[(sp.source // S) * len(keep) + column]
        logp, entropy = token_logprobs(
            picked, target, temperature=temperature, chunk=chunk, with_entropy=with_entropy
        )
    mask = batch.response_mask
    width = logp.shape[1:]  # () or (1 + J,)
    out = logp.new_zeros(mask.numel(), *width).index_put((sp.slot,), logp)
    out = out.view(*mask.shape, *width)  # (N, T) or (N, T, 1 + J)
    if extra_ids is not None:
        mask = mask[..., None]
    ent = None
    if entropy is not None:
        rmask = batch.response_mask
        ent = entropy.new_zeros(rmask.numel()).index_put((sp.slot,), entropy).view(rmask.shape)
        ent = ent * rmask.to(ent.dtype)
    return out * mask.to(out.dtype), ent


@torch.no_grad()
def batch_topk_logprobs(
    model: torch.nn.Module, batch: Packed, k: int, *, pack_tokens: int = 0, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """The model's k most likely next tokens at each response position, and their log-probs.

    What precompute-ref stores for `divergence=forward_kl_topk` (`ref.topk`): at the position
    that predicts response token t, the ids `# (N, T, k)` int64 and log-probs `# (N, T, k)`
    float32 (descending) of softmax(z), z = the lm_head's logits at temperature 1 made chunk by
    chunk as in `hidden_logprobs` (so the policy's log-probs of these ids at step 0 equal them
    up to rounding). 0 where `batch.response_mask` is 0. Same layouts as `batch_logprobs`.
    """
    hidden, slot = _response_hidden(model, batch, pack_tokens)  # (K, H), (K,)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    values, ids = [], []
    for s in range(0, hidden.shape[0], chunk):
        z, _ = _scaled_logits(hidden[s : s + chunk], head.weight, head.bias, 1.0, softcap)
        top, idx = z.topk(k, dim=-1)  # (n, k)
        values.append(top - torch.logsumexp(z, dim=-1, keepdim=True))
        ids.append(idx)
    N, T = batch.response_mask.shape
    logp = hidden.new_zeros(N * T, k, dtype=torch.float32)
    top_ids = torch.zeros(N * T, k, dtype=torch.long, device=hidden.device)
    if values:
        logp = logp.index_put((slot,), torch.cat(values))
        top_ids = top_ids.index_put((slot,), torch.cat(ids))
    mask = batch.response_mask.reshape(-1, 1)
    return (logp * mask).view(N, T, k), (top_ids * mask.long()).view(N, T, k)


def _response_hidden(
    model: torch.nn.Module, batch: Packed, pack_tokens: int
) -> tuple[Tensor, Tensor]:
    """Final hidden states `# (K, H)` at the positions that predict response tokens, and each
    one's flat slot `# (K,)` in the `# (N * T)` response grid (padded or shared-prefix layout)."""
    N, T = batch.response_mask.shape
    if pack_tokens <= 0 or not batch.attention_mask[:, -T:].any():
        L = batch.input_ids.shape[1]
        position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=position_ids, use_cache=False,
        ).last_hidden_state  # fmt: skip
        slot = torch.arange(N * T, device=hidden.device)
        return hidden[:, L - T - 1 : L - 1].reshape(N * T, -1), slot
    sp = share_prefixes(batch, pack_tokens)
    dtype = next(model.parameters()).dtype
    hidden = model.base_model(
        input_ids=sp.input_ids, attention_mask=sp.attention_bias(dtype),
        position_ids=sp.position_ids, use_cache=False,
    ).last_hidden_state  # fmt: skip
    return hidden.reshape(-1, hidden.shape[-1])[sp.source], sp.slot


def live_rows_logprobs(
    forward: Callable[[Packed], Tensor],
    batch: Packed,
    live: Tensor,  # (N,) bool: the rows whose log-probs can move the loss
    base: Tensor | None,  # (N, T) what the other rows hold (their old log-probs); None: zeros
    forward_always: bool,
) -> Tensor:
    """`forward` `# (N, T)` of `batch`, run on the `live` rows alone; the others hold `base`.

    A response whose advantage is exactly 0 (a group whose rewards are all equal: the usual
    case on hard or easy prompts) adds -min(rho 0, clip(rho) 0) = 0 to the PPO-clip loss and
    nothing to its gradient or clip fraction, whatever rho is. When that loss is all the
    rollouts carry, such rows can skip the forward holding their old log-probs (rho = 1): the
    loss, its gradient and every statistic equal the full forward's, at the cost of the live
    rows alone. `forward_always` (FSDP2 over several ranks, whose collectives must match)
    forwards one row even when none is live.
    """
    if bool(live.all()):
        return forward(batch)
    out = torch.zeros_like(batch.response_mask) if base is None else base.detach().clone()
    if not bool(live.any()):
        if not forward_always:
            return out
        live = live.clone()
        live[0] = True
    rows = live.nonzero()[:, 0]
    return out.index_put((rows,), forward(batch.select(rows)))  # forward: (k, T)
