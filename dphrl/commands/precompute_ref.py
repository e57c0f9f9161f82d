"""`dphrl precompute-ref`: the ref store of D_pef responses and their reference log-probs.

The work is `dphrl.presample.refstore` (the store's format, what it records, how it is checked and
resumed); this command takes the folder's lock, builds or updates the store from the split in
`split.out`, and says what it holds. A rerun keeps the shards that still match the split and
rebuilds the others (see README, "Resume and safety").
"""

from __future__ import annotations

import logging
from pathlib import Path

from dphrl.config import DphrlConfig

log = logging.getLogger(__name__)


def run(cfg: DphrlConfig, run_dir: Path) -> dict:
    """Build (or finish, or update) the ref store in `ref.out`; return its manifest."""
    from dphrl.presample.inputs import make_ref_store, sampling_ranks

    with sampling_ranks(cfg.layout):  # under torchrun: every rank samples, rank 0 writes
        manifest = make_ref_store(cfg)
    counts = manifest["counts"]
    log.info(
        "precompute-ref: %d responses from %d D_pef prompts -> %s",
        counts["kept"],
        counts["prompts"],
        cfg.ref.out,
    )
    return manifest
