"""The RL part of DPH-RL on D_exp: GRPO group advantages, PPO-clip, loss aggregation, DAPO filters.

Sources: GRPO (Shao et al. 2024, arXiv 2402.03300) for group-normalised advantages; PPO
(Schulman et al. 2017, arXiv 1707.06347) for the clipped surrogate; DAPO (Yu et al. 2025,
arXiv 2503.14476) for clip-higher, dynamic sampling and overlong filtering. Rollouts are laid out
group by group: rows [g*G, (g+1)*G) hold the G responses to prompt g, so B prompts make B*G rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dphrl.mismatch import correct, mismatch_stats

if TYPE_CHECKING:
    from dphrl.batching import Packed
    from dphrl.divergence import Divergence


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


def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, denom: float | None = None) -> Tensor:
    """Each response's token sum over a constant L, then the mean over responses (Dr. GRPO, Liu
    et al. 2025, arXiv 2503.20783): sum / (responses * L), so no response's tokens weigh more for
    being short. `denom` is that product (the trainer passes the responses on all ranks times
    `model.max_new_tokens`); without it L is the mask's width."""
    per_seq = (values * mask).sum(dim=-1)  # (N,)
    return per_seq.sum() / (_num_seqs(mask) * mask.shape[-1] if denom is None else denom)


def _num_seqs(mask: Tensor) -> Tensor:
    """Responses with at least one unmasked token: a fully masked one (e.g. overlong) counts 0."""
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1)


Aggregation = Callable[[Tensor, Tensor, float | None], Tensor]

# `algo.loss_agg` -> (values (N, T), mask (N, T), denom) -> scalar.
AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def agg_count(mask: Tensor, mode: str, max_len: int) -> float:
    """What `mode` divides by on these rows: tokens (token-mean) or responses (seq-mean-*),
    times `max_len` for Dr. GRPO's seq-mean-token-sum-norm. Summed over ranks, it is the
    `denom` that makes the rank-average of gradients the gradient of the global mean."""
    count = float(mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum())
    return count * max_len if mode == "seq-mean-token-sum-norm" else count


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


@dataclass
class StepBatch:
    """A step's tensors, carried from `Trainer.step` into `hybrid_loss`.

    N rollouts of D_exp prompts (rows [g*G, (g+1)*G) answer prompt g) and M ref-store responses
    of D_pef prompts. Log-probs are per response token, 0 past a response's end; the policy's
    own log-probs are not here: they come from the forward of each minibatch, with grad.
    """

    rollouts: Packed | None  # ids (N, P+T), response_mask (N, T); None: no group this step
    advantages: Tensor  # (N,) one per response, or (N, T) per token
    old_logp: Tensor | None = None  # (N, T) pi_old; None: the loss forward's own, detached
    online_ref_logp: Tensor | None = None  # (N, T) online reference model (reverse_kl, js_full)
    store: Packed | None = None  # ref-store ids (M, P'+S), response_mask (M, S)
    store_ref_logp: Tensor | None = None  # (M, S) pi_ref, as precompute-ref stored it
    engine_logp: Tensor | None = None  # (N, T) the engine's log-probs of the sampled tokens

    def __len__(self) -> int:
        return 0 if self.rollouts is None else len(self.rollouts)

    def minibatch(self, rows: slice, store_rows: slice | None) -> StepBatch:
        """Rollout rows `rows` and ref-store rows `store_rows` (None: no store part)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        has_store = self.store is not None and store_rows is not None
        return replace(
            self,
            rollouts=None if self.rollouts is None else self.rollouts.select(rows),
            advantages=self.advantages[rows],
            old_logp=cut(self.old_logp),
            online_ref_logp=cut(self.online_ref_logp),
            engine_logp=cut(self.engine_logp),
            store=self.store.select(store_rows) if has_store else None,
            store_ref_logp=self.store_ref_logp[store_rows] if has_store else None,
        )


LOSS_STATS = ("pg_loss", "clip_frac", "div_loss", "kl_ref", "rkl_loss")


def hybrid_loss(
    batch: StepBatch,
    logp: Tensor | None,
    store_logp: Tensor | None,
    *,
    beta: float,
    divergence: Divergence | None = None,
    policy_term: Divergence | None = None,
    policy_loss: PolicyLoss = ppo_clip_loss,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "token-mean",
    denom: float | None = None,
    store_denom: float | None = None,
    rollout_correction: str = "none",
    correction_low: float = 0.5,
    correction_high: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPH-RL's per-step objective (arXiv 2509.07430, Sec. 3) on one minibatch:

        L = agg(policy_loss(logp, old_logp, A))                     on the N rollouts
          + beta * agg(policy_term(logp, online_ref_logp))          on the rollouts, when given
          + beta * token-mean(divergence(store_logp, store_ref_logp)) on the M ref-store rows

    `policy_loss` is PPO-clip by default (any `PolicyLoss`); `policy_term` the reverse-KL estimator (GRPO + KL baseline) or `js_full`'s policy half,
    against an online reference model; `divergence` the mass-covering f(u) on reference samples.

    logp `# (N, T)` and store_logp `# (M, S)`: the policy's log-probs with grad (None: that half
    is absent). `agg` is `loss_agg`; `denom` / `store_denom` replace its count (tokens or
    responses) so that minibatches and ranks add up to the global mean. Returns the scalar loss
    and the statistics of `LOSS_STATS` as floats: the clip fraction and, on the ref store, the
    KL(pi_ref || pi_theta) estimate `kl_ref` (k3 form, no gradient).

    With the engine's log-probs in the batch, `rollout_correction` (`dphrl.mismatch`) weighs or
    masks the policy loss's tokens by pi_old / pi_engine (bounds `correction_low` / `_high`);
    masked tokens add 0 and keep their place in the denominator. The mismatch and correction
    statistics are added, taken over the tokens of responses with a nonzero advantage.
    """
    loss = torch.zeros((), device=batch.advantages.device)
    stats = dict.fromkeys(LOSS_STATS, 0.0)
    if logp is not None and batch.rollouts is not None:
        mask = batch.rollouts.response_mask
        old = logp.detach() if batch.old_logp is None else batch.old_logp
        weights, pg_mask = None, mask
        if batch.engine_logp is not None:
            bounds = (correction_low, correction_high)
            weights, pg_mask, _ = correct(rollout_correction, old, batch.engine_logp, mask, *bounds)
            stats.update(_mismatch_report(batch, old, mask, rollout_correction, bounds))
        pg_tok, clip_frac = policy_loss(
            logp, old, batch.advantages, pg_mask, clip_low=clip_low, clip_high=clip_high
        )
        if weights is not None:
            pg_tok = pg_tok * weights
        pg = aggregate(pg_tok, mask, loss_agg, denom)
        loss = loss + pg
        stats["pg_loss"], stats["clip_frac"] = float(pg.detach()), float(clip_frac)
        if batch.online_ref_logp is not None and policy_term is not None and beta > 0:
            rkl = aggregate(policy_term(logp, batch.online_ref_logp), mask, loss_agg, denom)
            loss = loss + beta * rkl
            stats["rkl_loss"] = float(rkl.detach())
    if store_logp is not None and batch.store is not None and divergence is not None and beta > 0:
        mask, ref = batch.store.response_mask, batch.store_ref_logp
        div = aggregate(divergence(store_logp, ref), mask, "token-mean", store_denom)
        loss = loss + beta * div
        with torch.no_grad():
            log_u = (store_logp - ref) * mask
            kl = aggregate(torch.expm1(log_u) - log_u, mask, "token-mean", store_denom)
        stats["div_loss"], stats["kl_ref"] = float(div.detach()), float(kl)
    return loss, stats


def _mismatch_report(
    batch: StepBatch, old: Tensor, mask: Tensor, name: str, bounds: tuple[float, float]
) -> dict[str, float]:
    """Mismatch and correction statistics over the tokens of responses with a nonzero
    advantage: those the correction acts on, and those the trainer forwards when it skips the
    rest (whose `old` is then a placeholder)."""
    adv = batch.advantages
    live = adv != 0 if adv.dim() == 1 else (adv != 0).any(-1)  # (N,)
    live_mask = mask * live.unsqueeze(-1).to(mask.dtype)
    _, _, report = correct(name, old, batch.engine_logp, live_mask, *bounds)
    report.update(mismatch_stats(old, batch.engine_logp, live_mask))
    return {key: float(value) for key, value in report.items()}
