"""`dphrl split`: partition the training prompts by how well the initial policy solves them.

For each prompt, k completions are sampled from the initial policy at `split.temperature`
and verified. The observed pass rate c/k decides the side:

    D_pef = {x : c(x)/k >= threshold}   (default threshold 1.0: all k correct)
    D_exp = every other prompt, including those never solved

Outputs in `split.out`: `pef.jsonl`, `exp.jsonl` (rows with `pass_rate` added),
`samples.jsonl` (every sample with its reward) and `split_stats.json`.

Resumable: prompts are processed in fixed chunks of `split.chunk_size` (chunk j holds prompts
j*size .. (j+1)*size-1) and each chunk's samples are appended at once. A rerun skips the
chunks that are complete and redoes any partial one; sampling seeds depend only on the
global prompt index, so a resumed run writes the same files as an uninterrupted one. The
identity of a split (model, task and data, k, sampling) is kept in `split_state.json`; a rerun
with a different identity on the same folder is an error, never a silent mix.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dphrl.data import check_settings, read_jsonl, write_json, write_jsonl
from dphrl.errors import DataError

log = logging.getLogger(__name__)


def identity(cfg: Any) -> dict:
    """What makes two split runs the same experiment (threshold and limit may change)."""
    return {
        "model": cfg.model.path,
        "task": cfg.task.name,
        "task_path": cfg.task.path,
        "k": cfg.split.k,
        "temperature": cfg.split.temperature,
        "top_p": cfg.split.top_p,
        "max_new_tokens": cfg.model.max_new_tokens,
        "max_prompt_len": cfg.model.max_prompt_len,
        "seed": cfg.seed,
        "chunk_size": cfg.split.chunk_size,
    }


def pass_rates(samples: list[dict]) -> dict[Any, tuple[int, int]]:
    """prompt id -> (correct, total) over `samples`."""
    counts: dict[Any, list[int]] = {}
    for s in samples:
        c = counts.setdefault(s["id"], [0, 0])
        c[0] += int(s["reward"] >= 1.0)
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def _complete_samples(path: Path, k: int) -> list[dict]:
    """Samples of prompts that have all k, from a possibly torn `samples.jsonl`."""
    if not path.exists():
        return []
    samples = read_jsonl(path, tolerate_torn_tail=True)
    per_prompt = Counter(s["id"] for s in samples)
    return [s for s in samples if per_prompt[s["id"]] == k]


def run(cfg: Any, run_dir: Path) -> dict:
    """Sample, verify, and write the split; returns the stats written to split_stats.json."""
    from dphrl.data import append_jsonl
    from dphrl.engine import Sampling, engine_from_config
    from dphrl.models import load_tokenizer, resolve_model_path
    from dphrl.rollout import render_rows, sample_and_score
    from dphrl.tasks import get_task

    out = Path(cfg.split.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(
        out / "split_state.json",
        identity(cfg),
        "a split",
        "use another split.out or delete this one",
    )
    task = get_task(cfg.task.name)
    rows = task.load(cfg.task, "train")
    if not rows:
        raise DataError(f"task {cfg.task.name}: no training prompts to split")

    samples_path = out / "samples.jsonl"
    done = _complete_samples(samples_path, cfg.split.k)
    write_jsonl(samples_path, done)  # drop a torn or partial tail before appending again
    done_ids = {s["id"] for s in done}
    started = time.time()

    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    engine = None
    size = cfg.split.chunk_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    for j, chunk in enumerate(chunks):
        ids, kept = render_rows(tokenizer, chunk, cfg.model.max_prompt_len, "split")
        if all(row["id"] in done_ids for row in kept):
            continue
        engine = engine or engine_from_config(cfg.engine, cfg.model, model_path, seed=cfg.seed)
        base = Sampling(cfg.split.temperature, cfg.split.top_p, cfg.model.max_new_tokens, cfg.seed)
        sampling = base.shifted(j * size, cfg.split.k)  # seeds follow the global prompt index
        scored = sample_and_score(engine, task, cfg.task, ids, kept, cfg.split.k, sampling)
        new = [
            {
                "id": row["id"],
                "sample": i,
                "completion": s.completion.text,
                "reward": s.verdict.reward,
                "answer": s.verdict.answer,
                "error": s.verdict.error,
                "finish_reason": s.completion.finish_reason,
                "response_tokens": len(s.completion.token_ids),
            }
            for row, group in zip(kept, scored)
            for i, s in enumerate(group)
        ]
        append_jsonl(samples_path, [s for s in new if s["id"] not in done_ids])
        done_ids.update(row["id"] for row in kept)
        log.info("split: chunk %d/%d done (%d prompts)", j + 1, len(chunks), len(kept))
    stats = write_split(out, rows, read_jsonl(samples_path), cfg, time.time() - started)
    _print_summary(stats, out)
    return stats


def write_split(out: Path, rows: list[dict], samples: list[dict], cfg: Any, seconds: float) -> dict:
    """Write pef.jsonl / exp.jsonl / split_stats.json from the samples (atomic files)."""
    rates = pass_rates(samples)
    pef, exp = [], []
    for row in rows:
        if row["id"] not in rates:
            continue  # dropped as over-long: counted in the stats
        correct, total = rates[row["id"]]
        rate = correct / total
        (pef if rate >= cfg.split.threshold else exp).append({**row, "pass_rate": rate})
    histogram = Counter(f"{c}/{t}" for c, t in rates.values())
    stats = {
        "prompts": len(rows),
        "dropped_over_long": len(rows) - len(rates),
        "pef": len(pef),
        "exp": len(exp),
        "never_solved": sum(1 for c, _ in rates.values() if c == 0),
        "pass_rate_histogram": dict(
            sorted(histogram.items(), key=lambda kv: int(kv[0].split("/")[0]))
        ),
        "mean_pass_rate": sum(c / t for c, t in rates.values()) / max(len(rates), 1),
        "threshold": cfg.split.threshold,
        "seconds": round(seconds, 2),
        "prompts_per_minute": round(60 * len(rates) / seconds, 2) if seconds > 0 else None,
        "settings": identity(cfg),
    }
    write_jsonl(out / "pef.jsonl", pef)
    write_jsonl(out / "exp.jsonl", exp)
    write_json(out / "split_stats.json", stats)
    return stats


def _print_summary(stats: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"split -> {out}", show_header=True)
    for name in ("prompts", "pef", "exp", "never solved", "mean pass rate"):
        table.add_column(name, justify="right")
    table.add_row(
        str(stats["prompts"]),
        str(stats["pef"]),
        str(stats["exp"]),
        str(stats["never_solved"]),
        f"{stats['mean_pass_rate']:.3f}",
    )
    Console().print(table)
