"""Adversarial SQL against a copy of a minisql database: the file never changes, nothing is
created beside it, every case scores 0 within its limit, and the batch around it is unharmed."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from dphrl.errors import VerifyError
from dphrl.tasks.sql import SQLExecutionError, execute, minisql, score, verify_batch
from dphrl.tasks.sql.sandbox import (
    SQLDeniedError,
    SQLSyntaxError,
    SQLTimeoutError,
    SQLTooManyRowsError,
)

LIMIT_S = 1.0
SLACK_S = 1.5  # a shared 2-core machine: the pool's own overhead, never the query's
GOLD = {
    "db_id": "shop/shop.sqlite",
    "gold_sql": "SELECT COUNT(*) FROM customers",
    "cmp_method": "bird",
}

ADVERSARIAL = {
    "drop": ("DROP TABLE customers", "denied"),
    "delete": ("DELETE FROM orders", "denied"),
    "update": ("UPDATE products SET price = 0", "denied"),
    "insert": ("INSERT INTO customers VALUES (999, 'a', 'b', 'c', 'd', 'e')", "denied"),
    "attach": ("ATTACH DATABASE '{dir}/evil.sqlite' AS evil", "denied"),
    "writable_schema": ("PRAGMA writable_schema = ON", "denied"),
    "vacuum_into": ("VACUUM INTO '{dir}/copy.sqlite'", "denied"),
    "load_extension": ("SELECT load_extension('{dir}/evil.so')", "denied"),
    "cartesian_1e9": (
        "SELECT COUNT(*) FROM orders a, orders b, customers c",
        "timeout",
    ),  # 1.6e9 rows
    "endless_cte": (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n",
        "timeout",
    ),
    "rows_1e7": (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 10000000) SELECT x FROM n",
        "too_many_rows",
    ),
    "malformed": ("SELEC COUNT(*) FROM customers WHERE", "syntax"),
    "several_statements": ("SELECT COUNT(*) FROM customers; DROP TABLE customers", "syntax"),
    "begin": ("BEGIN IMMEDIATE", "denied"),
    "temp_table": ("CREATE TEMP TABLE t AS SELECT * FROM customers", "denied"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def db_copy(tmp_path_factory) -> Path:
    """A private copy of minisql's `shop`, laid out as a db_root."""
    root = tmp_path_factory.mktemp("dbroot")
    (root / "shop").mkdir()
    shutil.copy(minisql.db_root() / "shop" / "shop.sqlite", root / "shop" / "shop.sqlite")
    execute(root / "shop" / "shop.sqlite", "SELECT 1")  # start the workers before any timing
    return root


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_sql_scores_zero_in_time_and_changes_nothing(case: str, db_copy: Path) -> None:
    sql, expected_error = ADVERSARIAL[case]
    db = db_copy / "shop" / "shop.sqlite"
    before, files = sha256(db), sorted(p.name for p in db_copy.rglob("*"))
    completion = "Here it is:\n```sql\n" + sql.format(dir=db_copy) + "\n```"

    start = time.monotonic()
    [verdict] = verify_batch([completion], [GOLD], db_root=db_copy, timeout_s=LIMIT_S)
    elapsed = time.monotonic() - start

    assert verdict.reward == 0.0
    assert verdict.error == expected_error
    assert elapsed < LIMIT_S + SLACK_S
    assert sha256(db) == before
    assert sorted(p.name for p in db_copy.rglob("*")) == files  # no journal, copy or attached file


def test_non_ascii_text_runs_and_matches(db_copy: Path) -> None:
    truth = {
        "db_id": "shop/shop.sqlite",
        "gold_sql": "SELECT COUNT(*) FROM customers WHERE last_name = 'Müller'",
    }
    right = "```sql\nSELECT count(*) FROM customers WHERE last_name = 'Müller' -- 顧客\n```"
    wrong = "```sql\nSELECT count(*) FROM customers WHERE last_name = 'Muller'\n```"
    rewards = [v.reward for v in verify_batch([right, wrong], [truth, truth], db_root=db_copy)]
    assert rewards == [1.0, 0.0]
    assert execute(db_copy / "shop" / "shop.sqlite", "SELECT 'Zoë, 東京'") == [("Zoë, 東京",)]


def test_execute_raises_typed_errors(db_copy: Path) -> None:
    db = db_copy / "shop" / "shop.sqlite"
    assert execute(db, "SELECT COUNT(*) FROM customers WHERE city = 'Berlin'") == [(53,)]
    with pytest.raises(SQLDeniedError):
        execute(db, "DELETE FROM customers")
    with pytest.raises(SQLSyntaxError):
        execute(db, "SELECT nothing FROM nowhere")
    with pytest.raises(SQLTimeoutError):
        execute(db, ADVERSARIAL["endless_cte"][0], timeout_s=0.3)
    with pytest.raises(SQLTooManyRowsError):
        execute(db, "SELECT * FROM orders", max_rows=10)
    with pytest.raises(SQLExecutionError):
        execute(db, "SELECT abs(-9223372036854775808)")  # integer overflow while running
    with pytest.raises(VerifyError, match="no such database"):
        execute(db_copy / "missing.sqlite", "SELECT 1")


def test_endless_query_does_not_stall_the_batch(db_copy: Path) -> None:
    truths = [GOLD] * 40
    good = ["```sql\nSELECT COUNT(*) FROM customers\n```"] * 39
    endless = ["```sql\n" + ADVERSARIAL["endless_cte"][0] + "\n```"]
    start = time.monotonic()
    verdicts = verify_batch(endless + good, truths, db_root=db_copy, timeout_s=LIMIT_S)
    elapsed = time.monotonic() - start
    assert verdicts[0].error == "timeout"
    assert [v.reward for v in verdicts[1:]] == [1.0] * 39
    assert elapsed < LIMIT_S + SLACK_S


def test_score_is_exact_and_uses_the_rows_rule(db_copy: Path) -> None:
    spider = {
        **GOLD,
        "gold_sql": "SELECT city, COUNT(*) FROM customers GROUP BY city",
        "cmp_method": "spider",
    }
    swapped = "```sql\nSELECT COUNT(*), city FROM customers GROUP BY city\n```"
    assert score(swapped, spider, db_copy) == 1.0  # spider allows a column permutation
    assert score(swapped, {**spider, "cmp_method": "bird"}, db_copy) == 0.0
    assert score("no sql here", GOLD, db_copy) == 0.0
