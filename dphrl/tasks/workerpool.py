"""A pool of worker processes that ends one stuck task without losing the others.

Verifiers run untrusted work (a model's SQL) that may hang inside C code or crash its process.
The stdlib pools cannot kill one worker: `concurrent.futures.ProcessPoolExecutor` marks the
whole pool broken and fails every pending future, and `multiprocessing.Pool` has no per-task
kill at all; neither says which task a dead worker was running. This pool keeps what they do
(processes from a `multiprocessing` context, pickled calls of a module-level function,
recycling after N tasks) and adds exactly that:

- each worker gets a short chunk of tasks and answers once per chunk (few wake-ups of the
  parent, which matters on a busy machine), while it keeps the index and start time of the
  task it is running in shared memory, so the parent always knows which task is running and
  since when;
- a task still running `grace_s` after its own limit is the *last resort* case: its worker is
  killed (SIGKILL) and replaced, the task reports `killed`, the rest of its chunk goes back to
  the queue;
- a worker that dies (segfault, out of memory) reports its current task as `crashed`, likewise;
- a worker is replaced after `recycle_after` tasks, bounding leaks in long runs.

Workers start with `forkserver` where the platform has it (safe in a parent holding threads,
as a trainer does; later forks are cheap), else `spawn`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any, NamedTuple

from dphrl.errors import VerifyError

START_TIMEOUT_S = 60.0  # a fresh worker must report ready by then (a busy machine is slow)


class Done(NamedTuple):
    """How one task ended: status 'ok' (value = the result), 'error' (value = the message of
    an exception the function raised), 'killed' (past its limit + grace) or 'crashed'."""

    status: str
    value: Any


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _serve(
    conn: Any, progress: Any, fn: Callable[[Any], Any], initializer: Callable[[], None] | None
) -> None:
    """Worker loop: receive a chunk of (index, item), record each task in `progress` as it
    starts, send back [(index, (status, value)), ...] for the whole chunk."""
    if initializer is not None:
        initializer()
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        replies = []
        for index, item in chunk:
            with progress.get_lock():
                progress[0], progress[1] = index, time.monotonic()
            try:
                replies.append((index, ("ok", fn(item))))
            except Exception as err:  # reported to the parent as this task's outcome
                replies.append((index, ("error", f"{type(err).__name__}: {err}")))
        conn.send(replies)


class _Worker:
    """One process, the parent's end of its pipe, the chunk it is working through, and the
    shared record (task index, start time) of the task it is running."""

    def __init__(self, ctx: Any, fn: Callable, initializer: Callable | None) -> None:
        self.conn, child = ctx.Pipe()
        self.progress = ctx.Array("d", [-1.0, 0.0])
        self.process = ctx.Process(
            target=_serve, args=(child, self.progress, fn, initializer), daemon=True
        )
        self.process.start()
        child.close()
        if not (self.conn.poll(START_TIMEOUT_S) and self._ready()):
            code = self.process.exitcode
            self.stop(kill=True)
            raise VerifyError(
                f"a worker process for {getattr(fn, '__qualname__', fn)} did not start within "
                f"{START_TIMEOUT_S:.0f}s (exit code {code}); see its traceback above"
            )
        self.tasks: list[int] = []  # the chunk in hand, in order
        self.sent = 0.0  # when it was sent
        self.done = 0

    def _ready(self) -> bool:
        try:
            return self.conn.recv() == "ready"
        except (EOFError, OSError):
            return False

    def send(self, chunk: list[tuple[int, Any]]) -> None:
        self.tasks = [index for index, _ in chunk]
        self.sent = time.monotonic()
        self.conn.send(chunk)

    def current(self) -> tuple[int, float]:
        """(index, start time) of the task running now; the chunk's first if none started yet."""
        with self.progress.get_lock():
            index, started = int(self.progress[0]), self.progress[1]
        if index in self.tasks and started >= self.sent:
            return index, started
        return self.tasks[0], self.sent

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.process.kill()
        self.process.join(timeout=1.0 if kill else 5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class WorkerPool:
    """`workers` processes (0 = all cores) applying `fn` to items, each under its own limit.

    `fn` and `initializer` must be module-level functions (they are pickled by name). Not
    thread-safe by design: `map` holds a lock, so concurrent callers take turns.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int = 0,
        *,
        initializer: Callable[[], None] | None = None,
        recycle_after: int = 1000,
        grace_s: float = 1.0,
        max_chunk: int = 16,
    ) -> None:
        self.fn, self.initializer = fn, initializer
        self.size = workers if workers > 0 else cpu_count()
        self.recycle_after, self.grace_s, self.max_chunk = recycle_after, grace_s, max_chunk
        self.killed = self.crashed = self.recycled = 0  # counters, for logs and tests
        self._ctx = multiprocessing.get_context(_start_method())
        if _start_method() == "forkserver":
            # Import the work function's module once in the fork server, not in every worker:
            # a (re)started worker is then a bare fork. Takes effect if this pool starts the
            # server, which is a process-wide singleton.
            self._ctx.set_forkserver_preload(["__main__", fn.__module__])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def map(self, items: Sequence[Any], limits: Sequence[float]) -> list[Done]:
        """Apply `fn` to every item; `limits[i]` is item i's own limit in seconds.

        The pool itself kills a task only at `limits[i] + grace_s` (the last resort): the
        function is expected to enforce `limits[i]` on its own and return.
        """
        with self._lock:
            try:
                while len(self._workers) < self.size:
                    self._workers.append(self._spawn())
                return self._map(items, limits)
            except BaseException:
                # Interrupted (Ctrl-C, a worker that cannot start): workers may still hold tasks
                # of this call, whose late results must never land in the next one.
                self._reset()
                raise

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.fn, self.initializer)

    def _map(self, items: Sequence[Any], limits: Sequence[float]) -> list[Done]:
        results: list[Done | None] = [None] * len(items)
        queue = deque(range(len(items)))
        while queue or any(w.tasks for w in self._workers):
            self._feed(queue, items)
            busy = [w for w in self._workers if w.tasks]
            deadlines = {
                id(w): started + limits[index] + self.grace_s
                for w in busy
                for index, started in [w.current()]
            }
            timeout = max(0.0, min(deadlines.values()) - time.monotonic())
            for conn in wait([w.conn for w in busy], timeout=timeout):
                worker = next(w for w in busy if w.conn is conn)
                self._collect(worker, results, queue)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.tasks and now > deadlines.get(id(worker), now) and not worker.conn.poll():
                    index, started = worker.current()
                    if now > started + limits[index] + self.grace_s:
                        self.killed += 1
                        self._replace(slot, index, Done("killed", None), results, queue)
        return results  # type: ignore[return-value]

    def _feed(self, queue: deque[int], items: Sequence[Any]) -> None:
        """Give each idle worker a chunk: small enough that the workers finish together."""
        for slot, worker in enumerate(self._workers):
            if not queue:
                return
            if worker.tasks:
                continue
            if worker.done >= self.recycle_after:
                self.recycled += 1
                worker.stop(kill=False)
                worker = self._workers[slot] = self._spawn()
            size = max(1, min(self.max_chunk, len(queue) // (2 * self.size)))
            chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
            worker.send([(index, items[index]) for index in chunk])

    def _collect(self, worker: _Worker, results: list, queue: deque[int]) -> None:
        """Read a worker's answer to its chunk; a closed pipe means the worker died."""
        try:
            replies = worker.conn.recv()
        except (EOFError, OSError):
            self.crashed += 1
            index, _ = worker.current()
            self._replace(self._workers.index(worker), index, Done("crashed", None), results, queue)
            return
        for index, (status, value) in replies:
            results[index] = Done(status, value)
        worker.done += len(replies)
        worker.tasks = []

    def _replace(
        self, slot: int, index: int, outcome: Done, results: list, queue: deque[int]
    ) -> None:
        """Kill the worker in `slot`: task `index` gets `outcome`, the rest of its chunk is
        requeued (finished or not: their answers went down with the worker)."""
        worker = self._workers[slot]
        results[index] = outcome
        queue.extendleft(reversed([i for i in worker.tasks if i != index]))
        worker.tasks = []
        worker.stop(kill=True)
        self._workers[slot] = self._spawn()

    def _reset(self) -> None:
        for worker in self._workers:
            worker.stop(kill=True)
        self._workers = []

    def close(self) -> None:
        """Stop every worker (politely: each finishes nothing new and exits)."""
        with self._lock:
            for worker in self._workers:
                worker.stop(kill=bool(worker.tasks))
            self._workers = []


_POOLS: dict[tuple, WorkerPool] = {}


def shared_pool(fn: Callable[[Any], Any], workers: int = 0, **options: Any) -> WorkerPool:
    """One long-lived pool per (function, size, options), so repeated batches reuse warm workers."""
    size = workers if workers > 0 else cpu_count()
    key = (fn.__module__, fn.__qualname__, size, tuple(sorted(options.items())))
    if key not in _POOLS:
        _POOLS[key] = WorkerPool(fn, size, **options)
    return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
