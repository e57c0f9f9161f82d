"""`dphrl split`: partition the training prompts into D_pef / D_exp by k samples each.

The work is `dphrl.presample.split` (what the split is, its files, how it resumes); this command
takes the folder's lock, runs it and logs a summary. A rerun on the same `split.out`
finishes a killed split or, when complete, rewrites pef/exp for the current threshold; other
settings on the same folder are refused (see README, "Resume and safety").
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from dphrl.config import DphrlConfig

log = logging.getLogger(__name__)


def run(cfg: DphrlConfig, run_dir: Path) -> dict:
    """Sample, verify, and write the split; returns the stats written to split_stats.json."""
    from dphrl import dist
    from dphrl.presample.inputs import make_split, sampling_ranks

    with sampling_ranks(cfg.layout):  # under torchrun: every rank samples, rank 0 writes
        stats = make_split(cfg)
        if dist.is_main():
            _print_summary(stats, Path(cfg.split.out))
    return stats


def _print_summary(stats: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"split -> {out}", show_header=True)
    for name in ("prompts", "pef", "exp", "never solved", "mean pass rate"):
        table.add_column(name, justify="right")
    table.add_row(
        str(stats["prompts"]),
        str(stats["pef"]),
        str(stats["exp"]),
        str(stats["never_solved"]),
        f"{stats['mean_pass_rate']:.3f}",
    )
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(table)
    log.info("\n%s", console.export_text().rstrip())
