"""`dphrl train`: hybrid RL from the split's D_exp and the ref store's D_pef rehearsal.

The step itself is `dphrl.training.trainer.Trainer`; the run around it (resume, checkpoints,
evals, the final model) is `dphrl.training.runloop.fit`; the inputs (split and ref store,
made when missing or stale) come from `dphrl.presample.inputs.training_data`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from dphrl import dist
from dphrl.config import DphrlConfig

log = logging.getLogger(__name__)


def run(cfg: DphrlConfig, run_dir: Path, *, stop_after_step: int | None = None) -> Path:
    """Train; return the folder of the final HF model.

    Rank 0 holds the run folder's lock; a folder with checkpoints is resumed
    (`trainer.resume=true`, same run-defining settings) or refused before any model loads.
    """
    from dphrl.embedded import resolve_model_path
    from dphrl.lock import folder_lock
    from dphrl.presample.inputs import training_data
    from dphrl.training.checkpoint import check_resume, run_settings
    from dphrl.training.runloop import fit
    from dphrl.training.sampler import steps_for_epochs
    from dphrl.training.trainer import Trainer

    layout = dist.resolve_layout(cfg.layout)
    dist.init(layout)
    run_dir = Path(cfg.trainer.run_dir) if cfg.trainer.run_dir else Path(run_dir)
    try:
        lock = folder_lock(run_dir, "dphrl train") if layout.is_main else contextlib.nullcontext()
        with lock:
            check_resume(run_dir, cfg.trainer.resume, run_settings(cfg))
            model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
            prompts, ref_rows = training_data(cfg, layout.is_main, model_path)
            if cfg.trainer.epochs is not None:
                cfg.trainer.max_steps = steps_for_epochs(
                    cfg.trainer.epochs, len(prompts), cfg.algo.prompts_per_step
                )
                log.info("train: %s epochs = %d steps", cfg.trainer.epochs, cfg.trainer.max_steps)
            trainer = Trainer(cfg, run_dir, layout, prompts, ref_rows, model_path)
            return fit(trainer, cfg.trainer, cfg.eval, stop_after_step)  # and the final model
    finally:
        dist.shutdown()
