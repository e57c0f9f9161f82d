"""Every random stream of a run, derived from its seed in one place.

A run's `seed` (and the split's / ref store's own `split.seed` / `ref.seed`) is the root; each
stream below gets a seed that no other stream shares, so that adding a stream, a step or a
refill round never shifts another's draws, and a resumed run draws what an uninterrupted one
would. Inside one `generate` call, prompt i's sample j draws from `seed + i * n + j`
(`dphrl.engine.Sampling.shifted`), so the streams below are spaced by large primes: far more
samples than any call makes fit between two of them.
"""

from __future__ import annotations

STEP_STRIDE = 1_000_003  # > prompts x samples of any one step's generate calls
ROUND_STRIDE = 100_019  # > prompts x samples of one refill round


def rollout(seed: int, step: int, refill_round: int) -> int:
    """Train's rollouts of `step` (0-based), refill round `refill_round` (DAPO's dynamic
    sampling): seed + 1_000_003 (step + 1) + 100_019 round. Step 0 starts one stride above the
    run's seed, so its streams never meet the held-out eval's (`heldout`)."""
    return seed + STEP_STRIDE * (step + 1) + ROUND_STRIDE * refill_round


def clip_cov(seed: int, step: int) -> int:
    """Clip-Cov's random token picks at `step`: seed * 1_000_003 + step (a torch.Generator's)."""
    return seed * STEP_STRIDE + step


def heldout(seed: int) -> int:
    """`eval.every`'s held-out samples: seed + 7, the same at every eval, so evals of
    successive steps differ by the policy alone."""
    return seed + 7


def ref_sampler(seed: int) -> int:
    """The order in which train draws ref-store responses (the prompt order uses `seed`)."""
    return seed + 1


def ref_store(ref_seed: int) -> int:
    """precompute-ref's samples: ref.seed + 1_000_003, so that with ref.seed = split.seed they
    are fresh draws rather than the split's own samples again."""
    return ref_seed + STEP_STRIDE
