"""The embedded `minisql` task: three small SQLite databases built from this package's own
SQL scripts on first use, and 100 question / gold-SQL pairs over them.

The questions ship twice, as the two input formats dphrl reads: raw BIRD (`train.json`,
`dev.json`: question, evidence, SQL, db_id, difficulty) and the official DPH-RL row format
(`train.jsonl`, `dev.jsonl`), whose prompts are the BIRD questions rendered by
`dphrl.tasks.sql.data` from the built databases; a test checks that the two agree.
`train` has 80 questions, `dev` (the held-out eval split) 20.

Databases are built into `<cache>/minisql/<hash of the scripts>/<db>/<db>.sqlite`, the layout of
BIRD's and Spider's database folders, so `db_id` resolves the same way for all SQL tasks. Each
file is built in a temporary sibling and renamed into place when complete, so a killed build
leaves nothing a later run trusts; changed scripts build into a new folder.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from pathlib import Path

from dphrl.models import cache_root

DATABASES = ("shop", "school", "library")
SPLITS = {"train": "train", "eval": "dev"}
HERE = Path(__file__).resolve().parent


def scripts_digest() -> str:
    """A short hash of the SQL scripts: the cache folder's name, so edits rebuild."""
    digest = hashlib.sha256()
    for name in DATABASES:
        digest.update((HERE / f"{name}.sql").read_bytes())
    return digest.hexdigest()[:12]


def db_root(cache_dir: str | None = None) -> Path:
    """The folder holding the built databases (built now if missing)."""
    root = cache_root(cache_dir) / "minisql" / scripts_digest()
    for name in DATABASES:
        target = root / name / f"{name}.sqlite"
        if not target.exists():
            build(name, target)
    return root


def build(name: str, target: Path) -> None:
    """Run `<name>.sql` into a temporary file beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript((HERE / f"{name}.sql").read_text(encoding="utf-8"))
            conn.execute("VACUUM")
        finally:
            conn.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def questions_path(split: str, fmt: str) -> Path:
    """The shipped questions of a split ("train" | "eval") as "json" (raw BIRD) or "jsonl" (rows)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return HERE / f"{SPLITS[split]}.{fmt}"


def render_rows(split: str, cache_dir: str | None = None) -> list[dict]:
    """The official rows of a split, rendered from its raw BIRD questions and the databases.

    The shipped `<split>.jsonl` files are this function's output; regenerate them after editing
    the questions or the scripts with
    `python -c "from dphrl.tasks.sql import minisql; minisql.write_rows()"`.
    """
    from dphrl.tasks.sql.data import load_sql_rows

    return load_sql_rows(
        questions_path(split, "json"),
        db_root=db_root(cache_dir),
        data_source="minisql",
        default_cmp="bird",
    )


def write_rows() -> None:
    """Rewrite the shipped `train.jsonl` and `dev.jsonl` from `train.json` and `dev.json`."""
    from dphrl.data import write_jsonl

    for split in SPLITS:
        write_jsonl(questions_path(split, "jsonl"), render_rows(split))
