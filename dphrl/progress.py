"""Progress of long stages: a live bar in a terminal, a plain line at most every 30 s elsewhere.

Piped to a file (nohup, tmux, a scheduler), a rich bar would print nothing useful until it
ends, so there the same tracker prints `label: done/total (pct), rate, ETA` when it starts,
then at most once every `DPHRL_PROGRESS_SECONDS` (30 by default), and once when it ends.
Only rank 0 shows anything (torchrun's `RANK` is read from the environment, so this module
stays free of torch).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console

INTERVAL_ENV = "DPHRL_PROGRESS_SECONDS"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plain_line(
    label: str, done: int, total: int, elapsed: float, unit: str, skipped: int = 0
) -> str:
    """`label: done/total unit (pct), rate, ETA`; the rate (and so the ETA) counts only the
    work done in `elapsed`, not the `skipped` units a resumed run found already done."""
    pct = 100.0 * done / total if total else 100.0
    rate = (done - skipped) / elapsed if elapsed > 0 else 0.0
    if done >= total:
        tail = f"done in {_duration(elapsed)}"
    elif rate > 0:
        tail = f"ETA {_duration((total - done) / rate)}"
    else:
        tail = "ETA ?"
    return f"{label}: {done}/{total} {unit} ({pct:.0f}%), {rate:.2f} {unit}/s, {tail}"


class Tracker:
    """Counts finished work of one stage; `advance` as work finishes, `describe` to name a phase."""

    def __init__(self, label: str, total: int, unit: str, console: Console | None, bar) -> None:
        self.label, self.total, self.unit, self.done, self.skipped = label, total, unit, 0, 0
        self.console, self._bar, self._task = console, bar, None
        self._start = self._last = time.monotonic()
        self._interval = float(os.environ.get(INTERVAL_ENV, "30"))
        if bar is not None:
            self._task = bar.add_task(label, total=total)
        self._print()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif time.monotonic() - self._last >= self._interval and self.done < self.total:
            self._print()

    def skip(self, n: int) -> None:
        """Count `n` units a resumed run found already done (not in the rate)."""
        self.skipped += n
        self.advance(n)

    def describe(self, phase: str) -> None:
        """Show what the stage is doing now (e.g. `step 3: rollout`) on the live bar."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label} ({phase})")

    def _print(self) -> None:
        if self.console is None or self._bar is not None:
            return
        self._last = time.monotonic()
        elapsed = self._last - self._start
        line = plain_line(self.label, self.done, self.total, elapsed, self.unit, self.skipped)
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line in a log

    def finish(self) -> None:
        self._print()


@contextlib.contextmanager
def track(
    label: str, total: int, unit: str = "items", console: Console | None = None
) -> Iterator[Tracker]:
    """Track one stage of `total` units; a live bar when the console is a terminal."""
    enabled = os.environ.get("RANK", "0") == "0"
    console = (console or Console(file=sys.stdout)) if enabled else None
    bar = None
    if console is not None and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        bar.start()
    tracker = Tracker(label, total, unit, console, bar)
    try:
        yield tracker
    finally:
        if bar is not None:
            bar.stop()
        tracker.finish()
