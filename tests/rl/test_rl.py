"""GRPO advantages, PPO-clip and the DAPO filters against hand-derived numbers."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import pytest
import torch

from dphrl.algo_config import LossAgg
from dphrl.rl import advantages as rl_advantages
from dphrl.rl import aggregation as rl_aggregation
from dphrl.rl import filters as rl_filters
from dphrl.rl import hybrid as rl_hybrid
from dphrl.rl import policy_loss as rl_policy_loss

REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])  # three groups of G = 4


def test_advantages_with_std():
    # Group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 -> 1.5, -0.5.
    # Group 2: mean 1/2, std sqrt(4 * 0.25 / 3) = 1/sqrt(3) -> +-0.5 sqrt(3).
    # Group 3: all equal -> 0.
    h = 0.5 * math.sqrt(3)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, h, h, -h, -h, 0, 0, 0, 0])
    adv = rl_advantages.group_advantages(REWARDS, 4, norm_std=True, eps=1e-12)
    torch.testing.assert_close(adv, expected)


def test_advantages_without_std():
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0])
    torch.testing.assert_close(rl_advantages.group_advantages(REWARDS, 4, norm_std=False), expected)


@pytest.mark.parametrize("norm_std", [True, False])
def test_all_equal_group_has_zero_advantage(norm_std):
    rewards = torch.tensor([0.8, 0.8, 0.8, 0.0, 0.0, 0.0])
    assert torch.equal(
        rl_advantages.group_advantages(rewards, 3, norm_std=norm_std), torch.zeros(6)
    )


@pytest.mark.parametrize("norm_std", [True, False])
@pytest.mark.parametrize("value", [0.3, 0.7, 0.1, 1 / 3])
def test_equal_partial_credit_rewards_give_exactly_zero_advantage(norm_std, value):
    # Sixteen rewards of 0.3: the float32 mean is 0.3 + 1 ulp, the std ~1e-8, so the plain
    # formula would give each response +0.0289. Equal rewards carry no signal.
    rewards = torch.cat([torch.full((16,), value), torch.tensor([0.0, 1.0] * 8)])
    adv = rl_advantages.group_advantages(rewards, 16, norm_std=norm_std)
    assert torch.equal(adv[:16], torch.zeros(16))
    assert adv[16:].abs().min() > 0.4


def test_advantages_reject_a_ragged_group():
    with pytest.raises(ValueError, match="G=4"):
        rl_advantages.group_advantages(torch.zeros(6), 4)


def _ppo_case():
    """Row 0 has A = +1, row 1 has A = -1; ratios chosen to hit each side of the clip."""
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 1.5, 0.9]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros_like(ratios)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return logp, old, adv, mask


def test_ppo_clip_both_sides_with_clip_higher():
    logp, old, adv, mask = _ppo_case()
    loss, clip_frac = rl_policy_loss.ppo_clip_loss(
        logp, old, adv, mask, clip_low=0.2, clip_high=0.28
    )
    # A>0: rho 1.5 clipped to 1.28 -> -1.28; rho 0.5 keeps -0.5 (pessimistic min); 1.1 in range.
    # A<0: rho 0.5 clipped to 0.8 -> 0.8; rho 1.5 keeps 1.5; the last token is masked.
    expected = torch.tensor([[-1.28, -0.5, -1.1], [0.8, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    assert clip_frac.item() == pytest.approx(2 / 5)
    loss.sum().backward()
    # d/dlogp of -rho A is -rho A where the unclipped term is active; clipped tokens get 0.
    grad = torch.tensor([[0.0, -0.5, -1.1], [0.0, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, grad)


def test_ppo_symmetric_clip_and_per_token_advantages():
    logp, old, adv, mask = _ppo_case()
    loss, clip_frac = rl_policy_loss.ppo_clip_loss(logp, old, adv[:, None].expand(2, 3), mask)
    assert loss[0, 0].item() == pytest.approx(-1.2)  # 1 + clip_high(0.2)
    assert clip_frac.item() == pytest.approx(2 / 5)


def test_ppo_loss_at_ratio_one_is_minus_advantage():
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    loss, clip_frac = rl_policy_loss.ppo_clip_loss(logp, logp.detach(), adv, torch.ones(2, 4))
    torch.testing.assert_close(loss, -adv[:, None].expand(2, 4))
    assert clip_frac.item() == 0.0


def test_aggregation_modes_on_the_ppo_case():
    logp, old, adv, mask = _ppo_case()
    loss, _ = rl_policy_loss.ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # Row sums -2.88 (3 tokens) and 2.3 (2 tokens).
    assert rl_aggregation.aggregate(loss, mask, "token-mean").item() == pytest.approx(-0.58 / 5)
    assert rl_aggregation.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(-0.29)
    assert rl_aggregation.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(
        0.095
    )


def test_aggregation_on_ragged_masks():
    values = torch.arange(1.0, 13.0).view(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # last row fully masked
    assert rl_aggregation.aggregate(values, mask).item() == pytest.approx(
        21 / 6
    )  # (10 + 11) / 6 tokens
    assert rl_aggregation.aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx(
        10.5
    )
    assert rl_aggregation.aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(
        4.0
    )
    assert rl_aggregation.aggregate(values, mask, "token-mean", denom=12).item() == pytest.approx(
        21 / 12
    )
    assert rl_aggregation.aggregate(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(KeyError, match="unknown loss aggregation"):
        rl_aggregation.aggregate(values, mask, "sum")


def test_aggregation_registry_matches_config():
    assert tuple(rl_aggregation.AGGREGATIONS) == tuple(LossAgg)


def test_micro_batches_with_global_denominator_add_up_to_the_full_batch():
    values, mask = torch.rand(6, 5), (torch.rand(6, 5) > 0.3).float()
    full = rl_aggregation.aggregate(values, mask, "token-mean")
    parts = sum(
        rl_aggregation.aggregate(
            values[i : i + 2], mask[i : i + 2], "token-mean", denom=mask.sum().item()
        )
        for i in range(0, 6, 2)
    )
    torch.testing.assert_close(parts, full)


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    assert rl_filters.informative_groups(REWARDS, 4).tolist() == [True, True, False]
    assert rl_filters.informative_groups(torch.tensor([0.8, 0.8, 0.0, 0.8]), 2).tolist() == [
        False,
        True,
    ]


def test_overlong_filter_masks_only_truncated_responses():
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    finished = torch.tensor([True, False, False])
    out = rl_filters.overlong_filter(mask, finished, max_len=4)
    # Row 0 finished exactly at the limit; row 1 is short; row 2 hit 4 tokens unfinished.
    assert out.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


def _packed(mask):
    from dphrl.rl.batching import Packed

    ids = torch.zeros(mask.shape, dtype=torch.long)
    return Packed(ids, torch.ones_like(ids), mask)


# PPO-clip with clip-higher, bound as the trainer binds `algo.clip_low` / `algo.clip_high`.
CLIP_HIGHER = rl_policy_loss.make_policy_loss("ppo_clip", clip_low=0.2, clip_high=0.28)


def _hybrid_case():
    """The PPO case on the rollouts, k1 vs an online reference at log-prob 0, and two ref-store
    tokens with u = 2 and u = 1/2 (stored log-probs 0)."""
    logp, old, adv, mask = _ppo_case()
    store_logp = torch.tensor([[math.log(2.0), math.log(0.5)]], dtype=torch.float64)
    store_logp.requires_grad_(True)
    batch = rl_hybrid.StepBatch(
        _packed(mask),
        adv,
        old_logp=old,
        online_ref_logp=torch.zeros_like(old),
        store=_packed(torch.ones(1, 2, dtype=torch.float64)),
        store_ref_logp=torch.zeros(1, 2, dtype=torch.float64),
    )
    return batch, logp, store_logp


def test_hybrid_loss_adds_ppo_clip_the_policy_term_and_the_divergence():
    from dphrl.rl.divergence import forward_kl, kl_k1

    batch, logp, store_logp = _hybrid_case()
    loss, stats = rl_hybrid.hybrid_loss(
        batch, logp, store_logp, beta=0.1, policy_loss=CLIP_HIGHER,
        divergence=partial(forward_kl, clamp_log_ratio=None, clamp_value=None),
        policy_term=kl_k1,
    )  # fmt: skip
    # PPO-clip token mean: -0.58 / 5 (test_aggregation_modes_on_the_ppo_case).
    # k1 = log r on the 5 unmasked rollout tokens: (2 log 1.5 + 2 log 0.5 + log 1.1) / 5.
    # Forward KL u - log u - 1: (1 - log 2) at u = 2 and (log 2 - 1/2) at u = 1/2; mean 1/4.
    rkl = (2 * math.log(0.75) + math.log(1.1)) / 5
    assert stats["pg_loss"] == pytest.approx(-0.116)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["rkl_loss"] == pytest.approx(rkl)
    assert stats["div_loss"] == pytest.approx(0.25)
    assert stats["kl_ref"] == pytest.approx(0.25)  # the k3 form of KL(pi_ref || pi_theta)
    assert loss.item() == pytest.approx(-0.116 + 0.1 * rkl + 0.1 * 0.25)
    loss.backward()
    # d/dlog u of beta (u - log u - 1) / 2 tokens = beta (u - 1) / 2: 0.05 and -0.025.
    torch.testing.assert_close(store_logp.grad, torch.tensor([[0.05, -0.025]], dtype=torch.float64))
    # rollouts: PPO-clip's gradient (test_ppo_clip_both_sides_with_clip_higher) / 5, plus
    # beta / 5 on each unmasked token from k1.
    ppo = torch.tensor([[0.0, -0.5, -1.1], [0.0, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, (ppo + 0.1 * batch.rollouts.response_mask) / 5)


def test_hybrid_loss_with_beta_zero_is_ppo_clip_alone():
    from dphrl.rl.divergence import forward_kl, kl_k1

    batch, logp, store_logp = _hybrid_case()
    loss, stats = rl_hybrid.hybrid_loss(
        batch, logp, store_logp, beta=0.0, policy_loss=CLIP_HIGHER, divergence=forward_kl,
        policy_term=kl_k1,
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.116)
    assert stats["div_loss"] == stats["rkl_loss"] == stats["kl_ref"] == 0.0


def test_hybrid_loss_on_the_ref_store_alone_with_a_global_denominator():
    from dphrl.rl.divergence import forward_kl

    batch, _, store_logp = _hybrid_case()
    loss, stats = rl_hybrid.hybrid_loss(
        batch, None, store_logp, beta=0.5, divergence=forward_kl, store_denom=4.0
    )
    # the two tokens' sum 1/2 over 4 tokens counted on all minibatches and ranks
    assert loss.item() == pytest.approx(0.5 * 0.125)
    assert stats["pg_loss"] == stats["clip_frac"] == 0.0


def test_hybrid_loss_single_pass_uses_the_forward_as_old_log_probs():
    batch, logp, _ = _hybrid_case()
    batch = dataclasses.replace(batch, old_logp=None, online_ref_logp=None, store=None)
    loss, stats = rl_hybrid.hybrid_loss(batch, logp, None, beta=0.1, loss_agg="seq-mean-token-sum")
    # ratio 1 everywhere: -A summed over each row's tokens (-3 and +2), mean over 2 rows
    assert loss.item() == pytest.approx(-0.5)
    assert stats["clip_frac"] == 0.0


def test_step_batch_minibatch_cuts_rollouts_and_store():
    batch, _, _ = _hybrid_case()
    mb = batch.minibatch(slice(1, 2), slice(0, 1))
    assert len(mb) == 1 and mb.advantages.tolist() == [-1.0]
    assert mb.old_logp.shape == mb.online_ref_logp.shape == (1, 3)
    assert mb.store_ref_logp.shape == (1, 2) and len(mb.store) == 1
    assert batch.minibatch(slice(0, 1), None).store is None


def test_dual_clip_caps_negative_advantage_losses():
    # A = -1: rho 5 -> unclipped loss 5, clip keeps the max 5; dual-clip c = 3 caps it at 3 (and
    # its gradient is 0). rho 2 -> 2 < 3, unchanged. A = +1 rows are untouched by dual-clip.
    ratios = torch.tensor([[5.0, 2.0], [5.0, 0.5]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones_like(ratios)
    loss, _ = rl_policy_loss.ppo_clip_loss(logp, torch.zeros_like(ratios), adv, mask, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, 2.0], [-1.2, -0.5]], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, 2.0], [0.0, -0.5]], dtype=torch.float64)
    )
    plain, _ = rl_policy_loss.ppo_clip_loss(logp.detach(), torch.zeros_like(ratios), adv, mask)
    assert plain[0, 0].item() == pytest.approx(5.0)


def test_log_ratio_clamp_bounds_the_ratio():
    # logp - old = 30 with A = -1: exp(30) unclamped; clamped at 20 the loss is e^20.
    logp, old = torch.tensor([[30.0]]), torch.zeros(1, 1)
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 1)
    loss, _ = rl_policy_loss.ppo_clip_loss(logp, old, adv, mask, clamp_log_ratio=20.0)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-6)
    both, _ = rl_policy_loss.ppo_clip_loss(
        logp, old, adv, mask, clamp_log_ratio=20.0, dual_clip=3.0
    )
    assert both.item() == pytest.approx(3.0)


def test_soft_overlong_penalty_is_dapos_linear_ramp():
    # max_len 10, buffer 4: no penalty up to 6 tokens, then -1/4 per token, -1 at the limit.
    lengths = torch.tensor([3, 6, 7, 8, 10])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0])
    torch.testing.assert_close(rl_filters.soft_overlong_penalty(lengths, 10, 4), expected)
    torch.testing.assert_close(
        rl_filters.soft_overlong_penalty(lengths, 10, 4, 0.5), expected * 0.5
    )


def test_forgetting_stats_by_hand():
    # Three ref responses: log r per token (0.5, -1.0), (-0.8, -0.4, [masked 9]), (0.1).
    # Token mean (0.5 - 1 - 0.8 - 0.4 + 0.1) / 5 = -0.32; sequence sums -0.5, -1.2, 0.1: mean
    # -0.5333; one of three (-1.2) fell more than 1 nat.
    log_r = torch.tensor([[0.5, -1.0, 0.0], [-0.8, -0.4, 9.0], [0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0], [1, 0, 0]])
    ref = torch.full_like(log_r, -2.0)
    stats = rl_hybrid.forgetting_stats(ref + log_r, ref, mask)
    assert stats["ref_logratio_token"] == pytest.approx(-0.32)
    assert stats["ref_logratio_seq"] == pytest.approx(-1.6 / 3)
    assert stats["ref_forgot_frac"] == pytest.approx(1 / 3)


def test_hybrid_loss_reports_forgetting_on_the_ref_batch():
    from dphrl.rl.divergence import forward_kl

    batch, logp, store_logp = _hybrid_case()  # log r = log 2, log 1/2 on one response: sum 0
    _, stats = rl_hybrid.hybrid_loss(batch, logp, store_logp, beta=0.1, divergence=forward_kl)
    assert stats["ref_logratio_token"] == pytest.approx(0.0, abs=1e-12)
    assert stats["ref_logratio_seq"] == pytest.approx(0.0, abs=1e-12)
    assert stats["ref_forgot_frac"] == 0.0
    _, stats = rl_hybrid.hybrid_loss(batch, logp, store_logp - 1.0, beta=0.1, divergence=forward_kl)
    assert stats["ref_logratio_seq"] == pytest.approx(-2.0) and stats["ref_forgot_frac"] == 1.0


def test_hybrid_loss_with_the_top_k_divergence_reads_the_stored_top_k():
    """The value on the ref store is forward_kl_topk of the policy's top-k log-probs against
    the stored ones (the sampled token's log-prob still feeds kl_ref and the forgetting stats)."""
    from dphrl.rl.divergence import forward_kl_topk

    batch, logp, store_logp = _hybrid_case()
    # Two tokens, K = 1: the by-hand case of test_forward_kl_topk_by_hand on each, 1/2 log(4/3).
    batch.store_topk_ref_logp = torch.full((1, 2, 1), math.log(0.5), dtype=torch.float64)
    topk = torch.full((1, 2, 1), math.log(0.25), dtype=torch.float64, requires_grad=True)
    loss, stats = rl_hybrid.hybrid_loss(
        batch, None, store_logp, beta=0.5, divergence=forward_kl_topk, store_topk_logp=topk
    )
    assert stats["div_loss"] == pytest.approx(0.5 * math.log(4 / 3))
    assert stats["kl_ref"] == pytest.approx(0.25)  # from the sampled tokens, as before
    loss.backward()
    torch.testing.assert_close(
        topk.grad, torch.full((1, 2, 1), 0.5 * -1 / 3 / 2, dtype=torch.float64)
    )
    assert store_logp.grad is None  # the top-k term alone carries the rehearsal's gradient


def test_hybrid_loss_entropy_bonus():
    # Entropy 1.0 on every rollout token: the bonus is -coef * token-mean = -0.1, its gradient
    # -coef / 5 on each of the 5 unmasked tokens; policy_entropy is reported either way.
    batch, logp, _ = _hybrid_case()
    entropy = torch.ones_like(logp, requires_grad=True)
    base, _ = rl_hybrid.hybrid_loss(batch, logp, None, beta=0.0, policy_loss=CLIP_HIGHER)
    loss, stats = rl_hybrid.hybrid_loss(
        batch, logp, None, beta=0.0, policy_loss=CLIP_HIGHER, entropy=entropy, entropy_coef=0.1
    )
    assert loss.item() == pytest.approx(base.item() - 0.1)
    assert stats["policy_entropy"] == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(entropy.grad, -0.1 * batch.rollouts.response_mask / 5)
