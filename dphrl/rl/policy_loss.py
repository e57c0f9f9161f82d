"""Policy losses on D_exp rollouts, chosen by `algo.loss` through `POLICY_LOSSES`.

Each is a pure function of token log-probs: (logp, old_logp, advantages, mask) -> a per-token
loss `# (N, T)` (zero where masked) and the fraction of tokens where its clip rule is active,
so any of them adds to any `divergence=` term and any loss aggregation.

- `ppo_clip`: PPO-clip (Schulman et al. 2017, arXiv 1707.06347) with DAPO's clip-higher
  (arXiv 2503.14476) and dual-clip: GRPO's and DAPO's loss.
- `gspo`, `clip_cov`, `kl_cov`: the objectives published after DPH-RL.
- `dppo_tv`, `dppo_kl`, `cispo`: truncated importance weights on every token's log-prob
  gradient instead of PPO's clip of the ratio: DPPO masks a token once its probability has moved
  too far (a divergence, not a ratio), CISPO clips the weight but keeps every token's gradient.

Rollouts are laid out group by group: rows [g*G, (g+1)*G) answer prompt g.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dphrl.algo_config import AlgoConfig


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


# (logp, old_logp, advantages, mask) -> (per-token loss (N, T), clip fraction): a loss of
# `POLICY_LOSSES` with its clip range and own options bound (`make_policy_loss`), or
# `ppo_clip_loss` at its defaults.
PolicyLoss = Callable[..., tuple[Tensor, Tensor]]


if TYPE_CHECKING:
    from dphrl.algo_config import AlgoConfig


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


def _weighted_surrogate(logp: Tensor, old_logp: Tensor, weight: Tensor) -> Tensor:
    """rho * sg(weight / rho), rho = exp(logp - old_logp): its value is `weight` and its
    gradient `weight * d logp`, the REINFORCE gradient with a stop-gradient importance weight.

    The peers (verl, SkyRL) write this as sg(weight) * logp, which has the same gradient but a
    value (weight * logp) that says nothing about the objective; this form's value is the
    surrogate itself, -A at ratio 1 like PPO-clip's."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    return ratio * (weight / ratio).detach()


def _dppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    divergence: Callable[[Tensor, Tensor], Tensor],
    delta_low: float,
    delta_high: float,
    ratio_cap: float,
) -> tuple[Tensor, Tensor]:
    """DPPO's per-token loss for a binary divergence `divergence(p, p_old)` `# (N, T)`; see
    `dppo_tv_loss`. Returns the loss and the share of unmasked tokens whose update is blocked."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    with torch.no_grad():
        p, p_old = torch.exp(logp), torch.exp(old_logp)
        div = divergence(p, p_old)
        # A token is blocked only where it has already moved the way A pushes it.
        blocked = torch.where(
            adv > 0, (p > p_old) & (div > delta_high), (p < p_old) & (div > delta_low)
        )
        ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
        weight = ratio.clamp(max=ratio_cap) * (~blocked).to(logp.dtype)
    loss = -adv * _weighted_surrogate(logp, old_logp, weight) * mask
    frac = (blocked.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return loss, frac


def _binary_tv(p: Tensor, p_old: Tensor) -> Tensor:
    return (p - p_old).abs()


def _binary_kl(p: Tensor, p_old: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(Bern(p_old) || Bern(p)): the sampled token against the rest of the vocabulary."""
    return p_old * torch.log((p_old + eps) / (p + eps)) + (1 - p_old) * torch.log(
        (1 - p_old + eps) / (1 - p + eps)
    )


def dppo_tv_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    delta_low: float | None = None,
    delta_high: float | None = None,
    ratio_cap: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """DPPO, binary total-variation form (Qi et al. 2026, "Rethinking the Trust Region in LLM
    RL", arXiv 2602.04879; verl `dppo_tv`, SkyRL `dppo`).

    PPO's trust region is a ratio rho = p / p_old, which is loose on rare tokens and tight on
    likely ones. DPPO bounds a divergence between the old and new distributions instead, taken
    on the binary split {sampled token, the rest}: TV = |p - p_old|. A token whose probability
    has moved more than delta in the direction its advantage pushes stops contributing:

        blocked_t = (A > 0 and p - p_old > delta_high) or (A <= 0 and p_old - p > delta_low)
        loss_t    = -A sg(min(rho, C)) log p    (gradient),   value -A min(rho, C),  0 if blocked

    with C = `ratio_cap` (the peers' 20) truncating the importance weight. `delta_low` /
    `delta_high` default to the paper's 0.2 (`clip_low` / `clip_high` are accepted for the
    common signature and unused). Returns the loss `# (N, T)` and the blocked share.
    """
    low = 0.2 if delta_low is None else delta_low
    high = 0.2 if delta_high is None else delta_high
    return _dppo_loss(logp, old_logp, advantages, mask, _binary_tv, low, high, ratio_cap)


def dppo_kl_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    delta_low: float | None = None,
    delta_high: float | None = None,
    ratio_cap: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """DPPO, binary KL form (arXiv 2602.04879; verl `dppo_kl`): as `dppo_tv_loss` with the
    divergence KL(Bern(p_old) || Bern(p)) = p_old log(p_old / p) + (1 - p_old) log((1 - p_old)
    / (1 - p)) and the thresholds 0.05 by default (SkyRL's recommendation for the KL form)."""
    low = 0.05 if delta_low is None else delta_low
    high = 0.05 if delta_high is None else delta_high
    return _dppo_loss(logp, old_logp, advantages, mask, _binary_kl, low, high, ratio_cap)


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    weight_low: float = 1.0,
    weight_high: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4; NeMo-RL, slime, SkyRL `cispo`).

        w_t    = sg(clip(rho_t, 1 - weight_low, 1 + weight_high)),   rho_t = p / p_old
        loss_t = -w_t A log p    (gradient),   value -w_t A

    PPO-clip zeroes the gradient of a token whose ratio left the range, which drops the rare
    "fork" tokens reflection depends on; CISPO clips the importance weight instead, so every
    token keeps its REINFORCE gradient, bounded. The paper sets no lower bound (`weight_low`
    1: the weight may fall to 0) and tunes the upper one; 5 is SkyRL's default. `clip_low` /
    `clip_high` are accepted for the common signature and unused. Returns the loss `# (N, T)`
    and the share of unmasked tokens whose weight was clipped.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    with torch.no_grad():
        ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
        weight = ratio.clamp(1.0 - weight_low, 1.0 + weight_high)
        clipped = (weight != ratio).to(mask.dtype) * mask
    loss = -adv * _weighted_surrogate(logp, old_logp, weight) * mask
    return loss, clipped.sum() / mask.sum().clamp(min=1)


# `algo.loss` -> the per-token policy loss; options bound by `make_policy_loss`.
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
    "dppo_tv": dppo_tv_loss,
    "dppo_kl": dppo_kl_loss,
    "cispo": cispo_loss,
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
    dppo_delta_low: float | None = None,
    dppo_delta_high: float | None = None,
    dppo_ratio_cap: float = 20.0,
    cispo_low: float = 1.0,
    cispo_high: float = 5.0,
    dual_clip: float | None = None,
    clamp_log_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> PolicyLoss:
    """The loss registered under `name` with its clip range and its own options bound; the
    options are named as the `algo.*` keys (`clip_cov_ratio`: `algo.clip_cov.ratio`), and each
    loss takes only its own."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}")
    dppo = {"delta_low": dppo_delta_low, "delta_high": dppo_delta_high, "ratio_cap": dppo_ratio_cap}
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
        "dppo_tv": dppo,
        "dppo_kl": dppo,
        "cispo": {"weight_low": cispo_low, "weight_high": cispo_high},
    }[name]
    return partial(POLICY_LOSSES[name], clip_low=clip_low, clip_high=clip_high, **own)


def policy_loss_for(algo: AlgoConfig, generator: torch.Generator | None = None) -> PolicyLoss:
    """`make_policy_loss` for `algo.loss` with its `algo.*` options (a keyword is its key with
    the group's dot as `_`: `clip_cov_ratio` for `algo.clip_cov.ratio`); `generator` draws
    Clip-Cov's random token picks."""
    options = {key.replace(".", "_"): attrgetter(key)(algo) for key in _LOSS_OPTIONS}
    return make_policy_loss(algo.loss, generator=generator, **options)


_LOSS_OPTIONS = (
    "clip_low", "clip_high", "dual_clip", "clamp_log_ratio",
    "clip_cov.ratio", "clip_cov.low", "clip_cov.high", "kl_cov.ratio", "kl_cov.coef",
    "dppo.delta_low", "dppo.delta_high", "dppo.ratio_cap", "cispo.low", "cispo.high",
)  # fmt: skip


# Losses under which a response with advantage 0 adds nothing to the loss or its gradient, so
# the trainer may skip its forward (each is A times a per-token factor); Clip-Cov and KL-Cov are
# not: their covariance is centred over every token, and KL-Cov's penalty does not scale with A.
ZERO_ADVANTAGE_INERT = frozenset({"ppo_clip", "gspo", "dppo_tv", "dppo_kl", "cispo"})
