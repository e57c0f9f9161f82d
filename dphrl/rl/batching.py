"""Prompt + response token lists packed into the padded tensors a causal LM scores.

Shared by `precompute-ref` and `train`, so the reference log-probs and the training log-probs
come from byte-identical inputs (the reason log r is exactly 0 before the first update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """Prompts left-padded, responses right-padded after them (verl's layout).

    input_ids, attention_mask: `# (N, P + T)`; the last T columns are the response slots.
    response_mask: `# (N, T)`, 1 on real response tokens. Per-token log-probs from
    `dphrl.rl.logprobs.response_logprobs` `# (N, T)` line up with it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: str) -> Packed:
        return Packed(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    def select(self, index: torch.Tensor | list[int] | slice) -> Packed:
        return Packed(self.input_ids[index], self.attention_mask[index], self.response_mask[index])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def share(n: int, parts: int, k: int) -> slice:
    """The k-th of `parts` contiguous, near-equal slices of n items (ranks, minibatches)."""
    return slice(k * n // parts, (k + 1) * n // parts)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Packed:
    """Left-pad the prompts to the longest, right-pad the responses to the longest."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    P = max(len(p) for p in prompts)
    T = max(max((len(r) for r in responses), default=0), 1)
    n = len(prompts)
    input_ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((n, P + T), dtype=torch.long)
    response = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p) : P] = 1
        if r:
            input_ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, P : P + len(r)] = 1
            response[i, : len(r)] = 1.0
    return Packed(input_ids, attention, response)


def pack_with(
    prompts: list[list[int]], responses: list[list[int]], values: list[list[float]], pad_id: int
) -> tuple[Packed, torch.Tensor]:
    """`pack`, with per-response-token `values` (log-probs) laid out on its response mask
    `# (N, T)`."""
    packed = pack(prompts, responses, pad_id)
    return packed, repad(values, packed.response_mask)


def unpad(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """Per-sequence lists of the values where mask is 1 (e.g. one log-prob per response token)."""
    return [row[m.bool()].tolist() for row, m in zip(values, mask)]


def repad(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpad`: place per-response values back at the mask's positions `# (N, T)`."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    for i, row in enumerate(values):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def pack_topk(rows: list[dict], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ref store's top-k ids and log-probs of `rows` (`ref_topk_ids`, `ref_topk_logprobs`:
    k per response token) laid on their packed response mask `# (M, S)`: `# (M, S, k)` int64
    and float32, 0 past each response's end."""
    k = next((len(r["ref_topk_ids"][0]) for r in rows if r["ref_topk_ids"]), 1)
    ids = torch.zeros(*mask.shape, k, dtype=torch.long)
    logp = torch.zeros(*mask.shape, k, dtype=torch.float32)
    for i, row in enumerate(rows):
        n = len(row["ref_topk_ids"])
        if n:
            ids[i, :n] = torch.tensor(row["ref_topk_ids"], dtype=torch.long)
            logp[i, :n] = torch.tensor(row["ref_topk_logprobs"], dtype=torch.float32)
    return ids, logp


@dataclass
class SharedPrefix:
    """Responses to one prompt packed into one row after a single copy of that prompt.

    Row layout: `[prompt, response_1, response_2, ...]`, right-padded to the longest row. Each
    response sees the prompt and its own earlier tokens, never another response, and its
    positions continue from the prompt's (`p, p+1, ...`), so every response token is computed
    as in its own padded row while the prompt runs once per row instead of once per response
    and no padding is computed between responses. The forward is `# (R, S)` with R rows of S
    tokens instead of `# (N, P + T)`.

    input_ids, position_ids: `# (R, S)`; segment: `# (R, S)` 0 on the prompt, k >= 1 on the
    k-th response of the row, -1 on padding. For each scored token (K of them, in `Packed`
    order): `source` `# (K,)` is the flat index into `# (R * S)` of the position that predicts
    it (the token before it, the prompt's last token for a response's first), `target` `# (K,)`
    its id, and `slot` `# (K,)` its flat index into the Packed `# (N * T)` response slots.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask `# (R, 1, S, S)`: 0 where query q may see key k, the dtype's
        minimum elsewhere. q sees k when k <= q and k is on the prompt or in q's own segment;
        padding sees only itself (so no softmax row is empty)."""
        seg = self.segment
        S = seg.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=seg.device).tril()  # (S, S)
        same = seg[:, :, None] == seg[:, None, :]  # (R, S, S)
        prompt_key = (seg == 0)[:, None, :]  # (R, 1, S)
        real_key = (seg >= 0)[:, None, :]
        allowed = causal & real_key & (prompt_key | same)
        allowed |= torch.eye(S, dtype=torch.bool, device=seg.device)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def share_prefixes(batch: Packed, max_tokens: int) -> SharedPrefix:
    """Re-lay a Packed batch so that responses to the same prompt share one copy of it.

    Rows with equal prompts (anywhere in the batch) go to the same packed rows, in batch order;
    a packed row takes responses while it holds at most `max_tokens` tokens (always at least
    one, so one long response gets a row of its own). Every real response token is placed and
    scored, also where `response_mask` is 0 (the caller multiplies by the mask, as for the
    padded layout); empty responses take no place, and a batch of them gives zero rows.
    """
    n, width = batch.input_ids.shape
    T = batch.response_mask.shape[1]
    P = width - T
    ids, attn = batch.input_ids.tolist(), batch.attention_mask.tolist()
    length = [sum(row[P:]) for row in attn]  # real response tokens per row
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(n):
        prompt = tuple(t for t, a in zip(ids[i][:P], attn[i][:P]) if a)
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: nothing predicts its first token")
        members = groups.setdefault(prompt, [])
        if length[i]:  # an empty response has nothing to score
            members.append(i)
    rows: list[tuple[tuple[int, ...], list[int]]] = []
    for prompt, members in groups.items():
        if not members:
            continue
        current: list[int] = []
        used = len(prompt)
        for i in members:
            if current and used + length[i] > max_tokens:
                rows.append((prompt, current))
                current, used = [], len(prompt)
            current.append(i)
            used += length[i]
        rows.append((prompt, current))
    S = max((len(p) + sum(length[i] for i in members) for p, members in rows), default=1)
    input_ids = torch.zeros((len(rows), S), dtype=torch.long)
    position_ids = torch.zeros((len(rows), S), dtype=torch.long)
    segment = torch.full((len(rows), S), -1, dtype=torch.long)
    source, target, slot = [], [], []
    for r, (prompt, members) in enumerate(rows):
        p = len(prompt)
        input_ids[r, :p] = torch.tensor(prompt)
        position_ids[r, :p] = torch.arange(p)
        segment[r, :p] = 0
        at = p
        for k, i in enumerate(members, start=1):
            m = length[i]
            input_ids[r, at : at + m] = torch.tensor(ids[i][P : P + m], dtype=torch.long)
            position_ids[r, at : at + m] = torch.arange(p, p + m)
            segment[r, at : at + m] = k
            for t in range(m):
                source.append(r * S + (p - 1 if t == 0 else at + t - 1))
                slot.append(i * T + t)
            target.extend(ids[i][P : P + m])
            at += m
    device = batch.input_ids.device
    tensors = [input_ids, position_ids, segment] + [
        torch.tensor(xs, dtype=torch.long) for xs in (source, target, slot)
    ]
    return SharedPrefix(*(t.to(device) for t in tensors))


def micro_slices(tokens: list[int], budget: int, parts: int | None = None) -> list[slice]:
    """Contiguous slices of the rows (`tokens`: one count per row) holding at most `budget`
    tokens each, filled greedily; a row over the budget makes a slice alone. 0 = no budget.

    With `parts` (every rank's count, the most any rank needs: FSDP's collectives need equal
    forwards on every rank) the biggest slice is halved until there are `parts`, and when
    there are fewer rows than that, empty slices close the list.
    """
    n = len(tokens)
    bounds = [0]
    filled = 0
    for i, count in enumerate(tokens):
        if budget > 0 and filled and filled + count > budget:
            bounds.append(i)
            filled = 0
        filled += count
    bounds.append(n)
    slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])] or [slice(0, 0)]
    while parts is not None and len(slices) < parts:
        widest = max(range(len(slices)), key=lambda k: slices[k].stop - slices[k].start)
        s = slices[widest]
        if s.stop - s.start < 2:
            slices += [slice(n, n)] * (parts - len(slices))
            break
        middle = (s.start + s.stop) // 2
        slices[widest : widest + 1] = [slice(s.start, middle), slice(middle, s.stop)]
    return slices
