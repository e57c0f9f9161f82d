"""Rows: reading and writing them (jsonl, parquet), their schema, and chat-prompt rendering.

A row has the shape of the official DPH-RL / verl data, so users bring those files unchanged:

    {"id": 0, "data_source": "spider",
     "prompt": [{"role": "user", "content": "..."}],
     "reward_model": {"ground_truth": ...}}

Every write is atomic (a temporary sibling file, then `os.replace`), so a killed run never
leaves a half-written file that a later run would trust; the file gets the mode the user's
umask gives any new file. Appends (`append_jsonl`) are used only for resumable outputs whose
readers drop a torn last line. A write that fails (full disk, read-only folder) is an
`OutputError` naming the path and the remedy, and leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dphrl import hfdatasets
from dphrl.errors import DataError, OutputError

REQUIRED = ("prompt", "reward_model")


def output_error(path: str | os.PathLike, err: OSError) -> OutputError:
    """The named error for a failed write of `path`: what, where, and what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free space on that disk (or point the output elsewhere), then rerun: finished chunks are kept"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        remedy = "the folder is not writable: choose another output folder (split.out, ref.out, trainer.run_dir, eval.out or hydra.run.dir)"
    else:
        remedy = "check the folder and rerun"
    return OutputError(f"cannot write {path}: {err.strerror or err}; {remedy}")


def _file_mode() -> int:
    """The mode `open()` gives a new file under the process's umask (mkstemp gives 0600)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file ends with the usual mode of a new file; an `OSError` (full disk, read-only
    folder) becomes an `OutputError` naming `path`, and the temporary file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows and fsync, for chunked, resumable outputs (readers drop a torn tail)."""
    try:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise output_error(path, err) from err


def rows_sha256(rows: Iterable[dict]) -> str:
    """SHA-256 of rows' content, independent of key order: what a derived file was made from."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = False) -> list[dict]:
    """Read JSON lines; a bad line is a `DataError` naming file and line.

    With `tolerate_torn_tail`, an unterminated last line (a write cut by a kill) is dropped:
    that is how resumable outputs recover.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if tolerate_torn_tail and number == len(lines) and not line.endswith("\n"):
                break
            raise DataError(
                f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line"
            ) from None
    return rows


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read rows from `.jsonl`, `.json` (a list), `.parquet`, or a Hugging Face dataset
    (`hf:<name>[:<config>][@<split>]` or a `save_to_disk` folder, `dphrl.hfdatasets`)."""
    if hfdatasets.is_dataset(path):
        return _plain(hfdatasets.read_dataset_rows(str(path)))
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file; check task.path / task.eval_path")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _plain(pq.read_table(path).to_pylist())
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl, .json or .parquet")


def _plain(rows: list[dict]) -> list[dict]:
    """Parquet (and Arrow-backed datasets) structs with absent fields come back as None
    members; drop those keys."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return [clean(row) for row in rows]


def check_rows(rows: Sequence[dict], source: str) -> list[dict]:
    """Check the official row shape; give each row an `id` when it has none.

    The error names the file and the 1-based row number, and what was expected.
    """
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise DataError(
                f"{source}:{number}: row lacks {', '.join(missing)}; expected "
                '{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": ...}}; '
                + columns_of(row)
            )
        prompt = row["prompt"]
        if isinstance(prompt, str):
            row["prompt"] = [{"role": "user", "content": prompt}]
        elif not (
            isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
        ):
            raise DataError(
                f"{source}:{number}: `prompt` must be a list of chat messages or a string"
            )
        if not isinstance(row["reward_model"], dict) or "ground_truth" not in row["reward_model"]:
            raise DataError(f"{source}:{number}: `reward_model` must hold a `ground_truth`")
        row.setdefault("id", number - 1)
    return list(rows)


def columns_of(row: dict) -> str:
    """`its columns: a, b`: what a row that lacks a field has instead (a dataset's columns)."""
    return "its columns: " + (", ".join(sorted(map(str, row))) or "none")


def limit_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """`task.limit`: keep only the first N prompts."""
    return rows if limit is None else rows[:limit]


def render_prompts(
    tokenizer: Any, messages: Sequence[list[dict]], max_len: int
) -> tuple[list[list[int]], list[int]]:
    """Chat-template each prompt into token ids; drop (never truncate) those over `max_len`.

    Returns the token ids of the kept prompts and their indices into `messages`; the caller
    logs how many were dropped.
    """
    kept_ids, kept_index = [], []
    for i, msgs in enumerate(messages):
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                list(msgs), tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n\n".join(m["content"] for m in msgs) + "\n\n"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len:
            kept_ids.append(list(ids))
            kept_index.append(i)
    return kept_ids, kept_index
