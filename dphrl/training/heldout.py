"""`eval.every`: the training policy's pass@k on held-out prompts (and, with `eval.pef_limit`,
on the split's D_pef prompts), through the rollout engine.

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


def pef_rows(split_out: str, limit: int) -> list[dict]:
    """The first `limit` D_pef prompts of the split in `split_out` (`eval.pef_limit`): the
    prompts the initial policy solved in every sample, whose loss during training is the
    forgetting the divergence term is there to prevent."""
    from pathlib import Path

    from dphrl.data import read_jsonl

    path = Path(split_out) / "pef.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"eval.pef_limit={limit} needs the split's D_pef prompts, but {path} does not exist: "
            "run `dphrl split` with the same split.out first, or set eval.pef_limit=0"
        )
    return read_jsonl(path)[:limit]


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
    name: str = "eval",
) -> dict[str, float]:
    """Sums over this rank's share of the held-out prompts (`part` = (rank, world size): every
    rank samples a contiguous share with its own engine, seeded by the global prompt index,
    so the ranks together draw what one process draws): `prompts`, and for each k of `eval.k`
    the unbiased pass@k from `eval.n` samples (`<name>_pass@k`), and with `eval.greedy` how
    many prompts the greedy answer solves (`<name>_greedy`). Divided by the prompts summed over
    the ranks, they are the means (`dphrl.training.trainer.Trainer.evaluate`)."""
    from dphrl.rl.batching import share

    ids, kept = render_rows(tokenizer, rows, max_prompt_len, "eval")  # every rank: same drops
    mine = share(len(kept), part[1], part[0])
    ids, kept = ids[mine], kept[mine]
    sampling = Sampling(ev.temperature, ev.top_p, max_new_tokens, seed).shifted(mine.start, ev.n)
    scored = sample_and_score(engine, task, task_cfg, ids, kept, ev.n, sampling)
    correct = [sum(s.verdict.reward >= 1.0 for s in group) for group in scored]
    sums = {"prompts": float(len(correct))}
    sums.update({f"{name}_pass@{k}": sum(pass_at_k(ev.n, c, k) for c in correct) for k in ev.k})
    if ev.greedy:
        greedy = Sampling(0.0, 1.0, max_new_tokens, seed)
        solved = sample_and_score(engine, task, task_cfg, ids, kept, 1, greedy)
        sums[f"{name}_greedy"] = float(sum(g[0].verdict.reward >= 1.0 for g in solved))
    return sums
