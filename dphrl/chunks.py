"""The one resumable chunk loop of the sampling commands (split, precompute-ref, eval-passk).

Work is cut into chunks with fixed boundaries (chunk j holds items j*size .. (j+1)*size-1),
so a chunk's sampling seeds depend only on its position. Each finished chunk is written at
once (appended to a jsonl log, or one shard); a rerun skips the chunks that are done and
redoes any partial one, so a resumed run writes what an uninterrupted one writes.

A folder's settings (what makes two runs the same experiment) are checked before any work
and recorded only when the first chunk is written: a start that fails on a bad input leaves
nothing that would lock the folder to those inputs.

Under torchrun every rank runs the loop: rank 0 (which holds the folder's lock) says which
chunks are still to do, the ranks take them in turns (round j: rank r computes pending chunk
j W + r with its own engine), and rank 0 writes each round's results in chunk order. Seeds
follow the global prompt index, so the files are those one process writes, byte for byte; a
run killed on any rank leaves only whole chunks written, and resumes like one process's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dphrl import dist
from dphrl.data import append_jsonl, read_jsonl, write_json, write_jsonl
from dphrl.errors import ConfigError
from dphrl.progress import track

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Items [start, stop) of the work list, the `index`-th chunk."""

    index: int
    start: int
    stop: int


class Settings:
    """A resumable folder's settings file: what must match for a rerun to continue it.

    `free` keys may differ between runs: they name what the folder's outputs are keyed by
    (eval-passk's models: each model's samples are its own, seeded by prompt, not by its place
    in the list), so a rerun with another value adds to the folder instead of being refused.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expected: dict,
        what: str,
        remedy: str,
        free: tuple[str, ...] = (),
    ) -> None:
        self.path, self.expected, self.what, self.remedy = Path(path), expected, what, remedy
        self.free = free

    def check(self) -> None:
        """Refuse a folder recorded with other settings, naming every key that differs."""
        if not self.path.exists():
            return
        found = json.loads(self.path.read_text())
        diff = [
            f"{k}: folder has {found.get(k)!r}, config has {v!r}"
            for k, v in self.expected.items()
            if found.get(k) != v and k not in self.free
        ]
        if diff:
            raise ConfigError(
                f"{self.path.parent} holds {self.what} made with other settings "
                f"({'; '.join(diff)}); {self.remedy}"
            )

    def record(self) -> None:
        """Write the settings: called just before the folder's first output is written, and
        again when a free key changed, so the file names what the folder's last run used.
        Rank 0 alone writes (under torchrun)."""
        if not dist.is_main():
            return
        if not self.path.exists() or json.loads(self.path.read_text()) != self.expected:
            write_json(self.path, self.expected)


class SampleLog:
    """An append-only jsonl of sample rows; a key (prompt) is done once it has `per_key` rows.

    A killed run leaves a torn last line or a chunk with some of its rows: `recover` keeps
    only the keys that are complete and rewrites the file so appending can resume.
    """

    def __init__(
        self, path: str | os.PathLike, key: Callable[[dict], Hashable], per_key: int
    ) -> None:
        self.path, self.key, self.per_key = Path(path), key, per_key

    def recover(self) -> set:
        """The keys whose rows are all present; anything else is dropped from the file (by
        rank 0, whose view every rank takes under torchrun)."""
        done: set = set()
        if dist.is_main() and self.path.exists():
            rows = read_jsonl(self.path, tolerate_torn_tail=True)
            count = Counter(self.key(r) for r in rows)
            kept = [r for r in rows if count[self.key(r)] == self.per_key]
            write_jsonl(self.path, kept)
            done = {self.key(r) for r in kept}
        return dist.broadcast_object(done)

    def append(self, rows: Iterable[dict]) -> None:
        append_jsonl(self.path, rows)

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []


def chunks(n_items: int, size: int) -> list[Chunk]:
    """Fixed chunk boundaries over `n_items` items."""
    return [
        Chunk(j, start, min(start + size, n_items))
        for j, start in enumerate(range(0, n_items, size))
    ]


def run_chunks(
    n_items: int,
    size: int,
    settings: Settings,
    done: Callable[[Chunk], bool],
    compute: Callable[[Chunk], T],
    write: Callable[[Chunk, T], None],
    label: str = "sampling",
    unit: str = "prompts",
    start: Callable[[], None] | None = None,
) -> int:
    """Compute and write every chunk that is not `done`; return how many were computed.

    `start` (an engine's start-up) runs first, on every rank, when any chunk is to do.
    `settings` are recorded just before the first write, never before any work succeeded.
    Progress (`label`, counted in `unit`s of items) shows as a bar or as plain lines.
    """
    every = chunks(n_items, size)
    pending = dist.broadcast_object([c.index for c in every if not done(c)])
    if pending and start is not None:
        start()
    world, me = dist.world_size(), dist.rank()
    seconds = dict.fromkeys(("computing", "gathering", "writing"), 0.0)
    began = clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] += now - clock
        clock = now

    with track(label, n_items, unit) as progress:  # shown by rank 0
        progress.skip(n_items - sum(every[j].stop - every[j].start for j in pending))
        for first in range(0, len(pending), world):
            turn = [every[j] for j in pending[first : first + world]]
            mine = compute(turn[me]) if me < len(turn) else None
            lap("computing")
            results = dist.gather_to_main(mine)
            lap("gathering")
            if results is None:  # not rank 0: rank 0 writes
                continue
            for chunk, result in zip(turn, results):
                settings.record()
                write(chunk, result)
                progress.advance(chunk.stop - chunk.start)
            lap("writing")
    if pending and world > 1 and me == 0:  # what the merge costs rank 0 (BENCHMARKS.md)
        log.info(
            "%s: loop %.1f s: computing %.1f s, gathering %.1f s, writing %.2f s",
            label, time.perf_counter() - began, *seconds.values(),
        )  # fmt: skip
    return len(pending)
