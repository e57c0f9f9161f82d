"""The one process pool behind every verifier (SQL queries, math answers): pebble's.

Verifiers run untrusted work (a model's SQL, a sympy parse of its answer) that may hang inside
C code, where no signal reaches it, or crash its process. The stdlib pools cannot end one such
task: `concurrent.futures.ProcessPoolExecutor` marks the whole pool broken, and
`multiprocessing.Pool` has no per-task kill. pebble's `ProcessPool.schedule(fn, timeout=...)`
does exactly that: a task past its limit has its worker killed and replaced, and a worker that
dies fails its own task alone. This module adds only what the verifiers share: a limit per
item plus a grace (the function is expected to enforce its own limit; the kill is the last
resort), outcomes as `Done` records instead of exceptions, counters, one warm pool per
function, and the start method (`forkserver` where the platform has it: safe in a parent
holding threads, as a trainer does; else `spawn`).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

from pebble import ProcessExpired, ProcessPool

from dphrl.errors import VerifyError


class Done(NamedTuple):
    """How one task ended: status 'ok' (value = the result), 'error' (value = the message of
    an exception the function raised), 'killed' (past its limit + grace) or 'crashed'."""

    status: str
    value: Any


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask where there is one), shared among the
    ranks torchrun started on this node (`LOCAL_WORLD_SIZE`): eight ranks of one box each get
    an eighth for their verifier pool, rather than eight pools of every core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class WorkerPool:
    """`workers` processes (0 = all cores) applying `fn` to items, each under its own limit.

    `fn` and `initializer` must be module-level functions (they are pickled by name). Workers
    start on the first `map` and stay warm; each is replaced after `recycle_after` tasks,
    bounding leaks in long runs. `map` holds a lock, so concurrent callers take turns.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int = 0,
        *,
        initializer: Callable[[], None] | None = None,
        recycle_after: int = 1000,
        grace_s: float = 1.0,
    ) -> None:
        self.fn, self.initializer = fn, initializer
        self.size = workers if workers > 0 else cpu_count()
        self.recycle_after, self.grace_s = recycle_after, grace_s
        self.killed = self.crashed = 0  # counters, for logs and tests
        self._pool: ProcessPool | None = None
        self._lock = threading.Lock()

    def map(self, items: Sequence[Any], limits: Sequence[float]) -> list[Done]:
        """Apply `fn` to every item; `limits[i]` is item i's own limit in seconds.

        The pool kills a task only at `limits[i] + grace_s` from its start (the last resort):
        the function is expected to enforce `limits[i]` on its own and return.
        """
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context(_start_method())
                if _start_method() == "forkserver":
                    # Import the work function's module once in the fork server, not in every
                    # worker: a (re)started worker is then a bare fork.
                    context.set_forkserver_preload(["__main__", self.fn.__module__])
                self._pool = ProcessPool(
                    self.size, self.recycle_after, self.initializer, context=context
                )
            futures = []
            try:
                for i, item in enumerate(items):
                    timeout = limits[i] + self.grace_s
                    futures.append(self._pool.schedule(self.fn, (item,), timeout=timeout))
                return [self._outcome(future) for future in futures]
            except BaseException:
                for future in futures:  # an interrupted call leaves no task behind
                    future.cancel()
                raise

    def _outcome(self, future: Any) -> Done:
        try:
            return Done("ok", future.result())
        except FutureTimeout:
            self.killed += 1
            return Done("killed", None)
        except ProcessExpired:
            self.crashed += 1
            return Done("crashed", None)
        except BrokenProcessPool as err:  # every worker died at start (its initializer)
            self._pool.stop()
            self._pool = None
            name = getattr(self.fn, "__qualname__", self.fn)
            raise VerifyError(
                f"a worker process for {name} did not start ({err}); see its traceback above"
            ) from err
        except Exception as err:  # raised by the function: this task's outcome
            return Done("error", f"{type(err).__name__}: {err}")

    def close(self) -> None:
        """Stop every worker (running tasks are ended)."""
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join()
                self._pool = None


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
