"""Per-prompt statistics of verified samples and the unbiased pass@k estimator: pure functions.

Shared by `eval-passk` (reports), `train` (`eval.every`) and `split` (pass rates decide
D_pef / D_exp); nothing here reads a config or a file.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The ratio of binomials is computed as the product prod_{i=n-c+1}^{n} (1 - k / i)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), which never forms
    a factorial and so stays exact in floating point for any n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def pass_rates(samples: Iterable[dict]) -> dict[Hashable, tuple[int, int]]:
    """prompt id -> (correct, total) over sample rows with `id` and `reward` (1 = correct)."""
    counts: dict[Hashable, list[int]] = {}
    for s in samples:
        c = counts.setdefault(s["id"], [0, 0])
        c[0] += int(s["reward"] >= 1.0)
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def prompt_stats(samples: Sequence[dict]) -> dict:
    """One prompt's n, c and diversity from its sample rows (greedy rows excluded).

    - distinct_correct_answers: distinct `Verdict.answer` keys among correct samples (the
      execution result for SQL, the normalised final answer for math);
    - distinct_correct_texts: distinct correct completions, whitespace-normalised;
    - entropy: mean per-token entropy of the sampling distribution, estimated by the mean of
      -log p(token) over the sampled tokens (a Monte-Carlo estimate: the engines return only
      the sampled token's log-prob, and the full-vocabulary entropy costs a softmax per token).
    """
    drawn = [s for s in samples if not s["greedy"]]
    correct = [s for s in drawn if s["correct"]]
    tokens = sum(s["response_tokens"] for s in drawn)
    return {
        "n": len(drawn),
        "c": len(correct),
        "distinct_correct_answers": len({s["answer"] for s in correct if s["answer"] is not None}),
        "distinct_correct_texts": len({" ".join(s["completion"].split()) for s in correct}),
        "entropy": sum(s["neg_logprob"] for s in drawn) / tokens if tokens else 0.0,
    }


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values (a dataset with no kept prompt)."""
    return sum(values) / len(values) if values else None
