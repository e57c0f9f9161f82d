"""Rollout throughput: generated tokens per second, vllm engine vs hf engine.

Both engines get the same prompts (the first `--prompts` of the embedded `arith` eval set,
chat-templated), the same n, temperature 1.0 and `--max-new-tokens`, on the embedded
SmolLM2-135M-Instruct in float32. Each engine runs in its own subprocess (so vLLM's process
settings cannot touch the hf run), builds the engine, warms up on one short request, then
times one `generate` call over all prompts. Tokens are counted from the completions (EOS
included), since the two engines draw different samples and so stop at different lengths.
Each engine runs `--repeats` times, alternating, and its best figure counts: the machine is
shared, and the best run is the one least disturbed.

Usage: python benchmarks/rollout.py [--prompts 8] [--n 4] [--max-new-tokens 64] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 2.5


def worker(engine_name: str, prompts: int, n: int, max_new_tokens: int) -> dict:
    """Run one engine once; return its timing as a dict (printed as JSON by the subprocess)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from dphrl.config import TaskConfig
    from dphrl.data import render_prompts
    from dphrl.engine import Sampling, make_engine
    from dphrl.models import load_tokenizer, resolve_model_path
    from dphrl.tasks import get_task

    model_path = resolve_model_path("embedded:smollm2-135m")
    rows = get_task("arith").load(TaskConfig(limit=prompts), "eval")
    ids, _ = render_prompts(load_tokenizer(model_path), [r["prompt"] for r in rows], 512)
    started = time.perf_counter()
    engine = make_engine(engine_name, model_path, seed=0, max_model_len=512 + max_new_tokens)
    load_s = time.perf_counter() - started
    engine.generate(ids[:1], 1, Sampling(temperature=1.0, max_new_tokens=8, seed=99))  # warm-up
    started = time.perf_counter()
    out = engine.generate(ids, n, Sampling(temperature=1.0, max_new_tokens=max_new_tokens, seed=0))
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for group in out for c in group)
    engine.close()
    return {
        "engine": engine_name,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "load_s": load_s,
    }


def run_worker(engine_name: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        engine_name,
        "--prompts",
        str(args.prompts),
        "--n",
        str(args.n),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{engine_name} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{engine_name}: {result['tokens']} tokens in {result['seconds']:.1f} s = {result['tokens_per_s']:.1f} tokens/s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompts, args.n, args.max_new_tokens)))
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.report import record, update_section

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_worker(name, args))
    best = {name: max(results, key=lambda r: r["tokens_per_s"]) for name, results in runs.items()}
    ratio = best["vllm"]["tokens_per_s"] / best["hf"]["tokens_per_s"]
    verdict = "meets" if ratio >= TARGET else "misses"
    rows = "\n".join(
        f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {r['load_s']:.1f} |"
        for name, r in best.items()
    )
    body = f"""
Same {args.prompts} `arith` eval prompts x n={args.n}, temperature 1.0, at most {args.max_new_tokens} new
tokens, SmolLM2-135M-Instruct (embedded) in float32; each engine in its own process, warmed up,
best of {args.repeats} alternating run(s). Tokens include the EOS token. Load average (1 min)
before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} (the machine may be shared).

| engine | generated tokens | seconds | tokens/s | engine start (s) |
|---|---|---|---|---|
{rows}

**vllm / hf generated tokens per second: {ratio:.2f}x** (target >= {TARGET}x: {verdict} it).
"""
    update_section("rollout", "Rollout throughput: vllm vs hf engine", body)
    record({"rollout_vllm_over_hf_tokens_per_s": ratio})
    print(f"vllm / hf = {ratio:.2f}x (target {TARGET}x)")


if __name__ == "__main__":
    main()
