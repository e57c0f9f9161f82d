"""Rollout / trainer mismatch: how far the engine's log-probs are from the trainer's, and the fix.

The engine (vLLM in bf16, fused kernels, another batch shape) and the trainer compute the same
policy with different numerics, so a token the engine drew with probability pi_engine has
probability pi_old under the trainer's own forward pass. PPO's ratio pi_theta / pi_old assumes
the samples came from pi_old; when they did not, the gradient is biased (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training", the truncated importance
sampling (TIS) note; the Ling team's Ring-1T report, 2025, for IcePop's masking). With

    log w_t = log pi_old(y_t) - log pi_engine(y_t)          (per response token)

`mismatch_stats` measures it (always logged) and `ROLLOUT_CORRECTIONS[name]` corrects it:

- `none`: weights 1, nothing masked.
- `tis`: token-level truncated importance weight min(w_t, C) multiplies the policy-gradient term
  (detached: a weight on the sample, not a path for gradients).
- `mis_token`: tokens with w_t outside [C_low, C_high] leave the loss (masked IS, IcePop).
- `mis_seq`: whole responses whose geometric-mean ratio exp(mean_t log w_t) is outside
  [C_low, C_high] leave the loss; the mean over tokens keeps the thresholds independent of length
  (a product of 4k ratios would leave any fixed range).

What is compared when sampling is truncated (top_p < 1): the engines report the log-prob of each
drawn token under the distribution it was drawn from, after temperature and top_p (vLLM's
`processed_logprobs`; the hf engine's own). The trainer's pi_old is the temperature-scaled,
untruncated policy, the one PPO optimises. For a token inside the nucleus,
log pi_engine = log pi_old - log Z (Z the nucleus mass, in [top_p, 1]), so w_t = Z <= 1 even
with identical numerics: that is the correct importance weight for sampling from the truncated
policy while training the full one, and the metrics then include the truncation's
KL(pi_engine || pi_old) = -E[log Z]. With top_p = 1 they measure numerics alone. A top_k cut
(not a dphrl sampling option; vLLM's `processed_logprobs` would include it) acts the same way,
with Z the mass of the k most likely tokens. Comparing the untruncated engine distribution
instead (vLLM's `raw_logprobs`) would not be the distribution the tokens came from, and at
temperature != 1 not the trainer's either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

# A ratio outside [1/2, 2] counts as a large mismatch in `mismatch_stats`.
LARGE_LOG_RATIO = math.log(2.0)


def mismatch_stats(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the engine's per-token log-probs are from the trainer's, over unmasked tokens.

    old_logp, engine_logp, mask `# (N, T)`. Returns scalars (detached):
    - `mismatch_abs_mean`, `mismatch_abs_max`: mean and max of |log pi_old - log pi_engine|;
    - `mismatch_kl_k3`: the k3 estimate of KL(pi_engine || pi_old) from the engine's samples,
      mean_t (w_t - 1 - log w_t) with w_t = pi_old / pi_engine (Schulman 2020, "Approximating
      KL divergence"): unbiased and never negative;
    - `mismatch_frac_large`: fraction of tokens whose ratio w_t leaves [1/2, 2].
    """
    with torch.no_grad():
        valid = mask > 0
        count = valid.sum().clamp(min=1)
        log_w = torch.where(valid, old_logp - engine_logp, torch.zeros_like(old_logp))
        abs_lw = log_w.abs()
        return {
            "mismatch_abs_mean": abs_lw.sum() / count,
            "mismatch_abs_max": abs_lw.max() if log_w.numel() else log_w.new_zeros(()),
            "mismatch_kl_k3": (torch.expm1(log_w) - log_w).sum() / count,
            "mismatch_frac_large": ((abs_lw > LARGE_LOG_RATIO) & valid).sum() / count,
        }


def no_correction(log_w: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Weights 1 everywhere, the mask unchanged (today's PPO)."""
    return torch.ones_like(log_w), mask


def tis(log_w: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Token-level truncated IS: weight_t = min(exp(log w_t), high), detached; mask unchanged."""
    return torch.exp(log_w.detach()).clamp(max=high), mask


def mis_token(log_w: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Token-level masked IS: tokens with w_t outside [low, high] get mask 0; weights 1."""
    w = torch.exp(log_w.detach())
    keep = (w >= low) & (w <= high)
    return torch.ones_like(w), mask * keep.to(mask.dtype)


def mis_seq(log_w: Tensor, mask: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Sequence-level masked IS: a response whose exp(mean_t log w_t) leaves [low, high] is dropped."""
    m = mask.to(log_w.dtype)
    seq_w = torch.exp((log_w.detach() * m).sum(-1) / m.sum(-1).clamp(min=1))  # (N,)
    keep = (seq_w >= low) & (seq_w <= high)
    return torch.ones_like(log_w), mask * keep.unsqueeze(-1).to(mask.dtype)


Correction = Callable[[Tensor, Tensor, float, float], tuple[Tensor, Tensor]]

# `algo.rollout_correction.name` -> (log w `# (N, T)`, mask `# (N, T)`, low, high) -> (weights, mask).
ROLLOUT_CORRECTIONS: dict[str, Correction] = {
    "none": no_correction,
    "tis": tis,
    "mis_token": mis_token,
    "mis_seq": mis_seq,
}


def correct(
    name: str, old_logp: Tensor, engine_logp: Tensor, mask: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Apply correction `name`; return the weights `# (N, T)`, the new mask `# (N, T)` and stats.

    Stats (detached scalars over the incoming mask's tokens): `rc_weight_mean`,
    `rc_weight_max` (over tokens still in the loss), `rc_frac_truncated` (weight capped at
    `high`: tis), `rc_frac_masked` (tokens taken out of the loss: mis_*).
    """
    if name not in ROLLOUT_CORRECTIONS:
        raise KeyError(
            f"unknown rollout correction {name!r}; known: {', '.join(ROLLOUT_CORRECTIONS)}"
        )
    log_w = (old_logp - engine_logp).detach()
    weights, new_mask = ROLLOUT_CORRECTIONS[name](log_w, mask, low, high)
    with torch.no_grad():
        valid, kept = mask > 0, new_mask > 0
        count = valid.sum().clamp(min=1)
        w_kept = torch.where(kept, weights, torch.zeros_like(weights))
        truncated = valid & (weights < torch.exp(log_w)) & (weights == high)
        stats = {
            "rc_weight_mean": w_kept.sum() / kept.sum().clamp(min=1),
            "rc_weight_max": w_kept.max() if w_kept.numel() else w_kept.new_zeros(()),
            "rc_frac_truncated": truncated.sum() / count,
            "rc_frac_masked": (valid & ~kept).sum() / count,
        }
    return weights, new_mask, stats


# (old_logp, engine_logp, mask) `# (N, T)` each -> (weights, mask, stats), as `correct` returns
# them: one correction with its kind and bounds bound (`make_correction`).
RolloutCorrection = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


def make_correction(name: str = "none", low: float = 0.5, high: float = 2.0) -> RolloutCorrection:
    """`correct` with `algo.rollout_correction`'s kind and its bounds bound, so the loss takes
    one ready-made callable; an unknown `name` is refused here, before any step."""
    if name not in ROLLOUT_CORRECTIONS:
        raise KeyError(
            f"unknown rollout correction {name!r}; known: {', '.join(ROLLOUT_CORRECTIONS)}"
        )
    return partial(correct, name, low=low, high=high)


# Weights 1, nothing masked (`algo.rollout_correction=none`'s default bounds): the mismatch is
# still measured and reported.
NO_CORRECTION = make_correction()
