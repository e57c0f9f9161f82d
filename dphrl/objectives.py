"""The policy objectives published after DPH-RL, as choices next to GRPO's PPO-clip.

Each is a pure function of token log-probs, chosen by a config key through a registry:

- `POLICY_LOSSES[algo.loss]`: `ppo_clip` (GRPO/DAPO, `dphrl.rl.ppo_clip_loss`), `gspo`,
  `clip_cov`, `kl_cov`; every one maps (logp, old_logp, advantages, mask) to a per-token loss
  `# (N, T)` and the fraction of tokens where its clip rule is active, so any of them adds to
  any `divergence=` term and any loss aggregation.
- `ADVANTAGES[algo.advantage]`: `grpo` (`dphrl.rl.group_advantages`) or `passk`.

Rollouts are laid out group by group, as in `dphrl.rl`: rows [g*G, (g+1)*G) answer prompt g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dphrl.rl import PolicyLoss, group_advantages, ppo_clip_loss

if TYPE_CHECKING:
    from dphrl.config import AlgoConfig


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[Tensor, Tensor]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): PPO-clip on the sequence-level ratio.

        s_i = exp(mean_t (logp_it - old_logp_it))          (over response i's unmasked tokens)
        loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    One ratio per response, normalised by its length, so a response is clipped (or not) as a
    whole; the paper's ranges are tiny (3e-4, 4e-4) because s_i is a per-token geometric mean.
    The per-token loss returned is loss_i on each of i's tokens: aggregated with
    `seq-mean-token-mean` (the paper's) it is mean_i loss_i, and the gradient reaches every
    token of i through s_i (d s_i / d logp_it = s_i / |y_i|). Shapes as `ppo_clip_loss`;
    advantages `# (N,)`. The clip fraction counts the tokens of clipped responses.
    """
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp(min=1)  # (N,)
    seq_ratio = torch.exp(((logp - old_logp) * m).sum(-1) / lengths)  # (N,)
    unclipped = -seq_ratio * advantages
    clipped = -seq_ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    seq_loss = torch.maximum(unclipped, clipped)  # (N,)
    was_clipped = (clipped > unclipped).to(m.dtype).unsqueeze(-1) * m
    clip_frac = was_clipped.sum() / m.sum().clamp(min=1)
    return seq_loss.unsqueeze(-1) * m, clip_frac.detach()


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


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token Cov = (logp_t - mean(logp)) (A_t - mean(A)), means over the unmasked tokens.

    The centred cross-term whose sum drives the change in policy entropy (Cui et al. 2025,
    "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, eq. 6). Detached.
    logp, mask `# (N, T)`, advantages `# (N,)` or `# (N, T)` -> `# (N, T)`, 0 where masked.
    """
    with torch.no_grad():
        adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
        valid = mask > 0
        count = valid.sum().clamp(min=1)
        mean_lp = (logp * valid).sum() / count
        mean_a = (adv * valid).sum() / count
        return torch.where(valid, (logp - mean_lp) * (adv - mean_a), torch.zeros_like(logp))


def clip_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Clip-Cov (arXiv 2505.22617, sec. 4): PPO-clip, with the gradient of a few high-Cov
    tokens cut.

    Among the unmasked tokens whose `token_covariance` lies in [cov_low, cov_high], a random
    ceil(ratio * #tokens) (drawn with `generator`) keep their loss value but are detached, so
    the tokens that drive entropy down fastest stop pushing it. Shapes as `ppo_clip_loss`.
    """
    loss, clip_frac = ppo_clip_loss(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high
    )
    cov = token_covariance(logp, advantages, mask).flatten()
    band = ((cov >= cov_low) & (cov <= cov_high) & (mask.flatten() > 0)).nonzero()[:, 0]
    n_cut = min(len(band), math.ceil(ratio * float((mask > 0).sum())))
    cut = torch.zeros(cov.shape, dtype=torch.bool, device=cov.device)
    if n_cut:
        pick = torch.randperm(len(band), generator=generator, device="cpu")[:n_cut]
        cut[band[pick.to(band.device)]] = True
    return torch.where(cut.view_as(loss), loss.detach(), loss), clip_frac


def kl_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio: float = 2e-3,
    coef: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KL-Cov (arXiv 2505.22617, sec. 4): the unclipped surrogate, plus a KL-like penalty on
    the top-ratio share of tokens by `token_covariance`.

        loss_t = -rho_t A_t + coef * |logp_t - old_logp_t| * [t in top ceil(ratio * #tokens) Cov]

    As in the paper, the penalty replaces the clip (clip_low / clip_high are accepted for a
    common signature and unused); the clip fraction returned is the penalised share of tokens.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    m = mask.to(logp.dtype)
    loss = -torch.exp(logp - old_logp) * adv
    cov = token_covariance(logp, advantages, mask).flatten()
    n_valid = int((mask > 0).sum())
    n_top = min(n_valid, math.ceil(ratio * n_valid))
    top = torch.zeros(cov.shape, dtype=torch.bool, device=cov.device)
    if n_top:
        masked_cov = torch.where(mask.flatten() > 0, cov, torch.full_like(cov, -math.inf))
        top[masked_cov.topk(n_top).indices] = True
    top = top.view_as(loss)
    loss = loss + torch.where(top, coef * (logp - old_logp).abs(), torch.zeros_like(loss))
    return loss * m, (top.sum() / max(n_valid, 1)).to(m.dtype)


# `algo.loss` -> the per-token policy loss; options bound by `make_policy_loss`.
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
}


def make_policy_loss(
    name: str,
    *,
    clip_low: float,
    clip_high: float,
    clip_cov_ratio: float = 2e-4,
    clip_cov_low: float = 1.0,
    clip_cov_high: float = 5.0,
    kl_cov_ratio: float = 2e-3,
    kl_cov_coef: float = 1.0,
    dual_clip: float | None = None,
    clamp_log_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> PolicyLoss:
    """The loss registered under `name` with its clip range and its own options bound; the
    options are named as the `algo.*` keys, and each loss takes only its own."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}")
    own = {
        "ppo_clip": {"dual_clip": dual_clip, "clamp_log_ratio": clamp_log_ratio},
        "gspo": {},
        "clip_cov": {
            "ratio": clip_cov_ratio,
            "cov_low": clip_cov_low,
            "cov_high": clip_cov_high,
            "generator": generator,
        },
        "kl_cov": {"ratio": kl_cov_ratio, "coef": kl_cov_coef},
    }[name]
    return partial(POLICY_LOSSES[name], clip_low=clip_low, clip_high=clip_high, **own)


def policy_loss_for(algo: AlgoConfig, generator: torch.Generator | None = None) -> PolicyLoss:
    """`make_policy_loss` for `algo.loss` with its `algo.*` options (the keywords are named as
    the keys); `generator` draws Clip-Cov's random token picks."""
    options = {key: getattr(algo, key) for key in _LOSS_OPTIONS}
    return make_policy_loss(algo.loss, generator=generator, **options)


_LOSS_OPTIONS = (
    "clip_low", "clip_high", "clip_cov_ratio", "clip_cov_low", "clip_cov_high",
    "kl_cov_ratio", "kl_cov_coef", "dual_clip", "clamp_log_ratio",
)  # fmt: skip


# Losses under which a response with advantage 0 adds nothing to the loss or its gradient, so
# the trainer may skip its forward; Clip-Cov and KL-Cov are not: their covariance is centred
# over every token, and KL-Cov's penalty does not scale with A.
ZERO_ADVANTAGE_INERT = frozenset({"ppo_clip", "gspo"})


Advantage = Callable[[Tensor, int], Tensor]

# `algo.advantage` -> (rewards `# (B*G,)`, group size) -> advantages `# (B*G,)`.
ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": group_advantages,
    "passk": passk_advantages,
}


def make_advantage(name: str, *, norm_std: bool = True, k: int = 1) -> Advantage:
    """The advantage registered under `name`: GRPO with or without the std, or pass@k with k."""
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage {name!r}; known: {', '.join(ADVANTAGES)}")
    own = {"grpo": {"norm_std": norm_std}, "passk": {"k": k}}[name]
    return partial(ADVANTAGES[name], **own)
