"""The RL part of DPH-RL on D_exp: GRPO group advantages, PPO-clip, loss aggregation, DAPO filters.

Sources: GRPO (Shao et al. 2024, arXiv 2402.03300) for group-normalised advantages; PPO
(Schulman et al. 2017, arXiv 1707.06347) for the clipped surrogate; DAPO (Yu et al. 2025,
arXiv 2503.14476) for clip-higher, dynamic sampling and overlong filtering. Rollouts are laid out
group by group: rows [g*G, (g+1)*G) hold the G responses to prompt g, so B prompts make B*G rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group_size: int, *, norm_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO's outcome advantage, one value per response: A_i = (r_i - mean_g) / (std_g + eps).

    mean_g and std_g are over the G responses to the same prompt; std is the unbiased sample
    std (torch.std, as GRPO implementations use). `norm_std=False` keeps only r_i - mean_g
    (Dr. GRPO). A group whose rewards are all equal gets zero advantage either way.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # (B, G)
    if norm_std:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(-1)  # (B*G,)


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss with DAPO's decoupled clip range, and the clip fraction.

        rho = exp(logp - old_logp)
        loss_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)

    clip_high > clip_low ("clip-higher") lets low-probability tokens with A > 0 grow further
    before the gradient stops, which DAPO found keeps entropy from collapsing.

    Shapes: logp, old_logp, mask `# (N, T)`; advantages `# (N,)` (one per response) or `# (N, T)`.
    Returns the per-token loss `# (N, T)` (zero where mask is 0; aggregate it with `aggregate`)
    and the fraction of unmasked tokens where the clipped term is the active one (a scalar).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = torch.maximum(unclipped, clipped) * mask
    was_clipped = (clipped > unclipped).to(mask.dtype) * mask
    clip_frac = was_clipped.sum() / mask.sum().clamp(min=1)
    return loss, clip_frac.detach()


def token_mean(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Sum over every unmasked token of the batch / number of such tokens (DAPO, the default).

    Long responses weigh in proportion to their length. `denom` overrides the token count, e.g.
    with the count over all micro-batches and ranks, so gradients add up to the full-batch mean.
    """
    total = (values * mask).sum()
    return total / (mask.sum().clamp(min=1) if denom is None else denom)


def seq_mean_token_sum(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Sum over each response's tokens, mean over responses (Dr. GRPO's unnormalised length)."""
    per_seq = (values * mask).sum(dim=-1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) if denom is None else denom)


def seq_mean_token_mean(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Mean over each response's tokens, then mean over responses (the original GRPO)."""
    per_seq = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) if denom is None else denom)


def _num_seqs(mask: Tensor) -> Tensor:
    """Responses with at least one unmasked token: a fully masked one (e.g. overlong) counts 0."""
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1)


Aggregation = Callable[[Tensor, Tensor, float | None], Tensor]

# `algo.loss_agg` -> (values (N, T), mask (N, T), denom) -> scalar.
AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-mean": seq_mean_token_mean,
}


def aggregate(
    values: Tensor, mask: Tensor, mode: str = "token-mean", denom: float | None = None
) -> Tensor:
    """Reduce per-token values `# (N, T)` under `mask` `# (N, T)` to a scalar by `mode`."""
    if mode not in AGGREGATIONS:
        raise KeyError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[mode](values, mask, denom)


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
