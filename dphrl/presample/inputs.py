"""What the commands share above the sampling loop: the device rule, and the inputs of `train`.

`dphrl split` and `dphrl precompute-ref` are `make_split` / `make_ref_store` plus a summary;
`dphrl train` calls `training_data`, which makes (or finishes, or brings up to date) the
split and the ref store through the same two functions, so no command imports another.
Under torchrun every rank takes part (each samples its share of the chunks with its own
engine; rank 0 holds the folder's lock and writes), so the same commands use every GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from dphrl.config import DphrlConfig, LayoutConfig
from dphrl.errors import ConfigError, DataError
from dphrl.lock import ranks_lock

log = logging.getLogger(__name__)


def sampling_device(layout: LayoutConfig) -> str:
    """The one device rule, from the layout: what `dphrl.dist.resolve_layout` gives, for the
    sampling commands (split, precompute-ref, eval-passk), which never shard: a rank's own
    GPU under torchrun (`LOCAL_RANK`)."""
    from dphrl import dist

    return dist.resolve_layout(replace(layout, fsdp=False)).device


@contextlib.contextmanager
def sampling_ranks(layout: LayoutConfig) -> Iterator[None]:
    """The process group of a sampling command under torchrun (`torchrun --nproc_per_node N
    -m dphrl split ...`, `layout=gpu8` too: these commands never shard), left at the end;
    nothing in one process."""
    from dphrl import dist

    dist.init(dist.resolve_layout(replace(layout, fsdp=False)))
    try:
        yield
    finally:
        dist.shutdown()


def make_split(cfg: DphrlConfig, *, wait: bool = False) -> dict | None:
    """Build (or finish) the split in `split.out` under its lock; return its stats.

    `wait` (train's inputs): another run writing the folder is waited for, and a split it
    finished is taken as it is (None): two jobs of a sweep that both find it missing build
    it once.
    """
    from dphrl import dist
    from dphrl.presample.split import build_split

    with ranks_lock(cfg.split.out, "dphrl split", wait=wait):
        if dist.broadcast_object(wait and (Path(cfg.split.out) / "exp.jsonl").exists()):
            return None
        return build_split(
            cfg.split, cfg.task, cfg.model, cfg.engine, sampling_device(cfg.layout), cfg.split.seed
        )


def make_ref_store(cfg: DphrlConfig, *, wanted: dict | None = None) -> dict | None:
    """Build (or finish, or update) the ref store in `ref.out` from the split's D_pef.

    `wanted` (train's inputs: the store's identity): another run writing the folder is
    waited for, and a store current for these settings is left as it is (None).
    """
    from dphrl import dist
    from dphrl.presample.refstore import build_ref_store, is_current

    pef = Path(cfg.split.out) / "pef.jsonl"
    with ranks_lock(cfg.ref.out, "dphrl precompute-ref", wait=wanted is not None):
        current = wanted is not None and is_current(Path(cfg.ref.out), pef, wanted)
        if dist.broadcast_object(current):
            return None
        return build_ref_store(
            cfg.ref,
            pef,
            cfg.task,
            cfg.model,
            cfg.engine,
            sampling_device(cfg.layout),
            cfg.ref.seed,
        )


def training_data(
    cfg: DphrlConfig, is_main: bool, model_path: str
) -> tuple[list[dict], list[dict]]:
    """The RL prompts and the ref-store rows of a train run.

    Baselines train on every prompt without a store. The DPH divergences need the split and a
    ref store built from its current D_pef: every rank takes part in making whatever rank 0
    (`is_main`) finds missing or stale (vLLM's start-up under torchrun is collective, so rank
    0 could not start an engine alone), and every rank then reads the store verified against
    the split.
    """
    from dphrl import dist
    from dphrl.data import read_jsonl
    from dphrl.models import weights_hash
    from dphrl.presample.refstore import identity, is_current, load_ref_store
    from dphrl.rl.divergence import DIVERGENCES
    from dphrl.tasks import get_task

    if cfg.divergence.name not in DIVERGENCES or cfg.divergence.beta == 0:
        rows = get_task(cfg.task.name).load(cfg.task, "train")
        log.info(
            "divergence=%s: RL on all %d training prompts, no ref store",
            cfg.divergence.name,
            len(rows),
        )
        return rows, []
    split_dir, ref_dir = Path(cfg.split.out), Path(cfg.ref.out)
    weights = weights_hash(model_path)
    # Each check is repeated under the folder's lock (waited for): another job of a sweep may
    # be making the same split or store, and then this one uses it.
    if dist.broadcast_object(not (split_dir / "exp.jsonl").exists()):
        log.info("train: no split in %s: making it (as `dphrl split` does)", split_dir)
        make_split(cfg, wait=True)
    wanted = identity(cfg.ref, cfg.task, cfg.model, weights, cfg.ref.seed)
    # Another store's settings make make_ref_store refuse, naming them.
    if dist.broadcast_object(not is_current(ref_dir, split_dir / "pef.jsonl", wanted)):
        log.info(
            f"train: {ref_dir} holds no finished ref store of this split and these settings: "
            "making or updating it (as `dphrl precompute-ref` does)"
        )
        make_ref_store(cfg, wanted=wanted)
    dist.barrier()
    prompts = read_jsonl(split_dir / "exp.jsonl")
    if not prompts:
        raise DataError(
            f"{split_dir / 'exp.jsonl'} is empty: the initial policy solves every prompt; nothing to explore"
        )
    ref_rows = load_ref_store(ref_dir, split_dir / "pef.jsonl", weights, cfg.model.numerics)
    pef = len(read_jsonl(split_dir / "pef.jsonl"))
    if is_main:
        total = pef + len(prompts)
        log.info(
            f"train: D_pef {pef} of {total} prompts ({100 * pef / total:.0f}%, rehearsed through "
            f"{len(ref_rows)} ref-store responses), D_exp {len(prompts)} (RL)"
        )
    if not ref_rows and pef == 0:
        log.warning(
            f"train: D_pef is empty (no prompt solved in all {cfg.split.k} samples): the divergence term is off"
        )
    elif not ref_rows:
        raise ConfigError(
            f"divergence={cfg.divergence.name} needs ref-store responses, but {ref_dir} holds none "
            f"for {pef} D_pef prompts (ref.keep={cfg.ref.keep}); use ref.keep=all, more ref.samples_per_prompt, or divergence=none"
        )
    return prompts, ref_rows
