"""DAPO's filters on rollouts (Yu et al. 2025, arXiv 2503.14476): dynamic sampling's test for
informative groups, overlong filtering, and the soft overlong penalty."""

from __future__ import annotations

import torch
from torch import Tensor


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: True for each group whose rewards are not all equal.

    A group that is all correct or all wrong has zero advantage for every response, so it adds
    nothing but noise to the batch; DAPO drops it and samples more prompts.
    rewards `# (B*G,)` -> keep `# (B,)` bool.
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    return grouped.amax(dim=-1) > grouped.amin(dim=-1)


def overlong_filter(mask: Tensor, finished: Tensor, max_len: int) -> Tensor:
    """DAPO overlong filtering: zero the loss mask of responses cut at the length limit.

    A response that reached `max_len` tokens without finishing (no EOS / stop string) is
    truncated, not wrong, so its reward says little; its tokens get no loss.
    mask `# (N, T)`, finished `# (N,)` bool -> mask `# (N, T)`.
    """
    truncated = (mask.sum(dim=-1) >= max_len) & ~finished  # (N,)
    return mask * (~truncated).unsqueeze(-1).to(mask.dtype)


def soft_overlong_penalty(
    lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment, added to each response's reward:

        0                                   if L <= max_len - buffer
        factor * (max_len - buffer - L) / buffer   in between (linear from 0 to -factor)
        -factor                             if L >= max_len

    Responses near the length limit lose reward gradually instead of being cut off unseen.
    lengths `# (N,)` response token counts -> penalty `# (N,)` (<= 0).
    """
    over = (lengths.to(torch.float32) - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * over / buffer
