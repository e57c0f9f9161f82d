"""Rows -> prompt token ids -> engine -> verifier: the one path every command samples through.

`split`, `precompute-ref`, `train` and `eval-passk` all need "render these rows' prompts,
sample n completions each, score them"; keeping it here means the chat template, the
over-long-prompt rule and the verifier call are the same everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dphrl.data import render_prompts
from dphrl.engine import Completion, Engine, Sampling
from dphrl.tasks import Task, Verdict

if TYPE_CHECKING:
    import torch

    from dphrl.config import TaskConfig

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One completion and its verdict."""

    completion: Completion
    verdict: Verdict


@dataclass
class Rollouts:
    """One training step's groups: G responses per prompt, laid out group by group."""

    prompt_ids: list[list[int]]  # one per response  (B*G,)
    scored: list[Scored]  # (B*G,)
    group_size: int

    @property
    def rewards(self) -> torch.Tensor:
        import torch

        return torch.tensor([s.verdict.reward for s in self.scored], dtype=torch.float32)  # (B*G,)


def render_rows(
    tokenizer: Any, rows: list[dict], max_prompt_len: int, what: str
) -> tuple[list[list[int]], list[dict]]:
    """Chat-template the rows' prompts; drop and count those over `max_prompt_len` tokens."""
    ids, kept = render_prompts(tokenizer, [row["prompt"] for row in rows], max_prompt_len)
    dropped = len(rows) - len(kept)
    if dropped:
        log.warning(
            "%s: dropped %d of %d prompts longer than model.max_prompt_len=%d tokens",
            what,
            dropped,
            len(rows),
            max_prompt_len,
        )
    return ids, [rows[i] for i in kept]


def sample_and_score(
    engine: Engine,
    task: Task,
    task_cfg: TaskConfig,
    prompt_ids: list[list[int]],
    rows: list[dict],
    n: int,
    sampling: Sampling,
) -> list[list[Scored]]:
    """`n` completions for each prompt, each with its verdict: result[i][j] is prompt i, sample j."""
    if not prompt_ids:
        return []
    return score_outputs(task, task_cfg, rows, engine.generate(prompt_ids, n, sampling))


def score_outputs(
    task: Task, task_cfg: TaskConfig, rows: list[dict], outputs: list[list[Completion]]
) -> list[list[Scored]]:
    """Verify every completion of every prompt in one batched verifier call."""
    texts = [c.text for outs in outputs for c in outs]
    truths = [row["reward_model"]["ground_truth"] for row, outs in zip(rows, outputs) for _ in outs]
    verdicts = iter(task.verify(texts, truths, task_cfg))
    return [[Scored(c, next(verdicts)) for c in outs] for outs in outputs]
