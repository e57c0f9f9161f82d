"""`dphrl report`: one table and one figure over runs, e.g. every job of a `--multirun` sweep.

The reading and the drawing are `dphrl.report`'s; this command picks the output folder (the one
folder given, else the current one), writes `report.md`, `report.csv` and `report.png` there,
and prints the markdown table.

It is a plain Typer command, not a Hydra app like the other four: it composes no config
(its inputs are folders that earlier commands wrote, their configs included), and Hydra would
only add a run folder and a log file to a command that reads.
"""

from __future__ import annotations

from pathlib import Path


def run(
    folders: list[Path], out: Path | None = None, metrics: list[str] | None = None
) -> list[dict]:
    """Report on the runs in `folders`; return the table's rows."""
    from dphrl.report import DEFAULT_METRICS, write_report

    out = out or (folders[0] if len(folders) == 1 else Path.cwd())
    rows, md = write_report(folders, out, tuple(metrics) if metrics else DEFAULT_METRICS)
    print(md, end="")
    print(f"\nreport: {len(rows)} rows -> {out / 'report.md'}, report.csv, report.png")
    return rows
