"""GSPO, pass@k advantages, Clip-Cov and KL-Cov against hand-derived numbers."""

from __future__ import annotations

import math

import pytest
import torch

from dphrl.rl import advantages as rl_advantages
from dphrl.rl import aggregation as rl_aggregation
from dphrl.rl import policy_loss as rl_policy_loss


def test_gspo_one_ratio_per_response_and_its_gradient():
    # Row 0 (A = +1): log ratios 0.3, 0.1 -> s = exp(0.2) = 1.2214 > 1 + 0.1: clipped, no gradient.
    # Row 1 (A = -1): log ratios -0.1, 0.1, [masked 5.0] -> s = exp(0) = 1, inside: loss = 1.
    logp = torch.tensor([[0.3, 0.1, 0.0], [-0.1, 0.1, 5.0]], dtype=torch.float64)
    logp.requires_grad_(True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    loss, clip_frac = rl_policy_loss.gspo_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.1)
    expected = torch.tensor([[-1.1, -1.1, 0], [1.0, 1.0, 0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    assert clip_frac.item() == pytest.approx(2 / 4)
    rl_aggregation.aggregate(loss, mask, "seq-mean-token-mean").backward()
    # mean over responses of loss_i; d loss_1 / d logp_1t = -A s / |y| = 1 * 1 / 2 for each token.
    grad = torch.tensor([[0.0, 0, 0], [0.25, 0.25, 0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, grad)


def test_gspo_at_ratio_one_equals_ppo_clip():
    logp = torch.randn(3, 4)
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.ones(3, 4)
    gspo, _ = rl_policy_loss.gspo_loss(logp, logp, adv, mask)
    ppo, _ = rl_policy_loss.ppo_clip_loss(logp, logp, adv, mask)
    torch.testing.assert_close(gspo, ppo)


def test_passk_advantages_by_hand():
    # n = 4, k = 2. Group 1, c = 1: rho = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2;
    # correct (1 - 1/2)/(1/2) = 1; wrong (1 - 1/2 - C(2,1)/C(3,1))/(1/2) = (1/2 - 2/3) * 2 = -1/3.
    # Group 2, c = 3: rho = 1 - C(1,2)/6 = 1 -> sigma 0 -> 0. Group 3, c = 0: rho = 0 -> 0.
    rewards = torch.tensor([0.0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0])
    adv = rl_advantages.passk_advantages(rewards, 4, 2)
    third = -1 / 3
    expected = torch.tensor([third, 1, third, third, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)


def test_passk_group_of_six():
    # n = 6, c = 2, k = 3: rho = 1 - C(4,3)/C(6,3) = 1 - 4/20 = 0.8, sigma = 0.4;
    # correct 0.2 / 0.4 = 0.5; wrong (0.2 - C(3,2)/C(5,2)) / 0.4 = (0.2 - 0.3) / 0.4 = -0.25.
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0])
    adv = rl_advantages.passk_advantages(rewards, 6, 3)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.25, -0.25, 0.5, -0.25, -0.25]))


def test_passk_with_k_one_is_grpo_with_population_std():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    pop = rewards.view(2, 4)
    expected = (pop - pop.mean(-1, keepdim=True)) / pop.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(rl_advantages.passk_advantages(rewards, 4, 1), expected.reshape(-1))


def test_passk_rejects_k_above_group_size():
    with pytest.raises(ValueError, match="k=5"):
        rl_advantages.passk_advantages(torch.zeros(4), 4, 5)


def test_token_covariance_by_hand():
    # Tokens (logp, A): (-1, 1), (-3, 1), (-2, -1), [masked]; means -2 and 1/3.
    # Cov: (1)(2/3), (-1)(2/3), (0)(-4/3), 0.
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1], [1, 0]])
    cov = rl_policy_loss.token_covariance(logp, adv, mask)
    torch.testing.assert_close(cov, torch.tensor([[2 / 3, -2 / 3], [0.0, 0.0]]))


def _cov_case():
    """Four tokens, ratio 1; token 0 has the highest Cov (logp -1 above the mean, A > 0)."""
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]], dtype=torch.float64)
    old = logp.clone()
    logp.requires_grad_(True)
    adv = torch.tensor([3.0, -3.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.float64)
    return logp, old, adv, mask


def test_clip_cov_detaches_the_high_cov_token_only():
    # mean logp -2, mean A 0: Cov = (1)(3) = 3, (-1)(3) = -3, 0, 0; band [1, 5] holds token 0.
    logp, old, adv, mask = _cov_case()
    loss, _ = rl_policy_loss.clip_cov_loss(
        logp, old, adv, mask, ratio=0.25, cov_low=1.0, cov_high=5.0
    )
    torch.testing.assert_close(
        loss.detach(), torch.tensor([[-3.0, -3], [3, 3]], dtype=torch.float64)
    )
    loss.sum().backward()
    # d(-rho A)/dlogp = -A at rho = 1; token 0 is cut.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -3], [3, 3]], dtype=torch.float64))


def test_clip_cov_with_zero_ratio_is_ppo_clip():
    logp, old, adv, mask = _cov_case()
    loss, frac = rl_policy_loss.clip_cov_loss(logp, old, adv, mask, ratio=0.0)
    ppo, ppo_frac = rl_policy_loss.ppo_clip_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, ppo)
    assert frac == ppo_frac


def test_kl_cov_penalises_the_top_cov_token():
    # ratio 0.25 of 4 tokens -> the top 1 by Cov: token 0. Its log ratio is 0.5 (logp -0.5 vs -1):
    # loss_0 = -exp(0.5) * 3 + 2 * 0.5; gradient -3 exp(0.5) + 2 (sign of the log ratio is +).
    logp, old, adv, mask = _cov_case()
    with torch.no_grad():
        logp[0, 0] = -0.5
    loss, frac = rl_policy_loss.kl_cov_loss(logp, old, adv, mask, ratio=0.25, coef=2.0)
    e = math.exp(0.5)
    expected = torch.tensor([[-3 * e + 1.0, -3], [3, 3]], dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), expected)
    assert frac.item() == pytest.approx(0.25)
    loss.sum().backward()
    grad = torch.tensor([[-3 * e + 2.0, -3], [3, 3]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, grad)


def test_registries_build_each_loss_and_advantage():
    logp = torch.zeros(2, 3)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    for name in rl_policy_loss.POLICY_LOSSES:
        fn = rl_policy_loss.make_policy_loss(name, clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.1)
        loss, _ = fn(logp, logp, adv, mask)
        torch.testing.assert_close(loss, -adv[:, None].expand(2, 3))  # ratio 1 everywhere
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    for name in rl_advantages.ADVANTAGES:
        assert rl_advantages.make_advantage(name, k=1)(rewards, 4).shape == (4,)
    with pytest.raises(KeyError, match="known: ppo_clip"):
        rl_policy_loss.make_policy_loss("ppo", clip_low=0.2, clip_high=0.2)


def test_config_names_match_the_registries():
    from dphrl.config import ADVANTAGE_NAMES, POLICY_LOSS_NAMES

    assert tuple(rl_policy_loss.POLICY_LOSSES) == POLICY_LOSS_NAMES
    assert tuple(rl_advantages.ADVANTAGES) == ADVANTAGE_NAMES


@pytest.mark.parametrize("name", sorted(rl_policy_loss.POLICY_LOSSES))
def test_zero_advantage_rows_are_inert_exactly_where_declared(name):
    """A row with A = 0 changes neither the loss nor another row's gradient under the losses in
    ZERO_ADVANTAGE_INERT (the trainer skips its forward); Clip-Cov and KL-Cov see it, through
    the covariance's means (which tokens are in the band, or in the top share)."""
    torch.manual_seed(0)
    old = -torch.rand(3, 4) * 3
    logp = (old + 0.1 * torch.randn(3, 4)).requires_grad_(True)
    adv, mask = torch.tensor([2.0, -1.0, 0.0]), torch.ones(3, 4)
    grads = []
    for third_row in (logp[2:], old[2:] - 5.0):  # the A = 0 row, then far lower log-probs
        fn = rl_policy_loss.make_policy_loss(
            name, clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.3, clip_cov_low=0.0,
            kl_cov_ratio=0.3, generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        rows = torch.cat([logp[:2], third_row])
        (g,) = torch.autograd.grad(fn(rows, old, adv, mask)[0].sum(), logp)
        grads.append(g[:2])
    assert torch.allclose(grads[0], grads[1]) == (name in rl_policy_loss.ZERO_ADVANTAGE_INERT)


def test_dr_grpo_sums_tokens_over_a_constant_length():
    # Token sums 6 and 4 over 2 responses x L: L = the mask's width 3, or given via denom.
    values = torch.tensor([[1.0, 2, 3], [4, 9, 9]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    assert rl_aggregation.aggregate(
        values, mask, "seq-mean-token-sum-norm"
    ).item() == pytest.approx(10 / 6)
    assert rl_aggregation.aggregate(
        values, mask, "seq-mean-token-sum-norm", 2 * 8
    ).item() == pytest.approx(10 / 16)
