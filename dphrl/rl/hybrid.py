"""DPH-RL's per-step objective: the policy loss on D_exp rollouts plus beta times the
divergence on ref-store responses (arXiv 2509.07430, Sec. 3), over a `StepBatch`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dphrl.rl.aggregation import aggregate
from dphrl.rl.mismatch import NO_CORRECTION, RolloutCorrection, mismatch_stats
from dphrl.rl.policy_loss import PolicyLoss, ppo_clip_loss

if TYPE_CHECKING:
    from dphrl.rl.batching import Packed
    from dphrl.rl.divergence import Divergence


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
    store_topk_ids: Tensor | None = None  # (M, S, K) pi_ref's top-k tokens (ref.topk)
    store_topk_ref_logp: Tensor | None = None  # (M, S, K) their log-probs under pi_ref

    def __len__(self) -> int:
        return 0 if self.rollouts is None else len(self.rollouts)

    def minibatch(self, rows: slice | Tensor, store_rows: slice | Tensor | None) -> StepBatch:
        """Rollout rows and ref-store rows (a slice or an index; None: no store part)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        has_store = self.store is not None and store_rows is not None

        def cut_store(t: Tensor | None) -> Tensor | None:
            return t[store_rows] if has_store and t is not None else None

        return replace(
            self,
            rollouts=None if self.rollouts is None else self.rollouts.select(rows),
            advantages=self.advantages[rows],
            old_logp=cut(self.old_logp),
            online_ref_logp=cut(self.online_ref_logp),
            engine_logp=cut(self.engine_logp),
            store=self.store.select(store_rows) if has_store else None,
            store_ref_logp=cut_store(self.store_ref_logp),
            store_topk_ids=cut_store(self.store_topk_ids),
            store_topk_ref_logp=cut_store(self.store_topk_ref_logp),
        )


LOSS_STATS = ("pg_loss", "clip_frac", "div_loss", "kl_ref", "rkl_loss")

# What the ref batch says of forgetting, from the log-probs the divergence already has (no
# extra forward), with log r = log pi_theta - log pi_ref per response token: its mean over
# tokens, the mean over responses of its sum (the response's sequence log-ratio), and the share
# of responses whose sequence log-prob fell more than `FORGOT_NATS` below the initial policy's.
FORGETTING_STATS = ("ref_logratio_token", "ref_logratio_seq", "ref_forgot_frac")
FORGOT_NATS = 1.0


def forgetting_stats(store_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """`FORGETTING_STATS` of one ref batch: log-probs `# (M, S)` under the policy and the
    initial policy, response mask `# (M, S)`. 0 at step 0 (log r = 0); falling below 0 as the
    policy forgets what the initial policy answered correctly."""
    with torch.no_grad():
        log_r = (store_logp - ref_logp) * mask  # (M, S)
        seq = log_r.sum(-1)  # (M,)
        real = mask.sum(-1) > 0  # (M,) responses with tokens
        n = real.sum().clamp(min=1)
        return {
            "ref_logratio_token": float(log_r.sum() / mask.sum().clamp(min=1)),
            "ref_logratio_seq": float(seq[real].sum() / n),
            "ref_forgot_frac": float(((seq < -FORGOT_NATS) & real).sum() / n),
        }


def hybrid_loss(
    batch: StepBatch,
    logp: Tensor | None,
    store_logp: Tensor | None,
    *,
    beta: float,
    policy_loss: PolicyLoss = ppo_clip_loss,
    divergence: Divergence | None = None,
    policy_term: Divergence | None = None,
    correction: RolloutCorrection = NO_CORRECTION,
    loss_agg: str = "token-mean",
    denom: float | None = None,
    store_denom: float | None = None,
    store_topk_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPH-RL's per-step objective (arXiv 2509.07430, Sec. 3) on one minibatch:

        L = agg(policy_loss(logp, old_logp, A))                     on the N rollouts
          + beta * agg(policy_term(logp, online_ref_logp))          on the rollouts, when given
          - entropy_coef * agg(entropy)                             on the rollouts, when given
          + beta * token-mean(divergence(store_logp, store_ref_logp)) on the M ref-store rows

    The parts come ready-made, their options bound once by the caller: `policy_loss` is a
    `PolicyLoss` with its clip range and own options bound (`make_policy_loss`; PPO-clip at
    0.2 / 0.2 by default); `policy_term` the reverse-KL estimator (GRPO + KL baseline) or
    `js_full`'s policy half, against an online reference model; `divergence` the mass-covering
    f(u) on reference samples; `correction` the rollout correction with its kind and bounds
    bound (`dphrl.rl.mismatch.make_correction`).

    logp `# (N, T)` and store_logp `# (M, S)`: the policy's log-probs with grad (None: that half
    is absent). `agg` is `loss_agg`; `denom` / `store_denom` replace its count (tokens or
    responses) so that minibatches and ranks add up to the global mean. Returns the scalar loss
    and the statistics of `LOSS_STATS` as floats: the clip fraction and, on the ref store, the
    KL(pi_ref || pi_theta) estimate `kl_ref` (k3 form, no gradient), and `FORGETTING_STATS`.

    A top-k divergence (`dphrl.rl.divergence.TOPK_DIVERGENCES`) reads `store_topk_logp`
    `# (M, S, K)`, the policy's log-probs of the stored top-k tokens (with grad), against
    `batch.store_topk_ref_logp`. `entropy` `# (N, T)` is the rollouts' per-token entropy with
    grad (`dphrl.rl.entropy`); its mean is reported as `policy_entropy`.

    With the engine's log-probs in the batch, `correction` weighs or masks the policy loss's
    tokens by pi_old / pi_engine; masked tokens add 0 and keep their place in the denominator.
    The mismatch and correction statistics are added, taken over the tokens of responses with a
    nonzero advantage.
    """
    loss = torch.zeros((), device=batch.advantages.device)
    stats = dict.fromkeys(LOSS_STATS, 0.0)
    if logp is not None and batch.rollouts is not None:
        mask = batch.rollouts.response_mask
        old = logp.detach() if batch.old_logp is None else batch.old_logp
        weights, pg_mask = None, mask
        if batch.engine_logp is not None:
            weights, pg_mask, _ = correction(old, batch.engine_logp, mask)
            stats.update(_mismatch_report(batch, old, mask, correction))
        pg_tok, clip_frac = policy_loss(logp, old, batch.advantages, pg_mask)
        if weights is not None:
            pg_tok = pg_tok * weights
        pg = aggregate(pg_tok, mask, loss_agg, denom)
        loss = loss + pg
        stats["pg_loss"], stats["clip_frac"] = float(pg.detach()), float(clip_frac)
        if batch.online_ref_logp is not None and policy_term is not None and beta > 0:
            rkl = aggregate(policy_term(logp, batch.online_ref_logp), mask, loss_agg, denom)
            loss = loss + beta * rkl
            stats["rkl_loss"] = float(rkl.detach())
        if entropy is not None:
            if entropy_coef > 0:
                loss = loss - entropy_coef * aggregate(entropy, mask, loss_agg, denom)
            stats["policy_entropy"] = float(aggregate(entropy.detach(), mask, "token-mean"))
    if store_logp is not None and batch.store is not None and divergence is not None and beta > 0:
        mask, ref = batch.store.response_mask, batch.store_ref_logp
        if store_topk_logp is None:
            per_token = divergence(store_logp, ref)  # (M, S)
        else:
            per_token = divergence(store_topk_logp, batch.store_topk_ref_logp)  # (M, S)
        div = aggregate(per_token, mask, "token-mean", store_denom)
        loss = loss + beta * div
        with torch.no_grad():
            log_u = (store_logp - ref) * mask
            kl = aggregate(torch.expm1(log_u) - log_u, mask, "token-mean", store_denom)
        stats["div_loss"], stats["kl_ref"] = float(div.detach()), float(kl)
        stats.update(forgetting_stats(store_logp, ref, mask))
    return loss, stats


def _mismatch_report(
    batch: StepBatch, old: Tensor, mask: Tensor, correction: RolloutCorrection
) -> dict[str, float]:
    """Mismatch and correction statistics over the tokens of responses with a nonzero
    advantage: those the correction acts on, and those the trainer forwards when it skips the
    rest (whose `old` is then a placeholder)."""
    adv = batch.advantages
    live = adv != 0 if adv.dim() == 1 else (adv != 0).any(-1)  # (N,)
    live_mask = mask * live.unsqueeze(-1).to(mask.dtype)
    _, _, report = correction(old, batch.engine_logp, live_mask)
    report.update(mismatch_stats(old, batch.engine_logp, live_mask))
    return {key: float(value) for key, value in report.items()}
