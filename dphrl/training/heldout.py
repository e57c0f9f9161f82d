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


def heldout_sums(
    engine: Engine,
    task: Task,
    task_cfg: TaskConfig,
    tokenizer: Any,
    rows: list[dict],
    ev: EvalConfig,
    max_prompt_len: int,
    max_new_tokens: int,
    seed: int,
    part: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Sums over this rank's share of the held-out prompts (`part` = (rank, world size): every
    rank samples a contiguous share with its own engine, seeded by the global prompt index,
    so the ranks together draw what one process draws): `prompts`, and for each k of `eval.k`
    the unbiased pass@k from `eval.n` samples (`eval_pass@k`), and with `eval.greedy` how many
    prompts the greedy answer solves (`eval_greedy`). Divided by the prompts summed over the
    ranks, they are the means (`dphrl.training.trainer.Trainer.evaluate`)."""
    from dphrl.rl.batching import share

    ids, kept = render_rows(tokenizer, rows, max_prompt_len, "eval")  # every rank: same drops
    mine = share(len(kept), part[1], part[0])
    ids, kept = ids[mine], kept[mine]
    sampling = Sampling(ev.temperature, ev.top_p, max_new_tokens, seed).shifted(mine.start, ev.n)
    scored = sample_and_score(engine, task, task_cfg, ids, kept, ev.n, sampling)
    correct = [sum(s.verdict.reward >= 1.0 for s in group) for group in scored]
    sums = {"prompts": float(len(correct))}
    sums.update({f"eval_pass@{k}": sum(pass_at_k(ev.n, c, k) for c in correct) for k in ev.k})
    if ev.greedy:
        greedy = Sampling(0.0, 1.0, max_new_tokens, seed)
        solved = sample_and_score(engine, task, task_cfg, ids, kept, 1, greedy)
        sums["eval_greedy"] = float(sum(g[0].verdict.reward >= 1.0 for g in solved))
    return sums
