"""Adaptive entropy regularisation: a bonus on the policy's token entropy whose coefficient
follows a target entropy (`algo.entropy.target`).

RL from verifiable rewards sharpens the policy until its token entropy collapses and
exploration stops. A fixed entropy bonus is brittle (too small does nothing, too large blows
the entropy up); Skywork-OR1 (He et al. 2025, arXiv 2505.22312, "adaptive entropy control") and
TRL's `use_adaptive_entropy` let the coefficient follow a target instead:

    L = L_policy - c_k * H_k,    H_k = mean over rollout tokens of H(pi_theta(. | context))
    c_{k+1} = clip(c_k + step * sign(target - H_k), 0, c_max)

so the bonus grows while the entropy is below the target and fades when it is above; started
at c_0 = 0 it acts only once the entropy has fallen under the target. H is the exact entropy of
each position's next-token distribution (over the vocabulary, at the rollout temperature), with
its gradient (`dphrl.rl.logprobs`), not the sampled tokens' -log p.
"""

from __future__ import annotations


def adaptive_entropy_coef(
    coef: float, entropy: float, *, target: float, step: float, max_coef: float
) -> float:
    """The next step's coefficient: c + step if the entropy is below `target`, c - step if
    above, unchanged if equal, kept within [0, max_coef] (Skywork-OR1's update)."""
    direction = (entropy < target) - (entropy > target)
    return min(max(coef + step * direction, 0.0), max_coef)
