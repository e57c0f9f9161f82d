"""Policy losses on D_exp rollouts, chosen by `algo.loss` through `POLICY_LOSSES`.

Each is a pure function of token log-probs: (logp, old_logp, advantages, mask) -> a per-token
loss `# (N, T)` (zero where masked) and the fraction of tokens where its clip rule is active,
so any of them adds to any `divergence=` term and any loss aggregation.

- `ppo_clip`: PPO-clip (Schulman et al. 2017, arXiv 1707.06347) with DAPO's clip-higher
  (arXiv 2503.14476) and dual-clip: GRPO's and DAPO's loss.
- `gspo`, `clip_cov`, `kl_cov`: the objectives published after DPH-RL.

Rollouts are laid out group by group: rows [g*G, (g+1)*G) answer prompt g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dphrl.config import AlgoConfig


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    clamp_log_ratio: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss with DAPO's decoupled clip range, and the clip fraction.

        rho = exp(logp - old_logp)
        loss_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)

    clip_high > clip_low ("clip-higher") lets low-probability tokens with A > 0 grow further
    before the gradient stops, which DAPO found keeps entropy from collapsing.

    `dual_clip` = c > 1 (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729): where A < 0 the loss
    is also capped at -c A, so a token whose ratio has grown far past 1 cannot push an unbounded
    step. `clamp_log_ratio` clamps logp - old_logp to [-x, x] before the exponential. The
    official DPH-RL code (verl `compute_policy_loss`) uses both, c = 3 and x = 20; None is off.

    Shapes: logp, old_logp, mask `# (N, T)`; advantages `# (N,)` (one per response) or `# (N, T)`.
    Returns the per-token loss `# (N, T)` (zero where mask is 0; aggregate it with `aggregate`)
    and the fraction of unmasked tokens where the clipped term is the active one (a scalar).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    log_ratio = logp - old_logp
    if clamp_log_ratio is not None:
        log_ratio = log_ratio.clamp(-clamp_log_ratio, clamp_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    loss = loss * mask
    was_clipped = (clipped > unclipped).to(mask.dtype) * mask
    clip_frac = was_clipped.sum() / mask.sum().clamp(min=1)
    return loss, clip_frac.detach()


# (logp, old_logp, advantages, mask, *, clip_low, clip_high) -> (per-token loss (N, T), clip
# fraction): `ppo_clip_loss`, or any policy loss of that shape, chosen by name by the caller.
PolicyLoss = Callable[..., tuple[Tensor, Tensor]]


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
