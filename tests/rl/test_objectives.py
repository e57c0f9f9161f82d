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


def test_policy_loss_for_binds_the_options_of_the_chosen_losss_group():
    from dphrl.algo_config import AlgoConfig, CispoConfig, ClipCovConfig

    fn = rl_policy_loss.policy_loss_for(
        AlgoConfig(loss="clip_cov", clip_cov=ClipCovConfig(0.1, 0.5, 2.0))
    )
    assert (fn.keywords["ratio"], fn.keywords["cov_low"], fn.keywords["cov_high"]) == (
        0.1,
        0.5,
        2.0,
    )
    fn = rl_policy_loss.policy_loss_for(AlgoConfig(loss="cispo", cispo=CispoConfig(0.3, 0.4)))
    assert (fn.keywords["weight_low"], fn.keywords["weight_high"]) == (0.3, 0.4)


def test_config_names_match_the_registries():
    from dphrl.algo_config import ADVANTAGE_NAMES, POLICY_LOSS_NAMES

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


def _probs_case():
    """p_old = 1/2 on every token; p and A per token (a-f), as the DPPO tests below read them."""
    p = torch.tensor([[0.8, 0.6, 0.2, 0.4, 0.9, 0.68]], dtype=torch.float64)
    logp = p.log().requires_grad_(True)
    old = torch.full_like(p, math.log(0.5))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    return logp, old, adv, torch.ones_like(p)


def test_dppo_tv_blocks_tokens_moved_past_delta_in_the_advantages_direction():
    # TV |p - 1/2| with delta 0.2: a (A > 0, up 0.3) and c (A < 0, down 0.3) are blocked; e moved
    # up 0.4 against A < 0: not blocked. Value -A rho, gradient d/dlogp = -A rho (0 if blocked).
    logp, old, adv, mask = _probs_case()
    loss, frac = rl_policy_loss.dppo_tv_loss(logp, old, adv, mask)
    rho = torch.tensor([[0, 1.2, 0, 0.8, 1.8, 1.36]], dtype=torch.float64)
    torch.testing.assert_close(loss, -adv * rho)
    assert frac.item() == pytest.approx(2 / 6)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv * rho)


def test_dppo_kl_uses_the_binary_kl_and_caps_the_weight():
    # KL(Bern(1/2) || Bern(p)) = 0.5 log(0.25 / (p (1 - p))): 0.2231 at p = 0.8 or 0.2 (blocked),
    # 0.0204 at 0.6 / 0.4, 0.0694 at 0.68 (> 0.05: blocked, though its TV 0.18 passes).
    # Cap C = 1.5: e's weight 1.8 -> 1.5, value and gradient alike.
    logp, old, adv, mask = _probs_case()
    binary_kl = 0.5 * math.log(0.25 / (0.68 * 0.32))
    assert binary_kl == pytest.approx(0.0694, abs=1e-4)
    loss, frac = rl_policy_loss.dppo_kl_loss(logp, old, adv, mask, ratio_cap=1.5)
    w = torch.tensor([[0, 1.2, 0, 0.8, 1.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(loss, -adv * w)
    assert frac.item() == pytest.approx(3 / 6)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv * w)


def test_cispo_clips_the_weight_but_keeps_every_gradient():
    # rho = 2 with A = +1: PPO-clip (0.2) has no gradient there; CISPO's weight is clip(2, 0.8,
    # 1.2) = 1.2: value -1.2, gradient -1.2. rho = 0.5, A = -1: weight 0.8, value and grad +0.8.
    # rho = 1: -A, gradient -A.
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    logp.requires_grad_(True)
    old = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.ones_like(old)
    loss, frac = rl_policy_loss.cispo_loss(logp, old, adv, mask, weight_low=0.2, weight_high=0.2)
    expected = torch.tensor([[-1.2, 0.8, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    assert frac.item() == pytest.approx(2 / 3)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, expected)
    ppo, _ = rl_policy_loss.ppo_clip_loss(logp.detach().requires_grad_(True), old, adv, mask)
    assert ppo[0, 0].item() == pytest.approx(-1.2)  # same value, but PPO-clip's is constant there


def test_cispo_default_has_no_lower_bound():
    logp = torch.tensor([[math.log(0.05)]], dtype=torch.float64)
    old = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    loss, _ = rl_policy_loss.cispo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.1)  # weight rho = 0.1, unclipped below


def test_maxrl_divides_by_the_group_mean():
    # G = 4. 1 of 4 correct: mean 1/4 -> (1 - 1/4) / (1/4) = 3, wrong (0 - 1/4) / (1/4) = -1.
    # 3 of 4: mean 3/4 -> correct 1/3, wrong -1. All wrong / all right: 0.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    adv = rl_advantages.maxrl_advantages(rewards, 4)
    third = 1 / 3
    expected = torch.tensor([3.0, -1, -1, -1, third, third, third, -1] + [0.0] * 8)
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=1e-5)
    # Each group's advantages sum to 0 (the control variate), like GRPO's.
    torch.testing.assert_close(adv.view(4, 4).sum(-1), torch.zeros(4), atol=1e-4, rtol=0)


def test_adaptive_entropy_coefficient_follows_the_target():
    from dphrl.rl.entropy import adaptive_entropy_coef

    kw = {"target": 0.2, "step": 0.005, "max_coef": 0.01}
    assert adaptive_entropy_coef(0.0, 0.1, **kw) == pytest.approx(0.005)  # below: up
    assert adaptive_entropy_coef(0.0, 0.3, **kw) == 0.0  # above, at 0: stays 0
    assert adaptive_entropy_coef(0.008, 0.1, **kw) == pytest.approx(0.01)  # capped
    assert adaptive_entropy_coef(0.008, 0.3, **kw) == pytest.approx(0.003)  # above: down
    assert adaptive_entropy_coef(0.004, 0.2, **kw) == pytest.approx(0.004)  # on target
