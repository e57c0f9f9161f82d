"""The run around the steps: start or resume, step until `trainer.max_steps` with held-out
evals, metrics, progress and checkpoints, then write the final model.

`fit` drives any object with the `Steps` shape (`dphrl.training.trainer.Trainer` is the one)
through calls, so the step and the trainer's state stay the trainer's and this module never
imports it. The trainer says what a checkpoint holds (`Steps.state_dict`: its weights, AdamW and
schedule, both data positions, the entropy coefficient, the run-defining settings);
`dphrl.training.checkpoint` says how it is stored, which is all a resumed run needs to continue
as one uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dphrl.config import EvalConfig, TrainerConfig
    from dphrl.metrics import MetricsLogger, Timer


class Steps(Protocol):
    """What the run loop asks of a trainer: five calls, and a few facts it reads."""

    run_dir: Path  # checkpoints, metrics.jsonl and the final model go here
    settings: dict[str, Any]  # run-defining settings and data hashes: a resume with others fails
    step_num: int  # steps done; only `step` and `load_state_dict` move it
    metrics: MetricsLogger  # where each step's metrics go
    timer: Timer  # the step's phases, which the progress line names

    def step(self) -> dict[str, float]: ...
    def evaluate(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...  # `checkpoint.save_state`'s shape
    def load_state_dict(self, state: dict[str, Any]) -> None: ...  # and the engine's weights
    def save_model(self, out: Path) -> dict[str, Path]: ...  # what it wrote, by name


def fit(
    trainer: Steps, tr: TrainerConfig, ev: EvalConfig, stop_after_step: int | None = None
) -> Path:
    """Steps until `tr.max_steps`, with checkpoints, exact resume and the final HF model.

    `stop_after_step` (a test hook, not a config key) stops as a killed run would: after that
    step's checkpoint, before the final model.
    """
    from dphrl import dist
    from dphrl.metrics import reduce_metrics
    from dphrl.progress import track

    resume(trainer, tr.resume)
    with track("train", tr.max_steps, "steps") as progress:
        progress.skip(trainer.step_num)
        trainer.timer.on_phase = lambda phase: progress.describe(
            f"step {trainer.step_num + 1}: {phase}"
        )
        metrics: dict[str, float] = {}
        while trainer.step_num < tr.max_steps:
            metrics = reduce_metrics(trainer.step())
            last = trainer.step_num == tr.max_steps
            if (
                ev.every and trainer.step_num % ev.every == 0 and (ev.at_end or not last)
            ):  # every rank: each evaluates its share of the held-out prompts
                metrics.update(trainer.evaluate())
            trainer.metrics.log(trainer.step_num, metrics)
            progress.advance()
            if (tr.save_every and trainer.step_num % tr.save_every == 0) or last:
                save(trainer, tr.keep)
            if stop_after_step is not None and trainer.step_num >= stop_after_step:
                log.info("train: stopping after step %d (stop_after_step)", trainer.step_num)
                return trainer.run_dir
    out = trainer.run_dir / "model"
    folders = trainer.save_model(out)  # collective; rank 0 writes
    trainer.metrics.close()
    if dist.is_main():
        log.info("%s", summary(trainer, metrics, folders))
    return out


def resume(trainer: Steps, allowed: bool) -> None:
    """Continue from the run folder's latest checkpoint (`trainer.resume`; refused on changed
    settings), or start fresh; either way metrics.jsonl keeps one history, cut at the step
    resumed from."""
    from dphrl.training.checkpoint import check_resume, load_state

    found = check_resume(trainer.run_dir, allowed, trainer.settings)
    if found is None:
        trainer.metrics.truncate_after(0)  # a killed run's steps before any checkpoint: one history
        return
    trainer.load_state_dict(load_state(found, trainer.state_dict()))
    trainer.metrics.truncate_after(trainer.step_num)
    log.info("train: resumed from %s at step %d", found, trainer.step_num)


def save(trainer: Steps, keep: int) -> None:
    """A checkpoint of this step (`trainer.keep` of them kept): whatever the trainer's
    `state_dict` holds."""
    from dphrl.training.checkpoint import save_state

    save_state(trainer.run_dir, trainer.state_dict(), keep)


def summary(trainer: Steps, metrics: dict[str, float], folders: dict[str, Path]) -> str:
    """The closing lines: steps run, the last step's reward and pass rate, where things are."""
    run_dir = trainer.run_dir
    figures = ", ".join(
        f"{name} {metrics[key]:.3f}"
        for key, name in (("reward_mean", "reward"), ("pass_rate", "pass rate"))
        if key in metrics
    )
    places = {"run folder": run_dir, "metrics": run_dir / "metrics.jsonl", **folders}
    return f"train: done, {trainer.step_num} steps; last step: {figures or 'no metrics'}" + "".join(
        f"\n  {name + ':':<11} {path}" for name, path in places.items()
    )
