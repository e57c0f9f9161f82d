"""The memory plan's arithmetic: bytes of each item from a model's shape and token counts.

Pure functions of plain numbers, each with its formula; `dphrl.memory.plan` puts them together
from the config. b is the compute dtype's bytes, T the tokens of one forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dphrl.memory.shape import ModelShape

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGPROB_CHUNK = 1024  # tokens per head chunk (dphrl.rl.logprobs' default, which train uses)
VLLM_BATCHED_TOKENS = 8192  # vLLM's profile run (max_num_batched_tokens) sizes its activations
VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs: the sampler's float32 logits rows
VLLM_GRAPHS_BYTES = GIB // 2  # CUDA graphs when engine.vllm.enforce_eager=false (an estimate)


def layer_activation_bytes(shape: ModelShape, b: int) -> int:
    """a = 2 (4 + 2b) h + 5 b q + 4 heads + 4 b i: bytes autograd keeps per token of one layer."""
    s = shape
    return 2 * (4 + 2 * b) * s.hidden + 5 * b * s.q_dim + 4 * s.heads + 4 * b * s.intermediate


def activation_bytes(shape: ModelShape, tokens: int, b: int, checkpointing: bool) -> int:
    """T (L a + n), or with gradient checkpointing T (L h b + a + n): each layer's input kept,
    one layer's activations remade at a time in the backward; n = (4 + 2b) h, the final norm."""
    a, n = layer_activation_bytes(shape, b), (4 + 2 * b) * shape.hidden
    if checkpointing:
        return tokens * (shape.layers * shape.hidden * b + a + n)
    return tokens * (shape.layers * a + n)


def head_bytes(shape: ModelShape, tokens: int, b: int, full_logits: bool) -> int:
    """The log-prob head (`dphrl.rl.logprobs`). From hidden states: one float32 chunk of
    logits and its gradient in the head's dtype, chunk V (4 + b). With full logits (FSDP2's
    whole-model forward): the logits and their picked copy, then its gradient and the
    logits', 2 T V b, besides the float32 chunk."""
    chunk = LOGPROB_CHUNK * shape.vocab
    if full_logits:
        return 2 * tokens * shape.vocab * b + 4 * chunk
    return chunk * (4 + b)


def mask_bytes(tokens: int, width: int, b: int) -> int:
    """ceil(T / S) rows of an S x S additive mask in the compute dtype (shared-prefix rows)."""
    return math.ceil(tokens / width) * width * width * b


def gathered_bytes(shape: ModelShape, b: int) -> int:
    """FSDP2 with compute dtype b (`dphrl.dist.shard`): the root group (embeddings, final norm,
    lm_head) stays float32 and unsharded through the forward and backward, with the lm_head's
    full float32 gradient until the root's reduce-scatter; two layers in flight in b (one
    computing, one prefetched); one layer's gradient in b and in float32."""
    s = shape
    return 4 * (s.root_params + s.head_params) + b * 2 * s.layer_params + (b + 4) * s.layer_params


def kv_bytes_per_token(shape: ModelShape, b: int, tensor_parallel: int = 1) -> int:
    """2 L kv_heads head_dim b: one token's keys and values in every layer."""
    return 2 * shape.layers * shape.kv_dim * b // tensor_parallel


def vllm_overhead_bytes(shape: ModelShape, b: int, eager: bool) -> int:
    """vLLM's share beyond weights and KV: its profile run's activations (8192 batched tokens
    through the MLP's gate and up plus four hidden-wide tensors), the sampler's float32
    logits of 256 sequences, and CUDA graphs unless enforce_eager."""
    act = VLLM_BATCHED_TOKENS * (2 * shape.intermediate + 4 * shape.hidden) * b
    return act + VLLM_MAX_SEQS * shape.vocab * 4 + (0 if eager else VLLM_GRAPHS_BYTES)


@dataclass(frozen=True)
class Tokens:
    """The worst case of one training forward: positions forwarded, response tokens among
    them (the head's rows) and the widest row; `how` says where the count comes from."""

    forward: int
    response: int
    width: int
    how: str


def forward_tokens(
    *,
    prompts_per_step: int,
    group_size: int,
    minibatch_size: int,
    ref_batch_size: int,
    world: int,
    prompt_len: int,
    response_len: int,
    pack_tokens: int,
    micro_batch_tokens: int,
) -> Tokens:
    """The tokens a rank forwards at once, at the longest prompt and response.

    A rank holds n = G ceil(prompts / W) rollouts and ceil(ref / W) store rows; a minibatch
    takes m = minibatch_size of them (all when 0) and its share of the store rows. Packed
    (`model.pack_tokens` > 0) a group's prompt is forwarded once: ceil(m / G) + 1 prompts of
    P and m responses of R (a minibatch may cut a group); padded, m (P + R). Store rows are
    P + R each. `trainer.micro_batch_tokens` bounds a forward, but never below one row.
    """
    P, R, G = prompt_len, response_len, group_size
    n = G * math.ceil(prompts_per_step / world)
    m = min(minibatch_size or n, n)
    store = math.ceil(math.ceil(ref_batch_size / world) / math.ceil(n / m)) if ref_batch_size else 0
    if pack_tokens:
        width = max(min(pack_tokens, P + G * R), P + R)
        groups = min(math.ceil(m / G) + (m % G != 0), math.ceil(n / G))
        rollouts = groups * P + m * R
    else:
        width = P + R
        rollouts = m * (P + R)
    whole = rollouts + store * (P + R)
    response = (m + store) * R
    if micro_batch_tokens:
        budget = max(micro_batch_tokens, width)
        how = f"trainer.micro_batch_tokens={micro_batch_tokens}"
        if budget > micro_batch_tokens:
            how += f", but one row is {width:,} (P {P:,} + R {R:,})"
        return Tokens(min(budget, whole), min(budget, response), width, how)
    how = f"the whole minibatch at worst: {m} rollouts + {store} store rows, P {P:,}, R {R:,}"
    return Tokens(whole, response, width, how)
