"""Extraction, the bird and spider comparison rules (where they disagree), partial credit, and
the answer key, as pure functions and through `verify_batch` on a real database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dphrl.config import TaskConfig
from dphrl.errors import VerifyError
from dphrl.tasks import get_task
from dphrl.tasks.sql import (
    bird_equal,
    column_credit,
    extract_sql,
    result_key,
    spider_equal,
    verify_batch,
)
from dphrl.tasks.sql.sandbox import GOLD_CACHE


def test_extract_takes_the_last_closed_sql_block() -> None:
    text = "First try:\n```sql\nSELECT 1\n```\nBetter:\n```SQL\nSELECT 2;\n```\n```sql\nSELECT 3"
    assert extract_sql(text) == "SELECT 2;"
    assert extract_sql("```sql SELECT 4```") == "SELECT 4"
    assert extract_sql("```python\nprint(1)\n```") is None
    assert extract_sql("```sql\n   \n```") is None
    assert extract_sql("SELECT 1") is None


@pytest.mark.parametrize(
    ("pred", "gold", "gold_sql", "bird", "spider"),
    [
        # duplicates: a set ignores them, a multiset does not
        ([(1,), (1,)], [(1,)], "SELECT x FROM t", True, False),
        # column order: bird compares tuples, spider allows a permutation
        ([("a", 1), ("b", 2)], [(1, "a"), (2, "b")], "SELECT n, s FROM t", False, True),
        # row order under ORDER BY: only spider respects it
        ([(2,), (1,)], [(1,), (2,)], "SELECT x FROM t ORDER BY x", True, False),
        # row order without ORDER BY: neither cares
        ([(2,), (1,)], [(1,), (2,)], "SELECT x FROM t", True, True),
        # both agree on a wrong value and on empty results
        ([(1,), (3,)], [(1,), (2,)], "SELECT x FROM t", False, False),
        ([], [], "SELECT x FROM t", True, True),
        ([], [(1,)], "SELECT x FROM t", False, False),
        # spider: a permutation must hold row-wise, not column by column
        ([(1, 2), (2, 1)], [(1, 1), (2, 2)], "SELECT a, b FROM t", False, False),
    ],
)
def test_bird_and_spider_rules(pred, gold, gold_sql, bird, spider) -> None:
    assert bird_equal(pred, gold, gold_sql) is bird
    assert spider_equal(pred, gold, gold_sql) is spider


def test_spider_permuted_and_ordered() -> None:
    gold = [(1, "a", 10), (2, "b", 20)]
    pred = [(10, 1, "a"), (20, 2, "b")]
    assert spider_equal(pred, gold, "SELECT id, s, v FROM t ORDER BY id")
    assert not spider_equal(pred[::-1], gold, "SELECT id, s, v FROM t ORDER BY id")


def test_partial_credit_counts_matching_columns() -> None:
    gold = [("Ann", 1), ("Bob", 2)]
    assert column_credit([("Ann",), ("Bob",)], gold) == pytest.approx(0.4)  # 1 of 2 gold columns
    assert column_credit([("Bob", 2, "x"), ("Ann", 1, "y")], gold) == pytest.approx(0.8 * 2 / 3)
    assert column_credit([("Cid",), ("Dan",)], gold) == 0.0
    assert column_credit([], gold) == 0.0


def test_result_key_is_canonical_under_each_rule() -> None:
    rows = [(1, "a"), (2, "b")]
    assert result_key(rows, "bird") == result_key(rows[::-1] + rows[:1], "bird")
    assert result_key(rows, "spider") == result_key([(s, n) for n, s in rows], "spider")
    assert result_key(rows, "spider") != result_key(rows + rows[:1], "spider")
    assert result_key([(1.0,)], "bird") == result_key([(1,)], "bird")
    assert result_key(rows, "spider", "SELECT * FROM t ORDER BY 1") != result_key(
        rows[::-1], "spider", "SELECT * FROM t ORDER BY 1"
    )
    assert result_key(rows, "bird") != result_key([(1, "a")], "bird")


@pytest.fixture(scope="module")
def people_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("people")
    (root / "people").mkdir()
    conn = sqlite3.connect(root / "people" / "people.sqlite")
    conn.executescript(
        "CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER);"
        "INSERT INTO person VALUES (1, 'Ann', 'Oslo', 30), (2, 'Bob', 'Oslo', 25), (3, 'Cid', 'Rome', 41);"
    )
    conn.commit()
    conn.close()
    return root


def truth(gold_sql: str, cmp_method: str) -> dict:
    return {"db_id": "people", "gold_sql": gold_sql, "cmp_method": cmp_method}


def block(sql: str) -> str:
    return f"```sql\n{sql}\n```"


def test_rules_through_real_queries(people_root: Path) -> None:
    cases = [
        # (completion SQL, gold SQL, bird reward, spider reward)
        ("SELECT city FROM person", "SELECT DISTINCT city FROM person", 1.0, 0.0),
        ("SELECT age, name FROM person", "SELECT name, age FROM person", 0.0, 1.0),
        (
            "SELECT name FROM person ORDER BY age DESC",
            "SELECT name FROM person ORDER BY age",
            1.0,
            0.0,
        ),
        ("SELECT name FROM person ORDER BY age", "SELECT name FROM person ORDER BY age", 1.0, 1.0),
    ]
    for method, column in (("bird", 2), ("spider", 3)):
        completions = [block(c[0]) for c in cases]
        truths = [truth(c[1], method) for c in cases]
        rewards = [v.reward for v in verify_batch(completions, truths, db_root=people_root)]
        assert rewards == [c[column] for c in cases], method


def test_cmp_method_override_and_partial_credit(people_root: Path) -> None:
    gold = truth("SELECT name, age FROM person", "spider")
    swapped = block("SELECT age, name FROM person")
    assert verify_batch([swapped], [gold], db_root=people_root)[0].reward == 1.0
    assert verify_batch([swapped], [gold], db_root=people_root, cmp_method="bird")[0].reward == 0.0
    names_only = block("SELECT name FROM person")
    exact = verify_batch([names_only], [gold], db_root=people_root)[0]
    partial = verify_batch([names_only], [gold], db_root=people_root, partial_credit=True)[0]
    assert (exact.reward, partial.reward) == (0.0, pytest.approx(0.4))


def test_verdicts_name_errors_and_answers(people_root: Path) -> None:
    gold = truth("SELECT COUNT(*) FROM person WHERE city = 'Oslo'", "bird")
    completions = [
        block("SELECT COUNT(*) FROM person WHERE city = 'Oslo'"),
        "```sql\nSELECT COUNT(id) FROM person WHERE city = 'Oslo';\n```",
        block("SELECT COUNT(*) FROM person"),
        "I do not know.",
        block("SELECT * FROM nowhere"),
        block("DROP TABLE person"),
    ]
    verdicts = verify_batch(completions, [gold] * len(completions), db_root=people_root)
    assert [v.reward for v in verdicts] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [v.error for v in verdicts] == [None, None, None, "no_sql", "syntax", "denied"]
    assert verdicts[0].answer == verdicts[1].answer != verdicts[2].answer
    assert verdicts[3].answer is None


def test_gold_results_are_cached_and_a_broken_gold_is_named(people_root: Path) -> None:
    gold_sql = "SELECT name FROM person WHERE age > 26"
    verify_batch([block(gold_sql)], [truth(gold_sql, "bird")], db_root=people_root)
    key = GOLD_CACHE.key(str(people_root / "people" / "people.sqlite"), gold_sql)
    assert GOLD_CACHE.get(key) == [("Ann",), ("Cid",)]
    broken = verify_batch(
        [block(gold_sql)], [truth("SELECT nope FROM person", "bird")], db_root=people_root
    )[0]
    assert (broken.reward, broken.error) == (0.0, "gold_error")


def test_verification_that_cannot_run_raises(people_root: Path) -> None:
    with pytest.raises(VerifyError, match="db_id='nowhere'"):
        verify_batch(
            [block("SELECT 1")], [{"db_id": "nowhere", "gold_sql": "SELECT 1"}], db_root=people_root
        )
    with pytest.raises(VerifyError, match="lacks gold_sql"):
        verify_batch([block("SELECT 1")], [{"db_id": "people"}], db_root=people_root)
    with pytest.raises(VerifyError, match="task.db_root is not set"):
        get_task("bird").verify(
            [block("SELECT 1")], [truth("SELECT 1", "bird")], TaskConfig(name="bird")
        )
