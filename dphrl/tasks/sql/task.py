"""The SQL tasks (`minisql`, `bird`, `spider`): extract the model's query, run it sandboxed,
compare its result with the gold query's.

Extraction: the content of the *last closed* ```sql block of the completion (the tag in any
case). A completion without one, or with an empty one, scores 0 with `error='no_sql'`; an
unclosed block (cut off at max_new_tokens) does not count.

Comparison (`cmp_method`, from the row's ground truth unless `task.cmp_method` overrides it):
- `bird`: BIRD's official rule, set equality of result rows: `set(pred) == set(gold)`. Row
  order and duplicate rows are ignored; column order matters.
- `spider`: execution match as in Spider's evaluation: the rows as a multiset (duplicates
  count), allowing any permutation of the columns; when the gold SQL contains ORDER BY
  (anywhere, as Spider's check reads it) the rows must also come in the gold order. (The
  official DPH-RL code meant to apply this order check but its condition never fires; dphrl
  applies it.)
So `bird` and `spider` disagree on duplicates (`[(1,), (1,)]` vs `[(1,)]`: bird 1, spider 0),
on column order (`[(a, 1)]` vs `[(1, a)]`: bird 0, spider 1) and on row order under ORDER BY
(bird 1, spider 0).

Partial credit (`task.partial_credit`, off by default): as in the official DPH-RL reward, a
query that runs but does not match earns at most 0.8, here
`0.8 * matched / max(gold columns, predicted columns)`, where a gold column is matched by a
distinct predicted column holding the same set of values.

Execution is `dphrl.tasks.sql.sandbox` (read-only sandbox, time limit, row cap, worker processes);
`execute` is re-exported here. `score` and `execute` are the stable public functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dphrl.errors import ConfigError, DataError, VerifyError
from dphrl.tasks import Verdict
from dphrl.tasks.sql.data import load_sql_rows, parse_ground_truth, resolve_db
from dphrl.tasks.sql.sandbox import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    Query,
    Result,
    SQLExecutionError,
    execute,
    run_batch,
)
from dphrl.tasks.workerpool import WorkerPool

if TYPE_CHECKING:
    from dphrl.config import TaskConfig

__all__ = ["SQLExecutionError", "SqlTask", "execute", "extract_sql", "score", "verify_batch"]

log = logging.getLogger(__name__)

PARTIAL_MAX = 0.8
GOLD_TIMEOUT_FACTOR = 4.0  # gold queries get longer (once: their results are cached)
MAX_PERMUTATIONS = 10_000  # column mappings tried by the spider rule before giving up
_SQL_BLOCK = re.compile(r"```sql[ \t]*\r?\n?(.*?)```", re.S | re.I)
_ORDER_BY = re.compile(r"\border\s+by\b", re.I)

Rows = Sequence[tuple]


def extract_sql(completion: str) -> str | None:
    """The last closed ```sql block of a completion, stripped; None when there is none."""
    blocks = _SQL_BLOCK.findall(completion or "")
    sql = blocks[-1].strip() if blocks else ""
    return sql or None


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def bird_equal(pred: Rows, gold: Rows, gold_sql: str = "") -> bool:
    """BIRD: the same set of rows."""
    return set(pred) == set(gold)


def _column_mappings(pred: Rows, gold: Rows, width: int) -> Iterator[tuple[int, ...]]:
    """Injective maps gold column -> predicted column whose value multisets agree."""
    pred_cols = [Counter(row[j] for row in pred) for j in range(width)]
    gold_cols = [Counter(row[i] for row in gold) for i in range(width)]
    options = [
        [j for j in sorted(range(width), key=lambda j: j != i) if pred_cols[j] == gold_cols[i]]
        for i in range(width)
    ]

    def extend(prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if len(prefix) == width:
            yield prefix
            return
        for j in options[len(prefix)]:
            if j not in prefix:
                yield from extend((*prefix, j))

    return extend(())


def spider_equal(pred: Rows, gold: Rows, gold_sql: str = "") -> bool:
    """Spider: the same multiset of rows up to a column permutation; ordered if gold has ORDER BY."""
    if not pred and not gold:
        return True
    if len(pred) != len(gold) or len(pred[0]) != len(gold[0]):
        return False
    ordered = bool(_ORDER_BY.search(gold_sql))
    gold_rows = list(gold) if ordered else Counter(gold)
    for tried, mapping in enumerate(_column_mappings(pred, gold, len(gold[0]))):
        if tried >= MAX_PERMUTATIONS:
            break
        permuted = [tuple(row[j] for j in mapping) for row in pred]
        if (permuted if ordered else Counter(permuted)) == gold_rows:
            return True
    return False


COMPARATORS: dict[str, Callable[[Rows, Rows, str], bool]] = {
    "bird": bird_equal,
    "spider": spider_equal,
}


def column_credit(pred: Rows, gold: Rows) -> float:
    """Partial credit in [0, PARTIAL_MAX]: the share of gold columns a predicted column matches."""
    if not pred or not gold:
        return 0.0
    pred_cols = [frozenset(row[j] for row in pred) for j in range(len(pred[0]))]
    unused = list(range(len(pred_cols)))
    matched = 0
    for i in range(len(gold[0])):
        values = frozenset(row[i] for row in gold)
        j = next((j for j in unused if pred_cols[j] == values), None)
        if j is not None:
            unused.remove(j)
            matched += 1
    return PARTIAL_MAX * matched / max(len(gold[0]), len(pred_cols))


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else float(f"{value:.12g}")
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    return value


def result_key(rows: Rows, cmp_method: str, gold_sql: str = "") -> str:
    """A stable hash of a result, canonical under the comparison rule: equal results (by that
    rule) hash equal, so distinct correct answers can be counted."""
    table = [[_canonical(v) for v in row] for row in rows]
    ordered = cmp_method == "spider" and bool(_ORDER_BY.search(gold_sql))
    if cmp_method == "spider" and table:
        columns = sorted(
            zip(*table, strict=True), key=lambda col: json.dumps(sorted(map(json.dumps, col)))
        )
        table = [list(row) for row in zip(*columns, strict=True)]
    lines = [json.dumps(row, ensure_ascii=False) for row in table]
    if not ordered:
        lines = sorted(set(lines)) if cmp_method == "bird" else sorted(lines)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def _resolve(ground_truths: Sequence[Any], db_root: str | Path, default_cmp: str) -> list[dict]:
    """Parsed ground truths, each with `path`: its database file. `VerifyError` when one is
    malformed or its database is missing: then no completion can be judged."""
    truths, paths = [], {}
    for i, raw in enumerate(ground_truths):
        try:
            truth = parse_ground_truth(raw, f"ground truth {i}", default_cmp)
        except DataError as err:
            raise VerifyError(str(err)) from None
        if truth["db_id"] not in paths:
            path = resolve_db(db_root, truth["db_id"])
            if path is None:
                raise VerifyError(
                    f"db_id={truth['db_id']!r}: no database under task.db_root={db_root}"
                )
            paths[truth["db_id"]] = str(path)
        truths.append({**truth, "path": paths[truth["db_id"]]})
    return truths


def _judge(
    pred: Result | None, gold: Result, truth: dict, method: str, partial_credit: bool
) -> Verdict:
    """The verdict on one completion's result against its gold result."""
    if pred is None:
        return Verdict(0.0, None, "no_sql")
    if pred.error is not None:
        return Verdict(0.0, None, pred.error)
    key = result_key(pred.rows, method, truth["gold_sql"])
    if gold.error is not None:
        return Verdict(0.0, key, "gold_error")
    if COMPARATORS[method](pred.rows, gold.rows, truth["gold_sql"]):
        return Verdict(1.0, key, None)
    return Verdict(column_credit(pred.rows, gold.rows) if partial_credit else 0.0, key, None)


def verify_batch(
    completions: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    db_root: str | Path,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    workers: int = 0,
    cmp_method: str | None = None,
    partial_credit: bool = False,
    default_cmp: str = "bird",
    pool: WorkerPool | None = None,
) -> list[Verdict]:
    """One `Verdict` per completion, the queries run across `workers` processes (0 = all cores),
    or on `pool` when one is given.

    Raises `VerifyError` only when verification cannot run (a malformed ground truth, a
    missing database); a bad completion scores 0 with its error named.
    """
    if len(completions) != len(ground_truths):
        raise VerifyError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    if cmp_method is not None and cmp_method not in COMPARATORS:
        raise ConfigError(
            f"task.cmp_method={cmp_method!r} is not known; allowed: {', '.join(COMPARATORS)}"
        )
    truths = _resolve(ground_truths, db_root, default_cmp)

    # Each distinct (database, gold SQL) once, then every extracted query, as one batch.
    gold_index: dict[tuple[str, str], int] = {}
    for t in truths:
        gold_index.setdefault((t["path"], t["gold_sql"]), len(gold_index))
    golds = [
        Query(path, sql, timeout_s * GOLD_TIMEOUT_FACTOR, max_rows) for path, sql in gold_index
    ]
    sqls = [extract_sql(c) for c in completions]
    asked = [i for i, sql in enumerate(sqls) if sql is not None]
    preds = [Query(truths[i]["path"], sqls[i], timeout_s, max_rows) for i in asked]
    gold_results, pred_results = run_batch(golds, preds, workers, pool)
    by_completion = dict(zip(asked, pred_results, strict=True))

    verdicts = [
        _judge(
            by_completion.get(i),
            gold_results[gold_index[(t["path"], t["gold_sql"])]],
            t,
            cmp_method or t["cmp_method"],
            partial_credit,
        )
        for i, t in enumerate(truths)
    ]
    failed = [
        (sql, r.message) for (_, sql), k in gold_index.items() if (r := gold_results[k]).error
    ]
    if failed:
        unscored = sum(v.error == "gold_error" for v in verdicts)
        log.warning(
            "%d gold query(ies) failed, %d completion(s) unscored; e.g. %s: %s",
            len(failed),
            unscored,
            *failed[0],
        )
    return verdicts


def score(completion: str, ground_truth: Any, db_root: str | Path | None) -> float:
    """1.0 when the completion's last ```sql block gives the gold result (exact rule), else 0.0.

    `ground_truth` is `{db_id, gold_sql, cmp_method}` (or its JSON string); `db_root` None means
    the embedded minisql databases.
    """
    root = db_root if db_root is not None else _minisql_root()
    return verify_batch([completion], [ground_truth], db_root=root)[0].reward


def _minisql_root() -> Path:
    from dphrl.tasks.sql import minisql

    return minisql.db_root()


DEFAULT_CMP = {"minisql": "bird", "bird": "bird", "spider": "spider"}


class SqlTask:
    """`minisql` (embedded databases and questions), `bird` and `spider` (task.path + db_root)."""

    def __init__(self, name: str = "minisql") -> None:
        if name not in DEFAULT_CMP:
            raise ConfigError(
                f"task={name!r} is not a SQL task; SQL tasks: {', '.join(DEFAULT_CMP)}"
            )
        self.name = name
        self.embedded = name == "minisql"

    def db_root(self, cfg: TaskConfig) -> Path | None:
        """`task.db_root`, or for minisql the built databases in the cache."""
        if cfg.db_root is not None:
            return Path(cfg.db_root).expanduser()
        return _minisql_root() if self.embedded else None

    def load(self, cfg: TaskConfig, split: str = "train") -> list[dict]:
        """Rows of `task.path` ("train") or `task.eval_path` ("eval"), the first `cfg.limit`;
        minisql without a path gives its own 80 train / 20 dev questions."""
        key = {"train": "path", "eval": "eval_path"}.get(split)
        if key is None:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        path = getattr(cfg, key)
        if path is None and self.embedded:
            from dphrl.tasks.sql import minisql

            path = minisql.questions_path(split, "jsonl")
        if path is None:
            raise ConfigError(
                f"task={self.name} has no {split} data: set task.{key}=<rows file> and task.db_root"
            )
        return load_sql_rows(
            path,
            db_root=self.db_root(cfg),
            data_source=self.name,
            default_cmp=DEFAULT_CMP[self.name],
            limit=cfg.limit,
        )

    def verify(
        self, completions: list[str], ground_truths: list[Any], cfg: TaskConfig
    ) -> list[Verdict]:
        """Verdicts under `cfg.timeout_s` per query, across `cfg.workers` processes (0 = all)."""
        root = self.db_root(cfg)
        if root is None:
            raise VerifyError(
                f"task={self.name}: task.db_root is not set; point it at the databases folder"
            )
        return verify_batch(
            completions,
            ground_truths,
            db_root=root,
            timeout_s=cfg.timeout_s,
            max_rows=cfg.max_rows,
            workers=cfg.workers,
            cmp_method=cfg.cmp_method,
            partial_credit=cfg.partial_credit,
            default_cmp=DEFAULT_CMP[self.name],
        )
