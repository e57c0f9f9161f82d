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
    `dphrl.logprobs.response_logprobs` `# (N, T)` line up with it.
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
