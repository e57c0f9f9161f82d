"""Advantages from a group's rewards, chosen by `algo.advantage` through `ADVANTAGES`.

- `grpo`: GRPO's group-normalised outcome advantage (Shao et al. 2024, arXiv 2402.03300); with
  `algo.norm_std=false`, Dr. GRPO's centred rewards.
- `passk`: the analytic Pass@k advantages (Chen et al. 2025, arXiv 2508.10751).
- `maxrl`: MaxRL's advantage, the group mean as divisor (Tajwar et al. 2026, arXiv 2602.02710).

Rollouts are laid out group by group: rows [g*G, (g+1)*G) hold the G responses to prompt g, so
B prompts make B*G rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group_size: int, *, norm_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO's outcome advantage, one value per response: A_i = (r_i - mean_g) / (std_g + eps).

    mean_g and std_g are over the G responses to the same prompt; std is the unbiased sample
    std (torch.std, as GRPO implementations use). `norm_std=False` keeps only r_i - mean_g
    (Dr. GRPO). A group whose rewards are all equal gets exactly zero advantage either way: the
    float32 mean of equal values that are not 0/1 (partial credit, 0.3) can miss them by an ulp,
    and dividing that by a near-zero std would give every response the same nonzero advantage.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # (B, G)
    if norm_std:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    equal = grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)  # (B, 1)
    return centred.masked_fill(equal, 0.0).reshape(-1)  # (B*G,)


def passk_advantages(rewards: Tensor, group_size: int, k: int, *, threshold: float = 1.0) -> Tensor:
    """Analytic Pass@k advantages (Chen et al. 2025, "Pass@k Training", arXiv 2508.10751).

    A group of n = G responses with c correct (reward >= threshold) has the unbiased
    pass@k estimate and its std over the group:

        rho = 1 - C(n - c, k) / C(n, k),     sigma = sqrt(rho (1 - rho))
        A_correct = (1 - rho) / sigma
        A_wrong   = (1 - rho - C(n - c - 1, k - 1) / C(n - 1, k - 1)) / sigma

    A group that passes surely (rho = 1) or never (rho = 0) has sigma = 0 and gets 0, like an
    all-equal GRPO group. k = 1 gives GRPO's advantages with the population std.
    rewards `# (B*G,)` -> `# (B*G,)` float32.
    """
    n = group_size
    if rewards.dim() != 1 or rewards.numel() % n != 0:
        raise ValueError(f"rewards must be (B*G,) with G={n}; got {tuple(rewards.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"passk k={k} must be in [1, group size {n}]")
    correct = (rewards >= threshold).view(-1, n)  # (B, G)
    out = torch.zeros(correct.shape, dtype=torch.float32)
    for g, c in enumerate(correct.sum(-1).tolist()):
        rho = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        sigma = math.sqrt(rho * (1.0 - rho))
        if sigma == 0.0:
            continue
        wrong = (1.0 - rho - math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)) / sigma
        out[g] = torch.where(correct[g], (1.0 - rho) / sigma, wrong)
    return out.reshape(-1).to(rewards.device)


def maxrl_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """MaxRL's advantage (Tajwar et al. 2026, "Maximum Likelihood RL", arXiv 2602.02710; prime-rl
    `max_rl`, SkyRL `maxrl`, TRL `MaxRLTrainer`): A_i = (r_i - mean_g) / (mean_g + eps).

    RL on a 0/1 reward maximises the pass rate p(x); maximum likelihood maximises log p(x),
    whose gradient is grad p / p: hard prompts weigh 1/p more. With c of G responses correct,
    the estimator (1/c) sum_{i correct} grad log pi(y_i) is unbiased for grad log p up to the
    truncation the paper analyses, and subtracting the control variate (1/G) sum_i grad log pi
    gives exactly (1/G) sum_i (r_i / mean_g - 1) grad log pi: this advantage. A correct answer to
    a prompt solved 1 time in 8 gets 7, one solved 7 times in 8 gets 1/7 (GRPO gives both
    about 2.5 and 0.35). Groups of equal rewards get exactly 0 (no signal, as in GRPO), and so
    does a group whose mean is <= 0 (rewards are taken as success scores >= 0).
    rewards `# (B*G,)` -> `# (B*G,)`.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    mean = grouped.mean(dim=-1, keepdim=True)  # (B, 1)
    adv = (grouped - mean) / (mean + eps)
    equal = grouped.amax(dim=-1, keepdim=True) == grouped.amin(dim=-1, keepdim=True)  # (B, 1)
    return adv.masked_fill(equal | (mean <= 0), 0.0).reshape(-1)  # (B*G,)


Advantage = Callable[[Tensor, int], Tensor]

# `algo.advantage` -> (rewards `# (B*G,)`, group size) -> advantages `# (B*G,)`.
ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": group_advantages,
    "passk": passk_advantages,
    "maxrl": maxrl_advantages,
}


def make_advantage(name: str, *, norm_std: bool = True, k: int = 1) -> Advantage:
    """The advantage registered under `name`: GRPO with or without the std, pass@k with k,
    or MaxRL."""
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage {name!r}; known: {', '.join(ADVANTAGES)}")
    own = {"grpo": {"norm_std": norm_std}, "passk": {"k": k}, "maxrl": {}}[name]
    return partial(ADVANTAGES[name], **own)
