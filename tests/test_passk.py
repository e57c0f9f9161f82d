"""The pass@k estimator, the per-prompt statistics and the report files (fast tier)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from dphrl.commands.eval_passk import summarize
from dphrl.passk import figure, markdown, pass_at_k, plot_curves, prompt_stats


def brute_force(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_estimator_equals_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_estimator_is_monotone_in_k_and_c():
    for n in (1, 5, 16, 64, 200):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
        for k in (1, n // 2 or 1, n):
            by_c = [pass_at_k(n, c, k) for c in range(n + 1)]
            assert all(a <= b + 1e-12 for a, b in itertools.pairwise(by_c))


def test_estimator_edges_and_large_n_stay_finite():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 13, 4) == 1.0  # fewer than k wrong samples: every k-subset passes
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # Factorials of 5000 overflow a float; the product form does not.
    value = pass_at_k(5000, 7, 100)
    assert 0.0 < value < 1.0
    exact = 1 - math.comb(4993, 100) / math.comb(5000, 100)
    assert value == pytest.approx(exact, rel=1e-9)


def test_estimator_rejects_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def _row(
    j,
    correct,
    answer=None,
    text="x",
    tokens=4,
    nll=2.0,
    greedy=False,
    model="m",
    dataset="d",
    pid=0,
):
    return {
        "model": model,
        "dataset": dataset,
        "id": pid,
        "sample": j,
        "greedy": greedy,
        "completion": text,
        "reward": float(correct),
        "correct": correct,
        "answer": answer,
        "response_tokens": tokens,
        "neg_logprob": nll,
    }


def test_prompt_stats_counts_distinct_correct_answers_texts_and_entropy():
    rows = [
        _row(0, True, "5", "so \\boxed{5}", tokens=2, nll=1.0),
        _row(1, True, "5", "so  \\boxed{5} ", tokens=2, nll=1.0),  # same text up to whitespace
        _row(2, True, "5", "it is \\boxed{5}", tokens=4, nll=4.0),
        _row(3, False, "6", "\\boxed{6}", tokens=2, nll=0.0),
        _row(0, True, "5", "greedy", greedy=True, tokens=100, nll=100.0),  # not a sample
    ]
    stats = prompt_stats(rows)
    assert stats == {
        "n": 4,
        "c": 3,
        "distinct_correct_answers": 1,
        "distinct_correct_texts": 2,
        "entropy": pytest.approx(6.0 / 10),
    }


def _payload():
    samples = [_row(j, j < 2, str(j), f"t{j}", pid=0) for j in range(4)]
    samples += [_row(j, False, pid=1) for j in range(4)]
    samples += [_row(0, True, "0", greedy=True, pid=0), _row(0, False, greedy=True, pid=1)]
    datasets = [{"model": "m", "dataset": "d", "ids": [0, 1], "dropped": 1}]
    results = summarize(samples, datasets, [1, 2, 4], greedy=True)
    settings = {
        "n": 4,
        "k": [1, 2, 4],
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 8,
        "seed": 0,
        "engine": "hf",
        "greedy": True,
    }
    return {"settings": settings, "results": results}


def test_summarize_averages_pass_at_k_over_prompts():
    (result,) = _payload()["results"]
    assert [(p["n"], p["c"]) for p in result["per_prompt"]] == [(4, 2), (4, 0)]
    assert result["pass_at_k"]["1"] == pytest.approx(0.25)
    assert result["pass_at_k"]["2"] == pytest.approx((1 - 1 / 6) / 2)
    assert result["pass_at_k"]["4"] == pytest.approx(0.5)
    assert result["greedy"] == pytest.approx(0.5)
    assert result["distinct_correct_answers"] == pytest.approx(1.0)
    assert (result["prompts"], result["dropped"]) == (2, 1)


def test_report_files(tmp_path):
    payload = _payload()
    json.dumps(payload)  # serialisable as passk.json
    table = markdown(payload)
    assert "| `m` | 0.250 | 0.417 | 0.500 | 0.500 |" in table
    plot_curves(tmp_path / "passk.png", payload)
    assert (tmp_path / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_legend_names_the_greedy_markers():
    import matplotlib.pyplot as plt

    fig = figure(_payload())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert labels == ["m", "greedy (T=0)"]


def test_each_eval_dataset_takes_its_own_databases(tmp_path):
    from dphrl.commands.eval_passk import task_config
    from dphrl.config import TaskConfig

    bird = TaskConfig(name="bird", path="train.json", db_root="/data/bird")
    same = task_config(bird, "bird")
    assert same.db_root == "/data/bird"
    spider = task_config(bird, "spider=dev.json", {"spider": "/data/spider/database"})
    assert (spider.name, spider.eval_path, spider.db_root) == (
        "spider",
        "dev.json",
        "/data/spider/database",
    )
    assert task_config(bird, "spider=dev.json").db_root is None
