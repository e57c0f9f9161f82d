"""The task registry: a task is a loader, a prompt builder and a verifier behind one name.

`split`, `train` and `eval-passk` call `get_task(cfg.name)` and never branch on the task.
Each task is named in `dphrl.tasks.names.TASKS` (name -> factory); the factories are
imported lazily so that loading one task never imports another's dependencies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dphrl.errors import ConfigError
from dphrl.tasks.names import TASKS

if TYPE_CHECKING:
    from dphrl.config import TaskConfig


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one completion.

    reward: in [0, 1] (1 = correct).
    answer: a canonical key of what the completion answered (a normalised final answer, a
        hash of the SQL execution result), used to count distinct correct answers; None when
        nothing could be extracted or executed.
    error: why it scored 0 without being judged ('no_answer', 'timeout', 'denied', 'syntax',
        'exception', ...), counted in metrics; None when it was judged.
    """

    reward: float
    answer: str | None = None
    error: str | None = None


class Task(Protocol):
    name: str

    def load(self, cfg: TaskConfig, split: str = "train") -> list[dict]:
        """Rows in the official shape (`dphrl.data`), the first `cfg.limit` of them.

        split is "train" (task.path) or "eval" (task.eval_path, or the embedded held-out set).
        """

    def verify(
        self, completions: list[str], ground_truths: list[Any], cfg: TaskConfig
    ) -> list[Verdict]:
        """One verdict per completion; uses all cores; never raises for a bad completion."""


def get_task(name: str) -> Task:
    """The task registered under `name` (`task.name` in the config)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not known; allowed: {', '.join(TASKS)}")
    module, factory = TASKS[name].split(":")
    return getattr(importlib.import_module(module), factory)(name)
