"""Every divergence DPH-RL can use, as a pure function of per-token log-probs.

Notation (DPH-RL, arXiv 2509.07430, Sec. 3): P = pi_theta (the policy being trained),
Q = pi_ref (the initial policy), log r = log P(y_t) - log Q(y_t), u = exp(log r) = P / Q.

Two families, told apart by where the tokens y come from:

* **Reference samples** (`DIVERGENCES`): y ~ Q, read from the ref store, no online reference
  model. Each is an f-divergence written with the generator f evaluated at u:

      D_f(P || Q) = E_{y~Q}[ f(P(y) / Q(y)) ] = E_{y~Q}[ f(u) ],   f convex, f(1) = 0.

  Adding c (u - 1) to f changes nothing in expectation (E_Q[u] = 1), and choosing c = -f'(1)
  makes every per-token value >= 0 with value and gradient zero at u = 1. All the generators
  here are written in that non-negative form.
* **Policy samples** (`REVERSE_KL_ESTIMATORS`, `POLICY_SAMPLE_TERMS`): y ~ P, the policy's own
  rollouts, scored by an online reference model (the GRPO + KL baseline and the second half of
  `js_full`).

`forward_kl_topk` reads more of the reference than the sampled token: the initial policy's K
most likely tokens at each response position, stored at pre-sampling time (`ref.topk`), and the
policy's log-probs of those tokens; its inputs have a trailing `# (..., K)` and its output drops
it (`TOPK_DIVERGENCES`).

Every other function maps `(logp, ref_logp)` of any shape (typically `# (B, T)`) to per-token values
of the same shape; masking and averaging belong to `dphrl.rl.aggregation.aggregate`. `clamp_log_ratio`
clamps log u before use, `clamp_value` clamps the per-token value after (both stop the gradient
outside the clamp); None turns a clamp off. Each function's defaults are the official DPH-RL
code's (verl `core_algos.py`): forward KL and the k3 reverse KL clamp |log u| <= 20 and the
value to [-10, 10] (verl's `kl_penalty`, which both go through); JS and alpha are unclamped
(`js_low_var`, `alpha_divergence_f`); k1 and k2 are unclamped. `train` keeps these defaults
unless `divergence.clamp_log_ratio` / `divergence.clamp_value` are set, which then clamp
whichever divergence is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

LOG2 = math.log(2.0)


def _log_ratio(logp: Tensor, ref_logp: Tensor, clamp_log_ratio: float | None) -> Tensor:
    log_r = logp - ref_logp
    return log_r if clamp_log_ratio is None else log_r.clamp(-clamp_log_ratio, clamp_log_ratio)


def _clamp(value: Tensor, clamp_value: float | None) -> Tensor:
    return value if clamp_value is None else value.clamp(-clamp_value, clamp_value)


def forward_kl(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = 20.0,
    clamp_value: float | None = 10.0,
) -> Tensor:
    """Forward KL, KL(pi_ref || pi_theta), on reference samples: f(u) = u - log u - 1.

    Generator f(u) = -log u, shifted by (u - 1) to be >= 0. Check:
    E_Q[u - log u - 1] = 1 - E_Q[log(P/Q)] - 1 = E_Q[log(Q/P)] = KL(Q || P).
    Mass-covering: a token the initial policy samples but the policy forgets (u -> 0) costs
    -log u without bound. Defaults are the official DPH-RL clamps (|log u| <= 20, value <= 10).
    """
    log_u = _log_ratio(logp, ref_logp, clamp_log_ratio)
    return _clamp(torch.expm1(log_u) - log_u, clamp_value)


def js(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """Jensen-Shannon, generator form (the paper's best), on reference samples.

        f(u) = u log u - (u + 1) log((u + 1) / 2)

    f(1) = 0, f'(u) = log(2u / (u + 1)) so f'(1) = 0, f'' = 1/u - 1/(u+1) > 0: already >= 0.
    Its expectation is twice the Jensen-Shannon divergence: with M = (P + Q) / 2,
    E_Q[f(u)] = sum_y P log(P/M) + Q log(Q/M) = KL(P || M) + KL(Q || M) = 2 JS(P, Q),
    so it lies in [0, 2 log 2]. Per token, f(0) = log 2 (a forgotten token costs at most log 2).
    """
    log_u = _log_ratio(logp, ref_logp, clamp_log_ratio)
    u = torch.exp(log_u)
    # log((u + 1) / 2) = softplus(log u) - log 2, stable for any log u.
    value = u * log_u - (u + 1) * (F.softplus(log_u) - LOG2)
    return _clamp(value, clamp_value)


def js_ref_half(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """`js_full`, first half: KL(pi_ref || M) on reference samples, M = (pi_theta + pi_ref) / 2.

    With s = M / Q = (u + 1) / 2, the value s - 1 - log s = (u - 1)/2 - log((u + 1)/2) >= 0 has
    E_Q[...] = E_Q[s] - 1 + E_Q[log(Q/M)] = KL(Q || M), since E_Q[s] = 1 (Schulman's k3 form).
    The official DPH-RL code's `js` definition branch computes only this half; dphrl's
    `js_full` adds `js_policy_half` on the policy's rollouts, which needs an online reference
    model, so that the sum estimates KL(P || M) + KL(Q || M) = 2 JS(P, Q), like `js`.
    """
    log_u = _log_ratio(logp, ref_logp, clamp_log_ratio)
    value = 0.5 * torch.expm1(log_u) - (F.softplus(log_u) - LOG2)
    return _clamp(value, clamp_value)


def js_policy_half(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """`js_full`, second half: KL(pi_theta || M) on the policy's own rollouts (y ~ P).

    With s = M / P = (1 + 1/u) / 2, the value s - 1 - log s >= 0 has expectation
    E_P[s] - 1 + E_P[log(P/M)] = KL(P || M). Not in the official code (see `js_ref_half`).
    As with the k3 reverse-KL loss, the gradient is taken through the value only, not
    through the sampling distribution.
    """
    log_u = _log_ratio(logp, ref_logp, clamp_log_ratio)
    # log s = log((1 + exp(-log u)) / 2) = softplus(-log u) - log 2.
    value = 0.5 * torch.expm1(-log_u) - (F.softplus(-log_u) - LOG2)
    return _clamp(value, clamp_value)


def alpha_divergence(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    alpha: float = 0.5,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """Alpha divergence on reference samples, 0 < alpha < 1:

        f(u) = (u^(1-alpha) - (1-alpha) u - alpha) / (alpha (alpha - 1))

    u^(1-alpha) is concave, so it lies below its tangent at 1, (1-alpha) u + alpha: the
    numerator is <= 0 and the denominator < 0, hence f >= 0, with f(1) = f'(1) = 0.
    Limits (first order in alpha, resp. 1 - alpha):
    alpha -> 0: f -> u log u - u + 1,  E_Q[...] = E_P[log u] = KL(pi_theta || pi_ref) (reverse KL);
    alpha -> 1: f -> u - log u - 1,    E_Q[...] = KL(pi_ref || pi_theta) (forward KL).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    log_u = _log_ratio(logp, ref_logp, clamp_log_ratio)
    u_pow = torch.exp((1.0 - alpha) * log_u)
    value = (u_pow - (1.0 - alpha) * torch.exp(log_u) - alpha) / (alpha * (alpha - 1.0))
    return _clamp(value, clamp_value)


def kl_k1(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """Reverse KL, k1 estimator on policy samples: log r. Unbiased for KL(pi_theta || pi_ref),
    but per token it can be negative and its gradient is 1 (not 0) at r = 1.

    Schulman, "Approximating KL divergence" (2020), http://joschu.net/blog/kl-approx.html.
    """
    return _clamp(_log_ratio(logp, ref_logp, clamp_log_ratio), clamp_value)


def kl_k2(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Tensor:
    """Reverse KL, k2 estimator on policy samples: (log r)^2 / 2. >= 0 and low variance, but
    biased: E_P[(log r)^2 / 2] matches KL(P || Q) only to second order in log r (Schulman 2020).
    """
    log_r = _log_ratio(logp, ref_logp, clamp_log_ratio)
    return _clamp(0.5 * log_r.square(), clamp_value)


def kl_k3(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = 20.0,
    clamp_value: float | None = 10.0,
) -> Tensor:
    """Reverse KL, k3 estimator on policy samples: exp(-log r) - 1 + log r = 1/r - 1 - log(1/r).

    Unbiased (E_P[1/r] = E_P[Q/P] = 1) and >= 0 (Schulman 2020); GRPO's KL term. Defaults are
    the official clamps (verl's `low_var_kl`: |log r| <= 20, value <= 10), as for forward KL.
    """
    log_r = _log_ratio(logp, ref_logp, clamp_log_ratio)
    return _clamp(torch.expm1(-log_r) + log_r, clamp_value)


def forward_kl_topk(
    logp: Tensor,
    ref_logp: Tensor,
    *,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
    min_tail: float = 1e-6,
) -> Tensor:
    """Forward KL on the initial policy's stored top-k tokens, plus one tail atom.

    At each response token, with v_1..v_K the initial policy's K most likely next tokens,
    q_k = log pi_ref(v_k) (stored by precompute-ref, `ref.topk`) and l_k = log pi_theta(v_k):

        head = sum_k e^{q_k} (q_k - l_k)
        tail = Q log(Q / P),   Q = 1 - sum_k e^{q_k},  P = 1 - sum_k e^{l_k}   (the other tokens)
        value = head + tail

    This is KL(pi_ref || pi_theta) between the two distributions with the vocabulary outside
    the top-k merged into one outcome: >= 0, zero iff the policy gives each top-k token its
    reference probability, at most the exact KL (data processing) and equal to it when the top-k
    holds every token the reference can emit. verl's `forward_kl_topk` (distillation from a
    teacher's top-k) keeps the head alone, which can go negative and pays nothing for moving
    mass from the tail into the top-k; the tail atom fixes both. P is floored at `min_tail`
    so that a policy putting all its mass on the top-k costs a bounded, finite log.

    Against `forward_kl` (u - log u - 1 on the sampled token only) it sees K tokens per
    position instead of one: a denser signal from the same pre-sampled responses, with no online
    reference model. logp, ref_logp `# (..., K)` -> `# (...)`. `clamp_log_ratio` clamps
    l_k - q_k, `clamp_value` the value; both off by default.
    """
    if clamp_log_ratio is not None:
        logp = ref_logp + _log_ratio(logp, ref_logp, clamp_log_ratio)
    q = torch.exp(ref_logp)  # (..., K)
    head = (q * (ref_logp - logp)).sum(-1)
    ref_tail = (1.0 - q.sum(-1)).clamp(min=0.0)
    tail = (1.0 - torch.exp(logp).sum(-1)).clamp(min=min_tail)
    value = head + torch.xlogy(ref_tail, ref_tail) - ref_tail * torch.log(tail)
    return _clamp(value, clamp_value)


Divergence = Callable[[Tensor, Tensor], Tensor]  # (logp, ref_logp) -> per-token values, same shape

# Config name (`divergence.name`) -> per-token value on reference-store samples (y ~ pi_ref).
# "reverse_kl" lives in REVERSE_KL_ESTIMATORS (policy samples); "none" has no loss.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "js": js,
    "js_full": js_ref_half,
    "alpha": alpha_divergence,
    "forward_kl_topk": forward_kl_topk,
}

# Divergences of the stored top-k distribution: their inputs are `# (..., K)` log-probs of the
# ref store's top-k tokens (`ref_topk_ids`), under the policy and under the initial policy.
TOPK_DIVERGENCES = frozenset({"forward_kl_topk"})

# `divergence.estimator` -> per-token reverse-KL value on the policy's rollouts (y ~ pi_theta).
REVERSE_KL_ESTIMATORS: dict[str, Divergence] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# Divergences that also need a term on the policy's own rollouts with an online reference model.
POLICY_SAMPLE_TERMS: dict[str, Divergence] = {"js_full": js_policy_half}


def policy_sample_term(name: str, estimator: str) -> Divergence | None:
    """The term on the policy's own rollouts against an online reference, if `name` has one:
    reverse_kl's `estimator` (k1 / k2 / k3), or js_full's policy half; None for the others."""
    return (
        REVERSE_KL_ESTIMATORS[estimator] if name == "reverse_kl" else POLICY_SAMPLE_TERMS.get(name)
    )


def make_divergence(
    name: str,
    *,
    alpha: float = 0.5,
    clamp_log_ratio: float | None = None,
    clamp_value: float | None = None,
) -> Divergence:
    """The ref-sample divergence `name` with its keywords bound (alpha only for "alpha").

    Clamps given here apply to whichever divergence is chosen, JS and alpha included; None
    (the config's default) keeps the function's own, the official code's: forward KL clamped
    at 20 / 10, JS, js_full and alpha unclamped.
    """
    if name not in DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")
    kwargs: dict[str, float] = {"alpha": alpha} if name == "alpha" else {}
    if clamp_log_ratio is not None:
        kwargs["clamp_log_ratio"] = clamp_log_ratio
    if clamp_value is not None:
        kwargs["clamp_value"] = clamp_value
    return partial(DIVERGENCES[name], **kwargs)
