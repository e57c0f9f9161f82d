"""SQL task data: official rows from jsonl and parquet, raw BIRD and Spider, the schema prompt,
errors that name file and row, and the embedded minisql task."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dphrl.config import TaskConfig
from dphrl.data import read_jsonl
from dphrl.errors import ConfigError, DataError
from dphrl.tasks import get_task
from dphrl.tasks.sql import minisql
from dphrl.tasks.sql.data import describe_schema, load_sql_rows


@pytest.fixture
def db_root(tmp_path: Path) -> Path:
    """BIRD's layout: <root>/<db_id>/<db_id>.sqlite, with a column name that needs quoting."""
    root = tmp_path / "dev_databases"
    (root / "zoo").mkdir(parents=True)
    conn = sqlite3.connect(root / "zoo" / "zoo.sqlite")
    conn.executescript(
        "CREATE TABLE keeper (keeper_id INTEGER PRIMARY KEY, name TEXT);"
        'CREATE TABLE animal (animal_id INTEGER PRIMARY KEY, species TEXT, "Weight (kg)" REAL,'
        " keeper_id INTEGER REFERENCES keeper(keeper_id));"
        "INSERT INTO keeper VALUES (1, 'Mia'), (2, 'Noor');"
        "INSERT INTO animal VALUES (1, 'Lion', 190.5, 1), (2, 'Zebra', 380.0, 2), (3, 'Lion', 170.0, 2);"
    )
    conn.commit()
    conn.close()
    return root


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_schema_prompt_has_create_tables_and_examples(db_root: Path) -> None:
    schema = describe_schema(str(db_root / "zoo" / "zoo.sqlite"))
    assert "CREATE TABLE animal (" in schema and "CREATE TABLE keeper (" in schema
    assert "species TEXT, -- e.g. 'Lion', 'Zebra'" in schema  # distinct values, quoted
    assert '"Weight (kg)" REAL' in schema
    assert "keeper_id INTEGER REFERENCES keeper(keeper_id)" in schema
    assert schema.count("e.g.") == 3  # name, species, weight: key columns get no examples


def test_raw_bird_and_spider(db_root: Path, tmp_path: Path) -> None:
    bird = tmp_path / "dev.json"
    bird.write_text(
        json.dumps(
            [
                {
                    "question_id": 7,
                    "db_id": "zoo",
                    "question": "How many lions?",
                    "evidence": "lion refers to species = 'Lion'",
                    "SQL": "SELECT COUNT(*) FROM animal WHERE species = 'Lion'",
                }
            ]
        )
    )
    [row] = load_sql_rows(bird, db_root=db_root, data_source="bird", default_cmp="bird")
    content = row["prompt"][0]["content"]
    assert "CREATE TABLE animal" in content and "Question: How many lions?" in content
    assert "Hint: lion refers to species = 'Lion'" in content and "```sql" in content
    assert row["id"] == 7
    assert row["reward_model"]["ground_truth"] == {
        "db_id": "zoo/zoo.sqlite",
        "gold_sql": "SELECT COUNT(*) FROM animal WHERE species = 'Lion'",
        "cmp_method": "bird",
    }

    spider = tmp_path / "train_spider.json"
    spider.write_text(
        json.dumps(
            [{"db_id": "zoo", "question": "Names of keepers?", "query": "SELECT name FROM keeper"}]
        )
    )
    [row] = load_sql_rows(spider, db_root=db_root, data_source="spider", default_cmp="spider")
    assert "Hint:" not in row["prompt"][0]["content"]
    assert row["reward_model"]["ground_truth"]["cmp_method"] == "spider"


def official_rows() -> list[dict]:
    truth = {
        "db_id": "zoo/zoo.sqlite",
        "gold_sql": "SELECT name FROM keeper",
        "cmp_method": "spider",
    }
    return [
        {
            "id": 0,
            "data_source": "spider",
            "prompt": [{"role": "user", "content": "q0"}],
            "reward_model": {"style": "rule", "ground_truth": truth},
        },
        {
            "id": 1,
            "data_source": "spider",
            "prompt": [{"role": "user", "content": "q1"}],
            "reward_model": {"style": "rule", "ground_truth": {**truth, "cmp_method": "bird"}},
        },
    ]


def test_official_rows_from_jsonl_and_parquet(db_root: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in official_rows()))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(official_rows()), parquet)
    text_truth = (
        tmp_path / "text_truth.jsonl"
    )  # verl files sometimes keep the truth as a JSON string
    rows = official_rows()
    rows[0]["reward_model"]["ground_truth"] = json.dumps(rows[0]["reward_model"]["ground_truth"])
    text_truth.write_text("".join(json.dumps(r) + "\n" for r in rows))

    loaded = [
        load_sql_rows(p, db_root=db_root, data_source="spider", default_cmp="spider")
        for p in (jsonl, parquet, text_truth)
    ]
    assert loaded[0] == loaded[1] == loaded[2]
    assert [r["reward_model"]["ground_truth"]["cmp_method"] for r in loaded[0]] == [
        "spider",
        "bird",
    ]
    assert loaded[0][1]["prompt"] == [{"role": "user", "content": "q1"}]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "q", "reward_model": {"ground_truth": {"db_id": "zoo", "gold_sql": "SELECT 1"}}}\n{"prompt": "q", "reward_model": {"ground_truth": {"db_id": "nowhere", "gold_sql": "SELECT 1"}}}\n',
            r"rows\.jsonl:2: database db_id='nowhere' not found",
        ),
        (
            '{"prompt": "q", "reward_model": {"ground_truth": {"db_id": "zoo"}}}\n',
            r"rows\.jsonl:1: the ground truth lacks gold_sql",
        ),
        (
            '{"prompt": "q", "reward_model": {"ground_truth": {"db_id": "zoo", "gold_sql": "SELECT 1", "cmp_method": "exact"}}}\n',
            r"rows\.jsonl:1: cmp_method='exact' is not known",
        ),
        (
            '{"prompt": "q", "reward_model": {"ground_truth": {"db_id": "zoo", "gold_sql": "SELECT 1"}}}\n{"prompt": "q", "reward_m\n',
            r"rows\.jsonl:2: not valid JSON",
        ),
        ('{"question": "q", "db_id": "zoo"}\n', r"rows\.jsonl:1: not a SQL row; expected"),
        (
            '{"question": "q", "db_id": "zoo", "SQL": ""}\n',
            r"rows\.jsonl:1: raw BIRD row lacks SQL",
        ),
        ('{"prompt": "q"}\n', r"rows\.jsonl:1: row lacks reward_model"),
    ],
)
def test_bad_input_names_file_and_row_and_writes_nothing(
    db_root: Path, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    before = files(tmp_path)
    with pytest.raises(DataError, match=message):
        load_sql_rows(path, db_root=db_root, data_source="bird", default_cmp="bird")
    assert files(tmp_path) == before


def test_missing_db_root_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{"db_id": "zoo", "question": "q", "SQL": "SELECT 1"}]))
    with pytest.raises(DataError, match="task.db_root is not set"):
        load_sql_rows(path, db_root=None, data_source="bird", default_cmp="bird")


def test_minisql_loads_80_train_and_20_eval_questions() -> None:
    task = get_task("minisql")
    cfg = TaskConfig(name="minisql")
    train, dev = task.load(cfg, "train"), task.load(cfg, "eval")
    assert (len(train), len(dev)) == (80, 20)
    assert not {r["id"] for r in train} & {r["id"] for r in dev}
    assert {r["reward_model"]["ground_truth"]["db_id"] for r in train} == {
        f"{d}/{d}.sqlite" for d in minisql.DATABASES
    }
    assert len(task.load(TaskConfig(name="minisql", limit=5), "train")) == 5
    with pytest.raises(ConfigError, match="task.path"):
        get_task("bird").load(TaskConfig(name="bird"), "train")


def test_minisql_gold_queries_score_one_and_shipped_rows_match_the_raw_questions() -> None:
    task, cfg = get_task("minisql"), TaskConfig(name="minisql", timeout_s=5.0)
    for split in ("train", "eval"):
        assert read_jsonl(minisql.questions_path(split, "jsonl")) == minisql.render_rows(split)
    rows = task.load(cfg, "train") + task.load(cfg, "eval")
    truths = [r["reward_model"]["ground_truth"] for r in rows]
    verdicts = task.verify([f"```sql\n{t['gold_sql']}\n```" for t in truths], truths, cfg)
    assert [v.reward for v in verdicts] == [1.0] * 100


def test_minisql_build_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in minisql.DATABASES:
        shutil.copy(minisql.HERE / f"{name}.sql", scripts / f"{name}.sql")
    broken = (scripts / "shop.sql").read_text() + "\nINSERT INTO no_such_table VALUES (1);\n"
    (scripts / "shop.sql").write_text(broken)
    monkeypatch.setattr(minisql, "HERE", scripts)
    cache = tmp_path / "cache"
    with pytest.raises(sqlite3.Error):
        minisql.db_root(str(cache))
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []  # nothing half-built is left

    (scripts / "shop.sql").write_text(broken.replace("INSERT INTO no_such_table VALUES (1);", ""))
    root = minisql.db_root(str(cache))
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        f"{d}.sqlite" for d in minisql.DATABASES
    )
    conn = sqlite3.connect(root / "shop" / "shop.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM customers").fetchone() == (400,)
    conn.close()
