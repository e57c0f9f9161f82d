"""SQL verification throughput, worker pool vs a single process, and the cost of one endless query.

1. Throughput: 512 realistic minisql completions (from the 100 minisql questions: about half
   the gold query reworded, wrong filters, wrong order or limit, unknown tables or columns,
   syntax errors, answers without a ```sql block, a few heavy joins) are verified by
   `verify_batch` on the warm pool of all cores, and by the same code with every query run in
   the calling process instead (`InProcess` below: same sandbox, no processes). Both run
   alternately, `--rounds` times, after a warm-up that fills the gold cache and starts the
   workers; the best round of each counts. Target: pool / single >= 1.7x on 2 cores.
2. Stall: the same batch with one completion swapped for an endless recursive CTE, under a
   per-query limit of `--limit` seconds, vs the batch without it. Target: <= limit + 10%.

Usage: python benchmarks/verify.py [--rounds 5] [--limit 5]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from dphrl.tasks import get_task
from dphrl.tasks.sql import verify_batch
from dphrl.tasks.sql.sandbox import run_query
from dphrl.tasks.workerpool import Done, cpu_count

N = 512
ENDLESS = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
HEAVY = {  # plausible but expensive mistakes: joins without their join condition
    "shop": "SELECT SUM(quantity) FROM order_items, products WHERE products.category = 'Garden'",
    "school": "SELECT AVG(grade) FROM enrollments, students WHERE students.hometown = 'Lakeside'",
    "library": "SELECT COUNT(DISTINCT loans.member_id) FROM loans, books WHERE books.genre = 'Poetry'",
}


class InProcess:
    """The pool interface, run in the calling process: the single-process baseline."""

    grace_s = 0.0

    def map(self, items, limits) -> list[Done]:
        return [Done("ok", run_query(item)) for item in items]


def mutate(sql: str, rng: random.Random) -> str:
    """A wrong but plausible variant of a gold query."""
    options = [
        lambda s: s.replace("DESC", "ASC") if "DESC" in s else s.replace("ASC", "DESC"),
        lambda s: re.sub(r"\b(\d+)\b", lambda m: str(int(m.group(1)) + 1), s, count=1),
        lambda s: re.sub(r"'([^']+)'", lambda m: "'" + m.group(1).lower() + "'", s, count=1),
        lambda s: s.replace("COUNT(*)", "COUNT(DISTINCT 1)"),
        lambda s: s.replace("LIMIT 1", "LIMIT 3"),
        lambda s: re.sub(r"\bWHERE\b.*?(?=\bGROUP\b|\bORDER\b|$)", "", s, count=1),
    ]
    return rng.choice(options)(sql)


def completions(rows: list[dict], rng: random.Random) -> tuple[list[str], list[dict]]:
    """N completions over the minisql questions, and their ground truths."""
    texts, truths = [], []
    for i in range(N):
        truth = rows[i % len(rows)]["reward_model"]["ground_truth"]
        gold, db = truth["gold_sql"], truth["db_id"].split("/")[0]
        kind = rng.random()
        if kind < 0.45:
            sql = rng.choice([gold, gold + ";", f"SELECT * FROM ({gold})"])
        elif kind < 0.75:
            sql = mutate(gold, rng)
        elif kind < 0.85:
            sql = rng.choice(
                [
                    gold.replace("FROM ", "FROM the_", 1),
                    gold.replace("SELECT", "SELEC", 1),
                    gold + " WHERE",
                ]
            )
        elif kind < 0.95:
            texts.append(f"The answer can be found with this query: {gold}")
            truths.append(truth)
            continue
        else:
            sql = HEAVY[db]
        thought = f"Let me look at the {db} schema. The question needs the columns it mentions, so I filter and aggregate them.\n"
        texts.append(thought + f"```sql\n{sql}\n```\nThis query returns the answer.")
        truths.append(truth)
    return texts, truths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=float, default=5.0, help="per-query limit, seconds")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.report import record, update_section

    # The task's fields that load() reads (TaskConfig's defaults), without importing Hydra.
    cfg = SimpleNamespace(name="minisql", path=None, eval_path=None, db_root=None, limit=None)
    task = get_task("minisql")
    rows = task.load(cfg, "train") + task.load(cfg, "eval")
    texts, truths = completions(rows, random.Random(0))
    root = task.db_root(cfg)

    def run(pool=None, batch=texts, limit=args.limit):
        return verify_batch(batch, truths, db_root=root, timeout_s=limit, pool=pool)

    verdicts = run()  # warm-up: starts the workers, fills the gold cache
    assert run(InProcess()) == verdicts, "pool and single process disagree"
    pool_s, single_s = [], []
    for _ in range(args.rounds):
        pool_s.append(timed(run))
        single_s.append(timed(lambda: run(InProcess())))
    speedup = min(single_s) / min(pool_s)

    stalled = list(texts)
    stalled[N // 2] = f"```sql\n{ENDLESS}\n```"
    without_s = timed(run)
    with_s = timed(lambda: run(batch=stalled))
    over = with_s / args.limit

    outcomes = Counter(v.error or ("correct" if v.reward == 1.0 else "wrong") for v in verdicts)
    mix = ", ".join(f"{name} {n}" for name, n in outcomes.most_common())
    pinned = (
        f" (the run was pinned to {cpu_count()} of {os.cpu_count()} cores)"
        if cpu_count() < (os.cpu_count() or 1)
        else ""
    )
    body = f"""
{N} minisql completions ({mix}), verified by `verify_batch`: on the warm pool of
{cpu_count()} worker processes{pinned} vs the same code with every query run in the calling process (same
sandbox). Best of {args.rounds} alternating rounds each (median in brackets); gold results cached.

| mode | seconds per batch | completions / s |
| --- | --- | --- |
| single process | {min(single_s):.3f} ({statistics.median(single_s):.3f}) | {N / min(single_s):.0f} |
| worker pool | {min(pool_s):.3f} ({statistics.median(pool_s):.3f}) | {N / min(pool_s):.0f} |

Speed-up, pool vs single process: **{speedup:.2f}x** (target >= 1.7x on 2 cores).

One endless recursive CTE in the same batch, per-query limit {args.limit:g} s: the batch takes
{with_s:.2f} s vs {without_s:.2f} s without it, **{over:.3f}x the limit** (target <= 1.10x):
the query is interrupted at its limit inside SQLite while the other workers finish the rest.
"""
    update_section(
        "verify", "SQL verification: worker pool vs single process, one endless query", body
    )
    record({"verify_pool_speedup": speedup, "verify_endless_batch_over_limit": over})
    print(body)


if __name__ == "__main__":
    main()
