"""`dphrl eval-passk`: n samples per prompt, the unbiased pass@k estimator, diversity, reports.

For every model in `eval.models` and every dataset in `eval.datasets` (one command compares a
base model with its checkpoint, in-domain and out-of-domain), each prompt gets `eval.n`
samples at `eval.temperature` / `eval.top_p` (and, with `eval.greedy`, one temperature-0
sample), the task's verifier scores them, and the run folder receives

- `samples.jsonl`: every completion with its reward (also the resume state);
- `passk.json`: pass@k per model, dataset and k, with each prompt's n and c;
- `passk.md` / `passk.png`: a table and the pass@k curves (`dphrl.passk`).

A sample counts as correct when its reward is 1 (partial SQL credit is not a pass).

Resume: samples are appended one chunk of prompts at a time; a restarted eval on the same run
folder keeps the prompts whose samples are all there, drops a torn tail, and redoes the rest.
Seeds follow each prompt's position in its dataset (`Sampling.shifted`) and chunks have fixed
boundaries, so a resumed eval writes the same `passk.json` as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dphrl.chunks import Chunk, SampleLog, Settings, run_chunks
from dphrl.config import DphrlConfig, TaskConfig
from dphrl.passk import mean, pass_at_k, prompt_stats

if TYPE_CHECKING:
    from dphrl.rollout import Scored
    from dphrl.tasks import Task

log = logging.getLogger(__name__)

CHUNK_PROMPTS = 32  # prompts per engine call and per append to samples.jsonl


def summarize(samples: list[dict], datasets: list[dict], ks: list[int], greedy: bool) -> list[dict]:
    """passk.json's `results`: one entry per (model, dataset) of `datasets`, from the samples.

    `datasets` lists {"model", "dataset", "ids" (kept prompt ids, in order), "dropped"}.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in samples:
        groups[s["model"], s["dataset"], s["id"]].append(s)
    results = []
    for d in datasets:
        per_prompt = []
        for pid in d["ids"]:
            rows = groups[d["model"], d["dataset"], pid]
            stats = {"id": pid, **prompt_stats(rows)}
            if greedy:
                stats["greedy_correct"] = any(s["correct"] for s in rows if s["greedy"])
            per_prompt.append(stats)
        results.append(
            {
                "model": d["model"],
                "dataset": d["dataset"],
                "prompts": len(per_prompt),
                "dropped": d["dropped"],
                "pass_at_k": {
                    str(k): mean([pass_at_k(p["n"], p["c"], k) for p in per_prompt]) for k in ks
                },
                "greedy": mean([float(p["greedy_correct"]) for p in per_prompt])
                if greedy
                else None,
                "distinct_correct_answers": mean(
                    [p["distinct_correct_answers"] for p in per_prompt]
                ),
                "distinct_correct_texts": mean([p["distinct_correct_texts"] for p in per_prompt]),
                "entropy": mean([p["entropy"] for p in per_prompt]),
                "per_prompt": per_prompt,
            }
        )
    return results


def settings(cfg: DphrlConfig, engine: str) -> dict:
    """What makes two evals the same experiment; a resumed run must match it, except in
    `models`: a model added to the list is evaluated alone, the ones done are kept."""
    ev = cfg.eval
    return {
        "models": model_labels(cfg),
        "datasets": dataset_specs(cfg),
        "engine": engine,
        "n": ev.n,
        "k": list(ev.k),
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "greedy": ev.greedy,
        "limit": ev.limit,
        "task_limit": cfg.task.limit,
        "max_new_tokens": cfg.model.max_new_tokens,
        "max_prompt_len": cfg.model.max_prompt_len,
        "seed": cfg.seed,
    }


def model_labels(cfg: DphrlConfig) -> list[str]:
    """`eval.models`, else the configured `model.path`."""
    return list(cfg.eval.models) or [cfg.model.path]


def dataset_specs(cfg: DphrlConfig) -> list[str]:
    """`eval.datasets` entries (`name` or `name=eval rows file`), else the configured task."""
    return list(cfg.eval.datasets) or [cfg.task.name]


def task_config(
    task_cfg: TaskConfig, spec: str, db_roots: dict[str, str] | None = None
) -> TaskConfig:
    """The task config for one `eval.datasets` entry: the configured task's, with the name
    and, when the entry gives one (`spider=dev.json`), the eval rows file replaced. A SQL
    dataset other than the configured task takes its databases from `eval.db_roots[name]`
    (BIRD dev and Spider dev live in different folders)."""
    name, _, path = spec.partition("=")
    roots = db_roots or {}
    if name == task_cfg.name and not path and name not in roots:
        return task_cfg
    db_root = roots.get(name, task_cfg.db_root if name == task_cfg.name else None)
    return replace(task_cfg, name=name, path=None, eval_path=path or None, db_root=db_root)


def run(cfg: DphrlConfig, run_dir: Path) -> dict:
    """Evaluate every model on every dataset; write samples, passk.json/.md/.png; return the json."""
    from dphrl.lock import ranks_lock
    from dphrl.presample.inputs import sampling_ranks

    out = Path(cfg.eval.out) if cfg.eval.out else Path(run_dir)
    with sampling_ranks(cfg.layout), ranks_lock(out, "dphrl eval-passk"):
        return _evaluate_all(cfg, out)  # under torchrun: every rank samples, rank 0 writes


def _evaluate_all(cfg: DphrlConfig, out: Path) -> dict:
    from dphrl import dist
    from dphrl.data import write_json
    from dphrl.engine import resolve_engine_name
    from dphrl.models import load_tokenizer
    from dphrl.passk import plot_curves, write_markdown
    from dphrl.presample.inputs import sampling_device
    from dphrl.rollout import render_rows
    from dphrl.tasks import get_task

    engine_name = resolve_engine_name(cfg.engine.name)
    info = settings(cfg, engine_name)
    folder = Settings(
        out / "passk_settings.json",
        info,
        "an eval",
        "use another run folder (hydra.run.dir=...) or delete this one",
        free=("models",),
    )
    folder.check()
    samples = SampleLog(
        out / "samples.jsonl",
        key=lambda s: (s["model"], s["dataset"], s["id"]),
        per_key=cfg.eval.n + int(cfg.eval.greedy),
    )
    done_keys = samples.recover()
    log.info(
        "eval-passk: engine %s; %d prompts already done in %s", engine_name, len(done_keys), out
    )
    device = sampling_device(cfg.layout)
    datasets = []
    for label in model_labels(cfg):
        model_path = _model_path(label, cfg.model.cache_dir, out)
        tokenizer = load_tokenizer(model_path)
        evaluator = _Evaluator(cfg, model_path, device, samples, folder)
        for spec in dataset_specs(cfg):
            task_cfg = task_config(cfg.task, spec, cfg.eval.db_roots)
            task = get_task(task_cfg.name)
            rows = task.load(task_cfg, "eval")
            if cfg.eval.limit is not None:
                rows = rows[: cfg.eval.limit]
            ids, kept = render_rows(tokenizer, rows, cfg.model.max_prompt_len, f"eval-passk {spec}")
            todo = [(label, spec, row["id"]) not in done_keys for row in kept]
            evaluator.evaluate(task, task_cfg, ids, kept, todo, label, spec)
            datasets.append(
                {
                    "model": label,
                    "dataset": spec,
                    "ids": [r["id"] for r in kept],
                    "dropped": len(rows) - len(kept),
                }
            )
        evaluator.close()

    folder.record()
    if not dist.is_main():  # rank 0 writes the report; every rank returns it
        return dist.broadcast_object(None)
    results = summarize(samples.read(), datasets, list(cfg.eval.k), cfg.eval.greedy)
    payload = {"settings": info, "results": results}
    write_json(out / "passk.json", payload)
    write_markdown(out / "passk.md", payload)
    plot_curves(out / "passk.png", payload)
    log.info("eval-passk: wrote %s\n%s", out / "passk.json", (out / "passk.md").read_text())
    return dist.broadcast_object(payload)


def _model_path(label: str, cache_dir: str | None, out: Path) -> str:
    """A model folder the engine loads: `label` resolved, or for a LoRA adapter folder (what
    `train` writes to `<run>/adapter` with model.lora.r > 0) its base with the adapter merged,
    made once under `out/merged`."""
    from dphrl.embedded import resolve_model_path
    from dphrl.training.lora import base_of, is_adapter, merged_model_dir

    if not is_adapter(label):
        return resolve_model_path(label, cache_dir)
    base = resolve_model_path(base_of(label), cache_dir)
    return str(merged_model_dir(label, base, out / "merged"))


class _Evaluator:
    """Samples, verifies and appends one model's chunks; starts its engine only when needed
    (`start`), and frees it (`close`) before the next model's starts."""

    def __init__(
        self,
        cfg: DphrlConfig,
        model_path: str,
        device: str,
        samples: SampleLog,
        folder: Settings,
    ) -> None:
        from dphrl.engine import Sampling

        self.engine_cfg, self.model, self.seed, self.n = cfg.engine, cfg.model, cfg.seed, cfg.eval.n
        self.model_path, self.device, self.samples, self.folder = (
            model_path,
            device,
            samples,
            folder,
        )
        ev = cfg.eval
        self.sampling = Sampling(ev.temperature, ev.top_p, cfg.model.max_new_tokens, cfg.seed)
        self.greedy = Sampling(0.0, 1.0, cfg.model.max_new_tokens, cfg.seed) if ev.greedy else None
        self.engine = None

    def evaluate(
        self,
        task: Task,
        task_cfg: TaskConfig,
        ids: list[list[int]],
        rows: list[dict],
        todo: list[bool],
        label: str,
        spec: str,
    ) -> None:
        """Run every chunk of this dataset that holds a prompt still to do."""

        def done(c: Chunk) -> bool:
            return not any(todo[c.start : c.stop])

        def compute(c: Chunk) -> list[dict]:
            scored = self.sample(
                task, task_cfg, ids[c.start : c.stop], rows[c.start : c.stop], c.start
            )
            return [
                _sample_row(label, spec, row["id"], j, s, is_greedy=j == self.n)
                for row, group, keep in zip(
                    rows[c.start : c.stop], scored, todo[c.start : c.stop], strict=True
                )
                if keep
                for j, s in enumerate(group)
            ]

        run_chunks(
            len(rows),
            CHUNK_PROMPTS,
            self.folder,
            done,
            compute,
            lambda c, new: self.samples.append(new),
            label=f"eval-passk: {label} on {spec}",
            start=self.start,
        )

    def start(self) -> None:
        """This model's engine, once (every rank: vLLM's start-up under torchrun is collective)."""
        from dphrl.engine import engine_from_config

        if self.engine is None:
            self.engine = engine_from_config(
                self.engine_cfg, self.model, self.model_path, self.device, self.seed
            )

    def sample(
        self, task: Task, task_cfg: TaskConfig, ids: list[list[int]], rows: list[dict], start: int
    ) -> list[list[Scored]]:
        """n samples (+ the greedy one) of each prompt of a chunk starting at prompt `start`, scored."""
        from dphrl.rollout import score_outputs

        # The whole chunk is regenerated even when part of it is done, so that every prompt
        # sees the same batch as in an uninterrupted run.
        outputs = self.engine.generate(ids, self.n, self.sampling.shifted(start, self.n))
        greedy = self.engine.generate(ids, 1, self.greedy) if self.greedy else [[] for _ in ids]
        return score_outputs(
            task, task_cfg, rows, [o + g for o, g in zip(outputs, greedy, strict=True)]
        )

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _sample_row(
    model: str, dataset: str, pid: Any, j: int, scored: Scored, is_greedy: bool
) -> dict:
    c, v = scored.completion, scored.verdict
    return {
        "model": model,
        "dataset": dataset,
        "id": pid,
        "sample": 0 if is_greedy else j,
        "greedy": is_greedy,
        "completion": c.text,
        "reward": v.reward,
        "correct": v.reward >= 1.0,
        "answer": v.answer,
        "error": v.error,
        "finish_reason": c.finish_reason,
        "response_tokens": len(c.token_ids),
        "neg_logprob": -sum(c.logprobs),
    }
