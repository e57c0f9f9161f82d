"""The one worker pool behind every verifier (pebble's): per-task last-resort kill, crash
isolation, recycling, and results in order. The work functions live here, at module level, because the
workers import them by name."""

from __future__ import annotations

import os
import time

import pytest

from dphrl.errors import VerifyError
from dphrl.tasks.workerpool import WorkerPool, cpu_count


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def square_or_die(x: int) -> int:
    if x < 0:
        os._exit(3)  # a segfault, as far as the parent can tell
    if x == 0:
        raise ValueError("zero is not allowed")
    return x * x


def refuse_to_start() -> None:
    raise RuntimeError("no")


@pytest.fixture
def pool_factory():
    pools = []

    def make(fn, workers=2, **options) -> WorkerPool:
        pools.append(WorkerPool(fn, workers, **options))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


def test_a_hung_task_is_killed_and_its_worker_replaced(pool_factory) -> None:
    pool = pool_factory(sleep_then_pid, grace_s=0.2)
    items = [60.0] + [0.01] * 9
    start = time.monotonic()
    done = pool.map(items, [0.3] * len(items))
    elapsed = time.monotonic() - start
    assert done[0].status == "killed"
    assert [d.status for d in done[1:]] == ["ok"] * 9
    assert elapsed < 5.0  # killed at 0.5 s and replaced: far from 60 s
    assert pool.killed == 1
    assert [d.status for d in pool.map([0.01] * 4, [1.0] * 4)] == ["ok"] * 4  # still serving


def test_a_crash_costs_only_its_own_task(pool_factory) -> None:
    pool = pool_factory(square_or_die)
    done = pool.map([1, 2, -1, 3, 0, 4, 5, 6], [5.0] * 8)
    assert [d.status for d in done] == ["ok", "ok", "crashed", "ok", "error", "ok", "ok", "ok"]
    assert [d.value for d in done if d.status == "ok"] == [1, 4, 9, 16, 25, 36]
    assert "zero is not allowed" in done[4].value
    assert pool.crashed == 1


def test_an_interrupted_map_leaves_no_stale_results(pool_factory) -> None:
    pool = pool_factory(square_or_die)
    with pytest.raises(IndexError):
        pool.map([5, 6, 7, 8], [5.0])  # too few limits: fails after a task went out
    assert [d.value for d in pool.map([3], [5.0])] == [9]  # no late result of 6, 7 or 8


def test_workers_are_recycled(pool_factory) -> None:
    pool = pool_factory(sleep_then_pid, workers=1, recycle_after=3)
    pids = [d.value for d in pool.map([0.0] * 10, [5.0] * 10)]
    assert len(set(pids)) == 4  # 3 + 3 + 3 + 1
    assert os.getpid() not in pids


def test_a_worker_that_cannot_start_is_an_error(pool_factory) -> None:
    pool = pool_factory(square_or_die, workers=1, initializer=refuse_to_start)
    with pytest.raises(VerifyError, match="did not start"):
        pool.map([1], [1.0])


def test_zero_workers_means_all_cores(pool_factory) -> None:
    assert pool_factory(square_or_die, workers=0).size == cpu_count()
