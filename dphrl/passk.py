"""pass@k: the per-prompt statistics of verified samples, the unbiased estimator, and the report.

The statistics are pure functions, shared by `eval-passk` (reports), `train` (`eval.every`)
and `split` (pass rates decide D_pef / D_exp). The report (a markdown table and the pass@k
curves) reads only the `passk.json` payload (`{"settings": ..., "results": [...]}`), so it
can be redrawn from a finished run folder.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence

from dphrl.data import atomic_path, write_text


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


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(payload: dict) -> str:
    """One table per dataset: a row per model, a column per k, then greedy and diversity."""
    s = payload["settings"]
    ks = [str(k) for k in s["k"]]
    lines = [
        "# pass@k",
        "",
        f"n={s['n']} samples per prompt, temperature {s['temperature']}, top_p {s['top_p']}, "
        f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}, engine {s['engine']}. "
        "Unbiased estimator, averaged over prompts. Diversity per prompt, then averaged: distinct "
        "correct answers / texts, and entropy (nats per token, mean -log p of sampled tokens).",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in payload["results"]):
        rows = [r for r in payload["results"] if r["dataset"] == dataset]
        head = ["model", *(f"pass@{k}" for k in ks)]
        if s["greedy"]:
            head.append("greedy")
        head += [
            "distinct correct answers",
            "distinct correct texts",
            "entropy",
            "prompts (dropped)",
        ]
        lines += ["", f"## {dataset}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [f"`{r['model']}`", *(_fmt(r["pass_at_k"][k]) for k in ks)]
            if s["greedy"]:
                cells.append(_fmt(r["greedy"]))
            cells += [
                _fmt(r["distinct_correct_answers"], 2),
                _fmt(r["distinct_correct_texts"], 2),
                _fmt(r["entropy"], 3),
                f"{r['prompts']} ({r['dropped']})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str | os.PathLike, payload: dict) -> None:
    """Write `markdown(payload)` atomically."""
    write_text(path, markdown(payload))


def plot_curves(path: str | os.PathLike, payload: dict) -> None:
    """Write `figure(payload)` as a png, atomically."""
    import matplotlib.pyplot as plt

    fig = figure(payload)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def figure(payload: dict):
    """pass@k against k (log2 axis), one panel per dataset, one line per model; greedy
    accuracy, when reported, is a hollow diamond at k=1 in the model's colour, with one
    legend entry saying what the diamonds are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        greedy_drawn = False
        for m, model in enumerate(models):
            r = next((r for r in results if r["dataset"] == dataset and r["model"] == model), None)
            if r is None or r["prompts"] == 0:
                continue
            ks = [int(k) for k in r["pass_at_k"]]
            color = f"C{m}"
            ax.plot(ks, [r["pass_at_k"][str(k)] for k in ks], marker="o", color=color, label=model)
            if r["greedy"] is not None:
                ax.plot([1], [r["greedy"]], marker="D", mfc="none", color=color, linestyle="none")
                greedy_drawn = True
        if greedy_drawn:
            ax.plot(
                [], [], marker="D", mfc="none", color="gray", linestyle="none", label="greedy (T=0)"
            )
        ks = [int(k) for k in payload["settings"]["k"]]
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig
