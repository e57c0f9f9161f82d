"""The SQL tasks (`minisql`, `bird`, `spider`), one idea per module:

- `task`: the model's query extracted, run, and its result compared with the gold query's
  (`bird` / `spider` rules, partial credit); the `SqlTask` the registry names;
- `data`: official DPH-RL rows, raw BIRD and raw Spider, the schema prompt, `db_id` lookup;
- `sandbox`: read-only, time-limited SQLite execution in worker processes, the gold cache;
- `minisql`: the embedded databases and questions.

The stable public functions are re-exported here.
"""

from dphrl.tasks.sql.task import (
    SQLExecutionError,
    SqlTask,
    bird_equal,
    column_credit,
    execute,
    extract_sql,
    result_key,
    score,
    spider_equal,
    verify_batch,
)

__all__ = [
    "SQLExecutionError",
    "SqlTask",
    "bird_equal",
    "column_credit",
    "execute",
    "extract_sql",
    "result_key",
    "score",
    "spider_equal",
    "verify_batch",
]
