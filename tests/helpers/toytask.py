"""A toy task for training tests on tiny random models: varied rewards without a real solver.

A random 135M-vocabulary model never solves arithmetic, so every reward would be 0 and every
GRPO advantage 0. Here a completion is "correct" when its text length is even: rewards vary
within groups, deterministically given the tokens.
"""

from __future__ import annotations

from dphrl.tasks import Verdict

PROMPTS = [f"Say something about the number {i}." for i in range(32)]


class CoinTask:
    name = "coin"

    def __init__(self, name: str = "coin") -> None:
        self.name = name

    def load(self, cfg, split: str = "train") -> list[dict]:
        rows = [
            {
                "id": i,
                "data_source": "coin",
                "prompt": [{"role": "user", "content": p}],
                "reward_model": {"ground_truth": "even"},
            }
            for i, p in enumerate(PROMPTS)
        ]
        return rows if cfg.limit is None else rows[: cfg.limit]

    def verify(self, completions, ground_truths, cfg):
        return [Verdict(float(len(c) % 2 == 0), answer=str(len(c))) for c in completions]


def register(monkeypatch=None) -> None:
    """Make `task=coin` known: the task registry is the one list config validation reads."""
    from dphrl import tasks

    # This module under the name it was imported as (`tests.helpers.toytask` in pytest, `toytask`
    # in the drivers run by path), so `get_task` loads this very module and a test's patch of
    # PROMPTS reaches the task.
    factory = f"{__name__}:CoinTask"
    if monkeypatch is not None:
        monkeypatch.setitem(tasks.TASKS, "coin", factory)
    else:
        tasks.TASKS["coin"] = factory
