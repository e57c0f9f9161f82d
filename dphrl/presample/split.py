"""Partition training prompts into D_pef / D_exp by k samples of the initial policy.

For each prompt, k completions are sampled at `split.temperature` and verified. The
observed pass rate c/k decides the side:

    D_pef = {x : c(x)/k >= threshold}   (default threshold 1.0: all k correct)
    D_exp = every other prompt, including those never solved

Outputs in `split.out`: `pef.jsonl`, `exp.jsonl` (rows with `pass_rate` added),
`samples.jsonl` (every sample with its reward) and `split_stats.json`. Resumable through
`dphrl.chunks`: chunks of `split.chunk_size` prompts, each appended to samples.jsonl at once,
seeds following the global prompt index. The identity of a split (model, task and data, k,
sampling) is kept in `split_state.json`; `threshold` and `task.limit` may change on a rerun.

Used by `dphrl split` and by `dphrl train` (through `dphrl.presample.inputs`) when no split exists.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from dphrl import dist
from dphrl.chunks import Chunk, SampleLog, Settings, run_chunks
from dphrl.config import EngineConfig, ModelConfig, SplitConfig, TaskConfig
from dphrl.data import write_json, write_jsonl
from dphrl.errors import DataError
from dphrl.passk import pass_rates

log = logging.getLogger(__name__)
SETTINGS = "split_state.json"


def identity(split: SplitConfig, task: TaskConfig, model: ModelConfig, seed: int) -> dict:
    """What makes two split runs the same experiment (threshold and limit may change)."""
    return {
        "model": model.path,
        "task": task.name,
        "task_path": task.path,
        "k": split.k,
        "temperature": split.temperature,
        "top_p": split.top_p,
        "max_new_tokens": model.max_new_tokens,
        "max_prompt_len": model.max_prompt_len,
        "seed": seed,
        "chunk_size": split.chunk_size,
    }


def build_split(
    split: SplitConfig,
    task_cfg: TaskConfig,
    model: ModelConfig,
    engine_cfg: EngineConfig,
    device: str,
    seed: int,
) -> dict:
    """Sample, verify and write the split in `split.out` (finishing a killed one); return its stats.

    The caller holds the folder's lock (`dphrl.lock.ranks_lock`); under torchrun every rank
    calls this, samples its turns of the chunks, and rank 0 writes.
    """
    from dphrl.embedded import resolve_model_path
    from dphrl.engine import Sampling, engine_from_config
    from dphrl.models import load_tokenizer
    from dphrl.rollout import render_rows, sample_and_score
    from dphrl.tasks import get_task

    out = Path(split.out)
    settings = Settings(
        out / SETTINGS,
        identity(split, task_cfg, model, seed),
        "a split",
        "use another split.out or delete this one (a differing seed: set split.seed to the folder's)",
    )
    settings.check()
    task = get_task(task_cfg.name)
    rows = task.load(task_cfg, "train")
    if not rows:
        raise DataError(f"task {task_cfg.name}: no training prompts to split")
    model_path = resolve_model_path(model.path, model.cache_dir)
    tokenizer = load_tokenizer(model_path)

    samples = SampleLog(out / "samples.jsonl", key=lambda s: s["id"], per_key=split.k)
    done_ids = samples.recover()
    started = time.time()
    size = split.chunk_size
    rendered = [
        render_rows(tokenizer, rows[i : i + size], model.max_prompt_len, "split")
        for i in range(0, len(rows), size)
    ]
    engine = None
    base = Sampling(split.temperature, split.top_p, model.max_new_tokens, seed)

    def start() -> None:  # every rank, when a chunk is to do (vLLM's start-up is collective)
        nonlocal engine
        engine = engine_from_config(engine_cfg, model, model_path, device, seed)

    def compute(c: Chunk) -> list[dict]:
        ids, kept = rendered[c.index]
        sampling = base.shifted(c.start, split.k)  # seeds follow the global prompt index
        scored = sample_and_score(engine, task, task_cfg, ids, kept, split.k, sampling)
        log.info("split: chunk %d/%d done (%d prompts)", c.index + 1, len(rendered), len(kept))
        return [
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
            if row["id"] not in done_ids
        ]

    try:
        run_chunks(
            len(rows),
            size,
            settings,
            done=lambda c: all(row["id"] in done_ids for row in rendered[c.index][1]),
            compute=compute,
            write=lambda c, new: samples.append(new),
            label=f"split: {split.k} samples per prompt",
            start=start,
        )
    finally:
        if engine is not None:
            engine.close()
    settings.record()  # every chunk was already done (prompts all over-long, or a rerun)
    stats = None
    if dist.is_main():  # rank 0 writes; every rank returns its stats
        stats = write_split(
            out, rows, samples.read(), split, settings.expected, time.time() - started
        )
    return dist.broadcast_object(stats)


def write_split(
    out: Path,
    rows: list[dict],
    samples: list[dict],
    split: SplitConfig,
    settings: dict,
    seconds: float,
) -> dict:
    """Write pef.jsonl / exp.jsonl / split_stats.json from the samples (atomic files)."""
    rates = pass_rates(samples)
    pef, exp = [], []
    for row in rows:
        if row["id"] not in rates:
            continue  # dropped as over-long: counted in the stats
        correct, total = rates[row["id"]]
        rate = correct / total
        (pef if rate >= split.threshold else exp).append({**row, "pass_rate": rate})
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
        "threshold": split.threshold,
        "seconds": round(seconds, 2),
        "prompts_per_minute": round(60 * len(rates) / seconds, 2) if seconds > 0 else None,
        "settings": settings,
    }
    write_jsonl(out / "pef.jsonl", pef)
    write_jsonl(out / "exp.jsonl", exp)
    write_json(out / "split_stats.json", stats)
    return stats
