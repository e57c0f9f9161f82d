"""Divergences: hand-derived values, exact identities on small categoricals, Monte-Carlo limits."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from dphrl.config import DivergenceName, Estimator
from dphrl.rl import divergence as dv

LOG2 = math.log(2.0)
# The per-token divergences of (logp, ref_logp) of one token each; the top-k ones are below.
PER_TOKEN = {k: f for k, f in dv.DIVERGENCES.items() if k not in dv.TOPK_DIVERGENCES}
ALL = {
    **PER_TOKEN,
    **{f"reverse_kl_{k}": f for k, f in dv.REVERSE_KL_ESTIMATORS.items()},
    "js_policy_half": dv.js_policy_half,
}


def _categoricals(seed: int, n: int = 6, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of two random categoricals, P (policy) and Q (reference), float64."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(spread * torch.randn(n, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(spread * torch.randn(n, generator=g, dtype=torch.float64), -1)
    return logp, logq


def _kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    return (loga.exp() * (loga - logb)).sum()


def _js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JS(P, Q) = (KL(P||M) + KL(Q||M)) / 2, computed directly from the definition."""
    logm = torch.logaddexp(logp, logq) - LOG2
    return 0.5 * (_kl(logp, logm) + _kl(logq, logm))


def _alpha_exact(logp: torch.Tensor, logq: torch.Tensor, a: float) -> torch.Tensor:
    """Amari alpha divergence (1 - sum P^(1-a) Q^a) / (a (1 - a)), from its definition."""
    return (1 - torch.exp((1 - a) * logp + a * logq).sum()) / (a * (1 - a))


def test_registry_matches_config_names():
    assert set(dv.DIVERGENCES) == set(DivergenceName) - {"none", "reverse_kl"}
    assert set(dv.REVERSE_KL_ESTIMATORS) == set(Estimator)
    assert set(dv.POLICY_SAMPLE_TERMS) <= set(dv.DIVERGENCES)


@pytest.mark.parametrize(
    ("fn", "log_u", "expected"),
    [
        (dv.forward_kl, 1.0, math.e - 2),  # e - 1 - 1
        (dv.forward_kl, -1.0, math.exp(-1)),  # 1/e + 1 - 1
        (dv.forward_kl, math.log(2), 1 - LOG2),  # 2 - log 2 - 1
        (dv.forward_kl, -30.0, 10.0),  # log u clamped to -20: e^-20 + 19, then value to 10
        (dv.js, math.log(3), 3 * math.log(3) - 4 * LOG2),  # 0.5232
        (dv.js, -math.log(3), -math.log(3) / 3 - 4 / 3 * math.log(2 / 3)),  # 0.1744 = f(3) / 3
        (dv.js, -60.0, LOG2),  # f(0) = log 2
        (dv.js_ref_half, math.log(3), 1 - LOG2),  # (3 - 1)/2 - log 2
        (dv.js_ref_half, -60.0, LOG2 - 0.5),  # -1/2 + log 2
        (dv.js_policy_half, -math.log(3), 1 - LOG2),  # s = (1 + 3)/2 = 2: 2 - 1 - log 2
        (dv.alpha_divergence, math.log(4), 2.0),  # (2 - 2 - 0.5) / (-0.25)
        (dv.alpha_divergence, -math.log(4), 0.5),  # (0.5 - 0.125 - 0.5) / (-0.25)
        (dv.kl_k1, 1.0, 1.0),
        (dv.kl_k2, 1.0, 0.5),
        (dv.kl_k3, 1.0, math.exp(-1)),  # e^-1 - 1 + 1
    ],
)
def test_hand_derived_values(fn, log_u, expected):
    value = fn(torch.tensor([log_u], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_forward_kl_clamps_stop_the_gradient():
    logp = torch.tensor([-30.0, 0.5], dtype=torch.float64, requires_grad=True)
    dv.forward_kl(logp, torch.zeros(2, dtype=torch.float64)).sum().backward()
    assert logp.grad[0] == 0.0
    assert logp.grad[1].item() == pytest.approx(math.expm1(0.5))  # d/dlog u (u - log u - 1) = u - 1


@pytest.mark.parametrize("name", sorted(ALL))
def test_value_and_gradient_zero_at_u_equal_one(name):
    ref = torch.log_softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    logp = ref.clone().requires_grad_(True)
    value = ALL[name](logp, ref)
    value.sum().backward()
    assert torch.equal(value, torch.zeros_like(value))
    # k1 = log r is the exception: its per-token gradient is 1 everywhere (zero only in
    # expectation under on-policy sampling), so it is checked for that instead.
    expected_grad = 1.0 if name == "reverse_kl_k1" else 0.0
    torch.testing.assert_close(logp.grad, torch.full_like(ref, expected_grad), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_token_values_are_non_negative(name, dtype):
    log_u = torch.linspace(-25, 25, 5001, dtype=dtype)
    value = ALL[name](log_u, torch.zeros_like(log_u))
    assert torch.isfinite(value).all()
    if name == "reverse_kl_k1":
        assert (value < 0).any()  # log r < 0 whenever the policy lowered the token's prob
        return
    # Mathematically >= 0; floating-point cancellation near u = 1 may leave a few ulps below.
    assert value.min().item() >= (-1e-12 if dtype == torch.float64 else -1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expectations_over_full_categorical_are_exact(seed):
    """Sum over every token y of Q(y) f(u(y)) (or P(y) k(r(y))) equals the divergence exactly."""
    logp, logq = _categoricals(seed, spread=2.0)
    q, p = logq.exp(), logp.exp()
    logm = torch.logaddexp(logp, logq) - LOG2
    exact = {
        "forward_kl": _kl(logq, logp),
        "js": 2 * _js(logp, logq),
        "js_full": _kl(logq, logm),
        "alpha": _alpha_exact(logp, logq, 0.5),
    }
    # The official clamps bias forward KL where u - log u - 1 > 10 (u > ~13 or u < ~e^-11),
    # which these spread-out categoricals reach; the identity is about the unclamped value.
    fns = {
        **PER_TOKEN,
        "forward_kl": partial(dv.forward_kl, clamp_log_ratio=None, clamp_value=None),
    }
    for name, fn in fns.items():
        torch.testing.assert_close((q * fn(logp, logq)).sum(), exact[name], rtol=1e-10, atol=1e-12)
    unclamped_k3 = partial(dv.kl_k3, clamp_log_ratio=None, clamp_value=None)  # clamped as fkl
    for fn in (dv.kl_k1, unclamped_k3):
        expectation = (p * fn(logp, logq)).sum()
        torch.testing.assert_close(expectation, _kl(logp, logq), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((p * dv.js_policy_half(logp, logq)).sum(), _kl(logp, logm))
    full = (q * dv.js_ref_half(logp, logq)).sum() + (p * dv.js_policy_half(logp, logq)).sum()
    torch.testing.assert_close(
        full, 2 * _js(logp, logq)
    )  # js_full's two halves = js in expectation


def test_js_generator_is_twice_js_and_bounded():
    for seed in range(20):
        logp, logq = _categoricals(seed, spread=4.0)
        gen = (logq.exp() * dv.js(logp, logq)).sum()
        torch.testing.assert_close(gen, 2 * _js(logp, logq), rtol=1e-10, atol=1e-12)
        assert 0.0 <= gen.item() <= 2 * LOG2
    # Nearly disjoint supports reach the upper bound 2 log 2.
    logp = torch.log(torch.tensor([1 - 1e-12, 1e-12], dtype=torch.float64))
    gen = (logp.flip(0).exp() * dv.js(logp, logp.flip(0))).sum()
    assert gen.item() == pytest.approx(2 * LOG2, abs=1e-9)


def _mc_mean(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


@pytest.mark.parametrize("seed", [0, 1])
def test_monte_carlo_estimates_converge(seed):
    """200k samples: each estimate is within 5 standard errors (and 2%) of the exact value."""
    logp, logq = _categoricals(seed)
    g = torch.Generator().manual_seed(100 + seed)
    from_q = torch.multinomial(logq.exp(), 200_000, replacement=True, generator=g)
    from_p = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    logm = torch.logaddexp(logp, logq) - LOG2
    cases = [  # (estimator, samples, exact value)
        (dv.forward_kl, from_q, _kl(logq, logp)),
        (dv.js, from_q, 2 * _js(logp, logq)),
        (dv.js_ref_half, from_q, _kl(logq, logm)),
        (dv.js_policy_half, from_p, _kl(logp, logm)),
        (dv.alpha_divergence, from_q, _alpha_exact(logp, logq, 0.5)),
        (dv.kl_k1, from_p, _kl(logp, logq)),
        (dv.kl_k3, from_p, _kl(logp, logq)),
        # k2 is biased: it converges to E_P[(log r)^2 / 2], not to KL(P || Q).
        (dv.kl_k2, from_p, (logp.exp() * 0.5 * (logp - logq).square()).sum()),
    ]
    for fn, idx, exact in cases:
        mean, se = _mc_mean(fn(logp[idx], logq[idx]))
        assert abs(mean - exact.item()) <= max(5 * se, 1e-9), fn.__name__
        assert mean == pytest.approx(exact.item(), rel=0.02), fn.__name__


def test_k2_is_close_to_kl_only_for_close_distributions():
    logp, logq = _categoricals(0, spread=0.05)
    k2 = (logp.exp() * dv.kl_k2(logp, logq)).sum()
    assert k2.item() == pytest.approx(_kl(logp, logq).item(), rel=0.05)


def test_alpha_limits_are_reverse_and_forward_kl():
    """alpha -> 0 gives KL(pi_theta || pi_ref) (reverse), alpha -> 1 gives KL(pi_ref || pi_theta)."""
    logp, logq = _categoricals(3, spread=1.5)
    q, log_u = logq.exp(), logp - logq
    for eps in (1e-3, 1e-5):
        near_0 = (q * dv.alpha_divergence(logp, logq, alpha=eps)).sum()
        near_1 = (q * dv.alpha_divergence(logp, logq, alpha=1 - eps)).sum()
        assert near_0.item() == pytest.approx(_kl(logp, logq).item(), rel=20 * eps)
        assert near_1.item() == pytest.approx(_kl(logq, logp).item(), rel=20 * eps)
    # Per token, the generators themselves converge: u log u - u + 1 and u - log u - 1.
    u = log_u.exp()
    torch.testing.assert_close(
        dv.alpha_divergence(logp, logq, alpha=1e-6), u * log_u - u + 1, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        dv.alpha_divergence(logp, logq, alpha=1 - 1e-6), u - log_u - 1, rtol=1e-4, atol=1e-6
    )


def test_make_divergence_binds_keywords():
    log_u = torch.tensor([math.log(4.0)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert dv.make_divergence("alpha", alpha=0.5)(log_u, zero).item() == pytest.approx(2.0)
    assert dv.make_divergence("forward_kl", clamp_value=0.1)(log_u, zero).item() == 0.1
    assert dv.make_divergence("js", clamp_log_ratio=0.0)(log_u, zero).item() == 0.0
    with pytest.raises(KeyError, match="unknown divergence"):
        dv.make_divergence("reverse_kl")
    with pytest.raises(ValueError, match="alpha"):
        dv.alpha_divergence(log_u, zero, alpha=1.0)


def test_default_clamps_are_the_official_codes():
    # verl's kl_penalty (forward KL, k3 reverse KL) clamps |log u| at 20 and the value at 10;
    # js_low_var and alpha_divergence_f are unclamped: at log u = 30 JS is still growing.
    big, zero = torch.tensor([30.0]), torch.tensor([0.0])
    assert dv.kl_k3(-big, zero).item() == 10.0
    assert dv.forward_kl(-big, zero).item() == 10.0
    assert dv.make_divergence("js")(big, zero).item() > 1e12
    assert dv.make_divergence("alpha", alpha=0.2)(big, zero).item() > 1e12


def _top(logq: torch.Tensor, k: int) -> torch.Tensor:
    return logq.topk(k).indices


def test_forward_kl_topk_by_hand():
    # p_ref = (1/2, 1/4, 1/4), p_theta = (1/4, 1/4, 1/2); K = 1 keeps token 0.
    # head = 1/2 log(2); tail: Q = 1/2, P = 3/4 -> 1/2 log(2/3); value 1/2 log(4/3).
    # d/dl_0 [-q_0 l_0 - Q log(1 - e^l_0)] = -1/2 + Q e^l_0 / (1 - e^l_0) = -1/2 + 1/6 = -1/3.
    l0 = torch.tensor([[math.log(0.25)]], dtype=torch.float64, requires_grad=True)
    q0 = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    value = dv.forward_kl_topk(l0, q0)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(0.5 * math.log(4 / 3))
    value.sum().backward()
    assert l0.grad.item() == pytest.approx(-1 / 3)
    # The head alone (verl's form) would be 1/2 log 2 = 0.347 > the exact KL here:
    exact = _kl(torch.tensor([0.5, 0.25, 0.25]).log(), torch.tensor([0.25, 0.25, 0.5]).log())
    assert exact.item() == pytest.approx(0.25 * math.log(2))  # 0.173
    assert value.item() <= exact.item() < 0.5 * math.log(2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_kl_topk_against_the_exact_kl_on_a_small_vocabulary(seed):
    """K = V is the exact KL(pi_ref || pi_theta); K < V lies in [0, exact] and grows with K."""
    logp, logq = _categoricals(seed, n=8, spread=2.0)
    exact = _kl(logq, logp)
    values = []
    for k in range(1, 9):
        top = _top(logq, k)
        values.append(dv.forward_kl_topk(logp[top], logq[top]).item())
    assert values[-1] == pytest.approx(exact.item(), rel=1e-9)
    assert all(0 <= v <= exact.item() + 1e-12 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))  # coarser -> smaller (DPI)


def test_forward_kl_topk_is_zero_with_zero_gradient_at_the_reference():
    logq = torch.log_softmax(torch.randn(2, 3, 16, dtype=torch.float64), -1)
    top = logq.topk(4, dim=-1)
    logp = top.values.clone().requires_grad_(True)
    value = dv.forward_kl_topk(logp, top.values)
    torch.testing.assert_close(value, torch.zeros(2, 3, dtype=torch.float64))
    value.sum().backward()
    torch.testing.assert_close(logp.grad, torch.zeros_like(logp), atol=1e-12, rtol=0)


def test_forward_kl_topk_gradient_equals_the_full_softmax_gradient_at_k_equal_v():
    """Through log_softmax, the top-k term at K = V has the exact forward KL's gradient on the
    logits, p_theta - p_ref."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    logq = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=g), -1)
    dv.forward_kl_topk(torch.log_softmax(z, -1), logq).backward()
    torch.testing.assert_close(z.grad, torch.softmax(z.detach(), -1) - logq.exp())
