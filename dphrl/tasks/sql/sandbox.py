"""Sandboxed SQLite execution of untrusted SQL, in worker processes, with a gold-result cache.

Model SQL must never change a database file or reach outside it. Each connection is
- opened read-only (URI `mode=ro`), in autocommit mode (no implicit BEGIN), with
  `PRAGMA query_only`, temporary storage in memory (a query writes no file at all), no
  attached databases (`SQLITE_LIMIT_ATTACHED = 0`) and bounded string and SQL lengths;
- guarded by an authorizer that allows only reading: SELECT, reads of tables, recursive CTEs,
  functions other than `load_extension` / `fts3_tokenizer`, and a few read-only pragmas.
  Everything else is denied at compile time, including ATTACH (which `VACUUM INTO` needs
  first, so that cannot create a file either), writing pragmas such as `writable_schema`,
  transactions, DDL and DML;
- given a wall-clock limit per query by a progress handler that interrupts SQLite's VM;
- fetched with a cap on rows, so a huge result is an error rather than an out-of-memory.

Queries run in worker processes (`WorkerPool`): a crash or hang of one never takes the caller
down, and a worker stuck where the progress handler cannot reach it is killed as a last resort
at the limit plus a grace. Workers also cap SQLite's heap (`hard_heap_limit`).

Failures are typed: `SQLTimeoutError` ('timeout'), `SQLDeniedError` ('denied'),
`SQLSyntaxError` ('syntax': the SQL does not compile, which includes unknown tables, columns and
functions and several statements in one string), `SQLTooManyRowsError` ('too_many_rows'),
`SQLRuntimeError` ('exception': it compiled but failed while running) and `SQLCrashError`
('crash': the worker died).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from dphrl.errors import DphrlError, VerifyError
from dphrl.tasks.workerpool import WorkerPool, shared_pool

DEFAULT_TIMEOUT_S = 15.0
DEFAULT_MAX_ROWS = 100_000
PROGRESS_OPS = 1000  # VM instructions between two deadline checks (well under a millisecond)
HEAP_LIMIT = 1 << 30  # bytes of SQLite heap per worker process
MAX_LENGTH = 50_000_000  # longest string or blob a query may build
RECYCLE_AFTER = 2000  # queries per worker process before it is replaced
GRACE_S = 1.0  # the pool kills a worker this long after the query's own limit


class SQLExecutionError(DphrlError):
    """Model SQL could not be run to a result; `kind` is the verdict's error name."""

    kind = "exception"


class SQLTimeoutError(SQLExecutionError):
    kind = "timeout"


class SQLDeniedError(SQLExecutionError):
    kind = "denied"


class SQLSyntaxError(SQLExecutionError):
    kind = "syntax"


class SQLTooManyRowsError(SQLExecutionError):
    kind = "too_many_rows"


class SQLRuntimeError(SQLExecutionError):
    kind = "exception"


class SQLCrashError(SQLExecutionError):
    kind = "crash"


ERRORS = {
    cls.kind: cls
    for cls in (SQLTimeoutError, SQLDeniedError, SQLSyntaxError, SQLTooManyRowsError, SQLCrashError)
}
ERRORS["exception"] = SQLRuntimeError


class Query(NamedTuple):
    db_path: str
    sql: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_rows: int = DEFAULT_MAX_ROWS


class Result(NamedTuple):
    """Rows of a query, or the kind of failure (a key of `ERRORS`) and its message."""

    rows: list[tuple] | None
    error: str | None = None
    message: str = ""

    def unwrap(self) -> list[tuple]:
        """The rows, or the typed `SQLExecutionError` this result stands for."""
        if self.error is not None:
            raise ERRORS[self.error](self.message)
        return self.rows  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The sandboxed connection
# ---------------------------------------------------------------------------------------------

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer"}
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list"}
_LIMITS = {
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_LENGTH: MAX_LENGTH,
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 1_000_000,
}


def _authorize(
    action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
) -> int:
    """Allow reading only; every other action fails the statement with 'not authorized'."""
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class Sandbox:
    """A read-only, query-only, authorised connection to one database file."""

    def __init__(self, db_path: str) -> None:
        uri = f"file:{quote(os.path.abspath(db_path))}?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        self.conn.text_factory = functools.partial(bytes.decode, encoding="utf-8", errors="replace")
        for limit, value in _LIMITS.items():
            self.conn.setlimit(limit, value)
        self.conn.execute("PRAGMA temp_store = MEMORY")
        self.conn.execute("PRAGMA query_only = ON")
        self.conn.set_authorizer(_authorize)
        self.deadline = float("inf")
        self.conn.set_progress_handler(self._past_deadline, PROGRESS_OPS)

    def _past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def fetch(self, sql: str, timeout_s: float, max_rows: int) -> list[tuple]:
        """Run one statement; rows, or a typed `SQLExecutionError`."""
        self.deadline = time.monotonic() + timeout_s
        cursor = None
        try:
            cursor = self.conn.execute(sql)
            rows = cursor.fetchmany(max_rows + 1)
        except (sqlite3.Error, sqlite3.Warning) as err:
            raise self._classify(sql, err) from None
        finally:
            self.deadline = float("inf")
            if cursor is not None:
                cursor.close()
        if len(rows) > max_rows:
            raise SQLTooManyRowsError(f"the query returns more than {max_rows} rows")
        return rows

    def _classify(self, sql: str, err: Exception) -> SQLExecutionError:
        """Name the failure. A statement that fails to compile again under EXPLAIN never ran."""
        message = str(err)
        if message == "interrupted" or time.monotonic() > self.deadline:
            return SQLTimeoutError(f"the query ran past its limit ({message})")
        if any(
            marker in message for marker in ("not authorized", "authorization denied", "readonly")
        ):
            return SQLDeniedError(f"only reading is allowed: {message}")
        if "one statement" in message:
            return SQLSyntaxError(f"several statements in one query: {message}")
        try:
            self.conn.execute("EXPLAIN " + sql).close()
        except (sqlite3.Error, sqlite3.Warning):
            return SQLSyntaxError(message)
        return SQLRuntimeError(message)

    def close(self) -> None:
        self.conn.close()


_SANDBOXES: OrderedDict[tuple, Sandbox] = OrderedDict()
_OPEN_MAX = 8


def _sandbox(db_path: str) -> Sandbox:
    """This process's connection to `db_path`, reopened when the file changes (LRU of 8)."""
    stat = os.stat(db_path)
    key = (os.path.abspath(db_path), stat.st_mtime_ns, stat.st_size)
    if key in _SANDBOXES:
        _SANDBOXES.move_to_end(key)
        return _SANDBOXES[key]
    sandbox = _SANDBOXES[key] = Sandbox(db_path)
    while len(_SANDBOXES) > _OPEN_MAX:
        _SANDBOXES.popitem(last=False)[1].close()
    return sandbox


def run_query(query: Query) -> Result:
    """Run one query in this process, sandboxed; never raises for a bad query."""
    try:
        sandbox = _sandbox(query.db_path)
    except (OSError, sqlite3.Error) as err:
        return Result(None, "exception", f"{query.db_path}: cannot open the database ({err})")
    try:
        return Result(sandbox.fetch(query.sql, query.timeout_s, query.max_rows))
    except SQLExecutionError as err:
        return Result(None, err.kind, str(err))


def _init_worker() -> None:
    """Worker start: bound SQLite's heap, process-wide, which the caller's process is spared."""
    sqlite3.connect(":memory:").execute(f"PRAGMA hard_heap_limit = {HEAP_LIMIT}").close()


# ---------------------------------------------------------------------------------------------
# Running batches in worker processes
# ---------------------------------------------------------------------------------------------


def query_pool(workers: int = 0) -> WorkerPool:
    """The long-lived pool of query workers (0 = all cores), started on first use."""
    return shared_pool(
        run_query, workers, initializer=_init_worker, recycle_after=RECYCLE_AFTER, grace_s=GRACE_S
    )


def run_queries(
    queries: Sequence[Query], workers: int = 0, pool: WorkerPool | None = None
) -> list[Result]:
    """Run queries across worker processes; one `Result` each, in order."""
    if not queries:
        return []
    pool = pool or query_pool(workers)
    done = pool.map(queries, [q.timeout_s for q in queries])
    results = []
    for query, (status, value) in zip(queries, done, strict=True):
        if status == "ok":
            results.append(value)
        elif status == "killed":
            results.append(
                Result(None, "timeout", f"killed {pool.grace_s}s past the {query.timeout_s}s limit")
            )
        elif status == "crashed":
            results.append(Result(None, "crash", "the worker process died while running the query"))
        else:
            results.append(Result(None, "exception", value))
    return results


def execute(
    db_path: str | os.PathLike,
    sql: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[tuple]:
    """Rows of `sql` on the database file, run sandboxed in a worker process.

    Raises a `SQLExecutionError` subclass for a query that fails (timeout, denied, syntax, too
    many rows, runtime error, crash), and `VerifyError` when the database file is missing.
    """
    path = Path(db_path)
    if not path.is_file():
        raise VerifyError(f"{path}: no such database file; check task.db_root and the row's db_id")
    return run_queries([Query(str(path), sql, timeout_s, max_rows)])[0].unwrap()


# ---------------------------------------------------------------------------------------------
# Gold results, cached per (database file, gold SQL)
# ---------------------------------------------------------------------------------------------


class GoldCache:
    """Results of gold queries, keyed by the database file (path, mtime, size) and the SQL.

    Only successful results are kept: a gold query that timed out on a busy machine is retried
    next time. Least recently used entries go first past `capacity`.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._results: OrderedDict[tuple, list[tuple]] = OrderedDict()

    @staticmethod
    def key(db_path: str, sql: str) -> tuple:
        stat = os.stat(db_path)
        return (os.path.abspath(db_path), stat.st_mtime_ns, stat.st_size, sql)

    def get(self, key: tuple) -> list[tuple] | None:
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        return None

    def put(self, key: tuple, rows: list[tuple]) -> None:
        self._results[key] = rows
        self._results.move_to_end(key)
        while len(self._results) > self.capacity:
            self._results.popitem(last=False)


GOLD_CACHE = GoldCache()


def run_batch(
    golds: Sequence[Query], preds: Sequence[Query], workers: int = 0, pool: WorkerPool | None = None
) -> tuple[list[Result], list[Result]]:
    """Gold results (through `GOLD_CACHE`) and prediction results, run as one batch of work."""
    keys = [GOLD_CACHE.key(q.db_path, q.sql) for q in golds]
    gold_results: list[Result | None] = [
        None if (rows := GOLD_CACHE.get(k)) is None else Result(rows) for k in keys
    ]
    missing = {keys[i]: q for i, q in enumerate(golds) if gold_results[i] is None}
    order = list(missing)
    ran = run_queries([missing[k] for k in order] + list(preds), workers, pool)
    fresh = dict(zip(order, ran[: len(order)], strict=True))
    for key, result in fresh.items():
        if result.error is None:
            GOLD_CACHE.put(key, result.rows)  # type: ignore[arg-type]
    return [r if r is not None else fresh[keys[i]] for i, r in enumerate(gold_results)], ran[
        len(order) :
    ]
