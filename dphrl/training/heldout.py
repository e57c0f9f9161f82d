"""`eval.every`: the training policy's pass@k on held-out prompts, through the rollout engine.

The unbiased estimator of `dphrl.passk.pass_at_k`, averaged over prompts, and with
`eval.greedy` the greedy (temperature 0) accuracy, so a run's curve shows both what the paper's
tables show; the full report (diversity, plots) is `dphrl eval-passk` on a saved model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dphrl.engine import Engine, Sampling
from dphrl.errors import ConfigError
from dphrl.passk import pass_at_k
from dphrl.rollout import render_rows, sample_and_score
from dphrl.tasks import Task

if TYPE_CHECKING:
    from dphrl.config import EvalConfig, TaskConfig

DEFAULT_LIMIT = 32  # held-out prompts when eval.limit is not set


def heldout_rows(task: Task, task_cfg: TaskConfig, limit: int | None) -> list[dict]:
    """The task's eval split (its first `limit` rows), checked before any rollout."""
    rows = task.load(task_cfg, "eval")[: limit or DEFAULT_LIMIT]
    if not rows:
        raise ConfigError(
            "eval.every>0 needs held-out prompts: set task.eval_path (the embedded tasks have their own)"
        )
    return rows


def heldout_pass_at_k(
    engine: Engine,
    task: Task,
    task_cfg: TaskConfig,
    tokenizer: Any,
    rows: list[dict],
    ev: EvalConfig,
    max_prompt_len: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """`eval_pass@k` for each k of `eval.k`, from `eval.n` samples of each held-out prompt,
    and `eval_greedy` (share of prompts the greedy answer solves) when `eval.greedy`."""
    ids, kept = render_rows(tokenizer, rows, max_prompt_len, "eval")
    sampling = Sampling(ev.temperature, ev.top_p, max_new_tokens, seed)
    scored = sample_and_score(engine, task, task_cfg, ids, kept, ev.n, sampling)
    correct = [sum(s.verdict.reward >= 1.0 for s in group) for group in scored]
    prompts = max(len(correct), 1)
    metrics = {
        f"eval_pass@{k}": sum(pass_at_k(ev.n, c, k) for c in correct) / prompts for k in ev.k
    }
    if ev.greedy:
        greedy = Sampling(0.0, 1.0, max_new_tokens, seed)
        solved = sample_and_score(engine, task, task_cfg, ids, kept, 1, greedy)
        metrics["eval_greedy"] = sum(g[0].verdict.reward >= 1.0 for g in solved) / prompts
    return metrics
