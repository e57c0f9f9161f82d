"""The run around the steps: start or resume, step until `trainer.max_steps` with held-out
evals, metrics, progress and checkpoints, then write the final model.

`fit` drives any object with the `Steps` shape (`dphrl.training.trainer.Trainer` is the one), so the
step itself stays the trainer's and this module never imports it. A checkpoint holds the
weights, the optimizer and schedule, both data positions and the run-defining settings
(`dphrl.training.checkpoint`), which is all a resumed run needs to continue as one uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from dphrl.config import DphrlConfig
    from dphrl.dist import Layout
    from dphrl.metrics import MetricsLogger, Timer
    from dphrl.training.sampler import EpochSampler


class Steps(Protocol):
    """What the run loop reads of a trainer: its state, and the calls it makes."""

    cfg: DphrlConfig
    run_dir: Path
    layout: Layout
    prompts: list[dict]
    ref_rows: list[dict]
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    prompt_sampler: EpochSampler
    ref_sampler: EpochSampler | None
    metrics: MetricsLogger
    timer: Timer
    step_num: int
    entropy_coef: float  # algo.entropy.target's coefficient, which follows the entropy
    peft: Any  # the PeftModel under LoRA, else None

    def step(self) -> dict[str, float]: ...
    def evaluate(self) -> dict[str, float]: ...
    def push_weights(self) -> None: ...
    def save_model(self, out: Path) -> Path: ...


def fit(trainer: Steps, stop_after_step: int | None = None) -> Path:
    """Steps until `trainer.max_steps`, with checkpoints, exact resume and the final HF model.

    `stop_after_step` (a test hook, not a config key) stops as a killed run would: after that
    step's checkpoint, before the final model.
    """
    from dphrl.metrics import reduce_metrics
    from dphrl.progress import track
    from dphrl.training.checkpoint import data_settings, run_settings

    tr, run_dir = trainer.cfg.trainer, trainer.run_dir
    settings = {**run_settings(trainer.cfg), **data_settings(trainer.prompts, trainer.ref_rows)}
    resume(trainer, settings)
    with track("train", tr.max_steps, "steps") as progress:
        progress.skip(trainer.step_num)
        trainer.timer.on_phase = lambda phase: progress.describe(
            f"step {trainer.step_num + 1}: {phase}"
        )
        metrics: dict[str, float] = {}
        while trainer.step_num < tr.max_steps:
            metrics = reduce_metrics(trainer.step())
            ev, last = trainer.cfg.eval, trainer.step_num == tr.max_steps
            if (
                ev.every and trainer.step_num % ev.every == 0 and (ev.at_end or not last)
            ):  # every rank: each evaluates its share of the held-out prompts
                metrics.update(trainer.evaluate())
            trainer.metrics.log(trainer.step_num, metrics)
            progress.advance()
            if (tr.save_every and trainer.step_num % tr.save_every == 0) or last:
                save(trainer, settings)
            if stop_after_step is not None and trainer.step_num >= stop_after_step:
                log.info("train: stopping after step %d (stop_after_step)", trainer.step_num)
                return run_dir
    out = run_dir / "model"
    trainer.save_model(out)  # collective; rank 0 writes
    trainer.metrics.close()
    if trainer.layout.is_main:
        log.info("%s", summary(trainer, metrics, out))
    return out


def resume(trainer: Steps, settings: dict) -> None:
    """Continue from the run folder's latest checkpoint (refused on changed `settings`), or
    start fresh; either way metrics.jsonl keeps one history, cut at the step resumed from."""
    from dphrl.training.checkpoint import check_resume, load_checkpoint

    found = check_resume(trainer.run_dir, trainer.cfg.trainer.resume, settings)
    if found is None:
        trainer.metrics.truncate_after(0)  # a killed run's steps before any checkpoint: one history
        return
    state = load_checkpoint(found, trainer.policy, trainer.optimizer, trainer.scheduler)
    trainer.step_num = state["step"]
    trainer.prompt_sampler.load_state_dict(state["prompt_sampler"])
    if trainer.ref_sampler is not None:
        trainer.ref_sampler.load_state_dict(state["ref_sampler"])
    trainer.entropy_coef = state.get("entropy_coef", trainer.entropy_coef)
    trainer.push_weights()
    trainer.metrics.truncate_after(trainer.step_num)
    log.info("train: resumed from %s at step %d", found, trainer.step_num)


def save(trainer: Steps, settings: dict) -> None:
    """A checkpoint of this step: weights, optimizer, schedule, the data position, settings."""
    from dphrl.training.checkpoint import save_checkpoint

    state = {
        "step": trainer.step_num,
        "prompt_sampler": trainer.prompt_sampler.state_dict(),
        "ref_sampler": trainer.ref_sampler.state_dict() if trainer.ref_sampler else None,
        "entropy_coef": trainer.entropy_coef,
        "settings": settings,
    }
    tr = trainer.cfg.trainer
    save_checkpoint(
        trainer.run_dir,
        trainer.step_num,
        trainer.policy,
        trainer.optimizer,
        trainer.scheduler,
        state,
        tr.keep,
    )


def summary(trainer: Steps, metrics: dict[str, float], out: Path) -> str:
    """The closing lines: steps run, the last step's reward and pass rate, where things are."""
    run_dir = trainer.run_dir
    figures = ", ".join(
        f"{name} {metrics[key]:.3f}"
        for key, name in (("reward_mean", "reward"), ("pass_rate", "pass rate"))
        if key in metrics
    )
    return (
        f"train: done, {trainer.step_num} steps; last step: {figures or 'no metrics'}\n"
        f"  run folder: {run_dir}\n  metrics:    {run_dir / 'metrics.jsonl'}\n  model:      {out}"
        + (f"\n  adapter:    {run_dir / 'adapter'}" if trainer.peft is not None else "")
    )
