"""SQL task data: official DPH-RL rows, raw BIRD and raw Spider, and the schema prompt.

Three input shapes are read, told apart row by row:
- official rows (jsonl or parquet): `reward_model.ground_truth = {db_id, gold_sql, cmp_method}`
  (a JSON string of that object is accepted too, as verl parquet files sometimes store it);
- raw BIRD (`train.json` / `dev.json`): `question`, `evidence`, `SQL`, `db_id`;
- raw Spider (`train_spider.json`, `dev.json`): `question`, `query`, `db_id`.

`db_id` resolves against `task.db_root` as `<root>/<db_id>` when it names a file
(`concert_singer/concert_singer.sqlite`), else as BIRD's and Spider's folders lay databases out:
`<root>/<db_id>/<db_id>.sqlite`. For raw inputs the prompt is written here from the database:
CREATE TABLE statements with a few example values per column, the question (and BIRD's
evidence), and the instruction to answer in a ```sql block. Loading only reads: a bad row or a
missing database is a `DataError` naming the file, the row and what was expected.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dphrl.data import check_rows, columns_of, read_rows
from dphrl.errors import DataError

EXAMPLES = 2  # example values per column in the schema prompt
EXAMPLE_CHARS = 30  # longer example strings are cut
SAMPLE_ROWS = 1000  # example values come from this many leading rows, so big tables stay cheap
CMP_METHODS = ("bird", "spider")
INSTRUCTION = "Answer with one SQLite query in a ```sql code block."
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------------------------
# Databases and the schema prompt
# ---------------------------------------------------------------------------------------------


def db_candidates(db_root: str | Path, db_id: str) -> list[Path]:
    """Where `db_id` may live under `db_root`, in the order tried."""
    root = Path(db_root).expanduser()
    if db_id.endswith((".sqlite", ".db", ".sqlite3")):
        return [root / db_id]
    return [
        root / db_id / f"{db_id}.sqlite",
        root / f"{db_id}.sqlite",
        root / db_id / f"{db_id}.db",
    ]


def resolve_db(db_root: str | Path, db_id: str) -> Path | None:
    """The database file of `db_id`, or None when none of the candidates exists."""
    return next((p for p in db_candidates(db_root, db_id) if p.is_file()), None)


def _ident(name: str) -> str:
    return name if _PLAIN_NAME.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _example(value: Any) -> str:
    if isinstance(value, bytes):
        return "<blob>"
    if isinstance(value, str):
        text = value if len(value) <= EXAMPLE_CHARS else value[:EXAMPLE_CHARS] + "..."
        return "'" + text.replace("'", "''").replace("\n", " ") + "'"
    return repr(value)


@functools.lru_cache(maxsize=256)
def describe_schema(db_path: str, examples: int = EXAMPLES) -> str:
    """CREATE TABLE statements of every table, each column with up to `examples` values."""
    conn = sqlite3.connect(f"file:{quote(str(Path(db_path).resolve()))}?mode=ro", uri=True)
    conn.text_factory = functools.partial(bytes.decode, encoding="utf-8", errors="replace")
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
            )
        ]
        return "\n\n".join(_describe_table(conn, table, examples) for table in tables)
    except sqlite3.Error as err:
        raise DataError(f"{db_path}: cannot read the database schema ({err})") from None
    finally:
        conn.close()


def _describe_table(conn: sqlite3.Connection, table: str, examples: int) -> str:
    t = _ident(table)
    columns = conn.execute(
        f"PRAGMA table_info({t})"
    ).fetchall()  # (cid, name, type, notnull, default, pk)
    references = {
        row[3]: f"{_ident(row[2])}({_ident(row[4] or row[3])})"
        for row in conn.execute(f"PRAGMA foreign_key_list({t})")
    }
    keys = [c[1] for c in sorted(columns, key=lambda c: c[5]) if c[5]]
    items = []  # (definition, comment)
    for _, name, type_, _, _, pk in columns:
        c = _ident(name)
        parts = [c, type_] if type_ else [c]
        if pk and len(keys) == 1:
            parts.append("PRIMARY KEY")
        if name in references:
            parts.append(f"REFERENCES {references[name]}")
        # Key columns hold ids, whose values tell a model nothing: no examples, fewer tokens.
        is_key = (pk and len(keys) == 1) or name in references
        values = (
            []
            if is_key
            else conn.execute(
                f"SELECT DISTINCT {c} FROM (SELECT {c} FROM {t} LIMIT {SAMPLE_ROWS}) WHERE {c} IS NOT NULL LIMIT {examples}"
            ).fetchall()
        )
        items.append(
            (
                " ".join(parts),
                f" -- e.g. {', '.join(_example(v) for (v,) in values)}" if values else "",
            )
        )
    if len(keys) > 1:
        items.append((f"PRIMARY KEY ({', '.join(_ident(k) for k in keys)})", ""))
    lines = [
        f"  {text}{',' if i < len(items) - 1 else ''}{comment}"
        for i, (text, comment) in enumerate(items)
    ]
    return f"CREATE TABLE {t} (\n" + "\n".join(lines) + "\n);"


def schema_prompt(db_path: str | Path, question: str, evidence: str | None = None) -> str:
    """The user message for one question: schema with examples, question, hint, instruction."""
    parts = [
        f"Database schema (SQLite):\n\n{describe_schema(str(db_path))}",
        f"Question: {question.strip()}",
    ]
    if evidence and evidence.strip():
        parts.append(f"Hint: {evidence.strip()}")
    parts.append(INSTRUCTION)
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def parse_ground_truth(truth: Any, where: str, default_cmp: str) -> dict:
    """`{db_id, gold_sql, cmp_method}` from a ground truth (a dict or its JSON string)."""
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except json.JSONDecodeError:
            truth = None
    if not isinstance(truth, dict):
        raise DataError(
            f"{where}: the SQL ground truth must be an object {{db_id, gold_sql, cmp_method}}, got {truth!r:.80}"
        )
    missing = [
        k
        for k in ("db_id", "gold_sql")
        if not isinstance(truth.get(k), str) or not truth[k].strip()
    ]
    if missing:
        raise DataError(
            f"{where}: the ground truth lacks {', '.join(missing)}; expected {{db_id, gold_sql, cmp_method}}"
        )
    cmp_method = truth.get("cmp_method") or default_cmp
    if cmp_method not in CMP_METHODS:
        raise DataError(
            f"{where}: cmp_method={cmp_method!r} is not known; use one of {', '.join(CMP_METHODS)}"
        )
    return {"db_id": truth["db_id"], "gold_sql": truth["gold_sql"], "cmp_method": cmp_method}


def _shape(row: Any) -> str:
    if isinstance(row, dict):
        if "reward_model" in row or "prompt" in row:
            return "official"
        if "SQL" in row:
            return "bird"
        if "query" in row:
            return "spider"
    return "unknown"


def _raw_row(
    row: dict,
    shape: str,
    where: str,
    number: int,
    db_root: Path,
    data_source: str,
    default_cmp: str,
) -> dict:
    sql_key = "SQL" if shape == "bird" else "query"
    missing = [
        k
        for k in ("question", "db_id", sql_key)
        if not isinstance(row.get(k), str) or not row[k].strip()
    ]
    if missing:
        raise DataError(
            f"{where}: raw {shape.upper()} row lacks {', '.join(missing)}; expected question, "
            f"db_id, {sql_key}; {columns_of(row)}"
        )
    db_path = _existing_db(db_root, row["db_id"], where)
    evidence = row.get("evidence") if shape == "bird" else None
    truth = {
        "db_id": db_path.relative_to(db_root).as_posix(),
        "gold_sql": row[sql_key],
        "cmp_method": default_cmp,
    }
    return {
        "id": row.get("question_id", number - 1),
        "data_source": data_source,
        "prompt": [{"role": "user", "content": schema_prompt(db_path, row["question"], evidence)}],
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"question": row["question"], "evidence": evidence or ""},
    }


def _existing_db(db_root: Path, db_id: str, where: str) -> Path:
    path = resolve_db(db_root, db_id)
    if path is None:
        tried = ", ".join(str(p) for p in db_candidates(db_root, db_id))
        raise DataError(
            f"{where}: database db_id={db_id!r} not found (tried {tried}); set task.db_root to the folder that holds it"
        )
    return path


def load_sql_rows(
    path: str | Path,
    *,
    db_root: str | Path | None,
    data_source: str,
    default_cmp: str,
    limit: int | None = None,
) -> list[dict]:
    """Rows in the official shape from any of the three inputs, the first `limit` of them.

    Every row's database must exist under `db_root`; a raw row gets its prompt from it.
    """
    raw = read_rows(path)
    raw = raw if limit is None else raw[:limit]
    if db_root is None:
        raise DataError(
            f"{path}: task.db_root is not set; point it at the folder holding <db_id>/<db_id>.sqlite"
        )
    root = Path(db_root).expanduser()
    shapes = [_shape(row) for row in raw]
    if "unknown" in shapes:
        first = shapes.index("unknown")
        raise DataError(
            f"{path}:{first + 1}: not a SQL row; expected an official row (prompt, "
            "reward_model.ground_truth), raw BIRD (question, evidence, SQL, db_id) or raw Spider "
            "(question, query, db_id); "
            + (columns_of(raw[first]) if isinstance(raw[first], dict) else "not an object")
        )
    if "official" not in shapes:
        return [
            _raw_row(row, shape, f"{path}:{n}", n, root, data_source, default_cmp)
            for n, (row, shape) in enumerate(zip(raw, shapes, strict=True), start=1)
        ]
    if set(shapes) != {"official"}:
        raise DataError(
            f"{path}: mixes official rows with raw BIRD/Spider rows; keep one shape per file"
        )
    rows = check_rows(raw, str(path))
    for number, row in enumerate(rows, start=1):
        where = f"{path}:{number}"
        truth = parse_ground_truth(row["reward_model"]["ground_truth"], where, default_cmp)
        _existing_db(root, truth["db_id"], where)
        row["reward_model"] = {**row["reward_model"], "ground_truth": truth}
        row.setdefault("data_source", data_source)
    return rows
