"""Sampling against this machine's roofline: each engine's generated tokens/s over the bound.

In one run: the matmul peak in float32 and bfloat16 (the best of a decoder-shaped matmul,
256x576 @ 576x1536, and a square 2048^3 one) and the read bandwidth (the best `sum` over a
512 MiB tensor), all with the benchmark's torch threads; then each engine in its own process
(vLLM replaces `torch.set_num_threads` in the process it runs in) samples the embedded
SmolLM2-135M at batch 1 (1 prompt x 1), 16 (2 prompts x 8) and 256 (32 prompts x 8): `arith`
eval prompts, temperature 1.0, at most `--max-new-tokens`, seeded and with log-probs, as dphrl
calls it. Tokens/s counts the generated tokens (EOS included) over the wall time of the call.

The bound is the time the same work needs at the measured peaks (a roofline: each pass takes
the longer of its FLOPs at the matmul peak and its bytes at the bandwidth), for the very
completions the engine drew:

    prefill   once per distinct prompt (its n samples share it):  2 N x prompt tokens FLOPs,
              the weights' bytes once
    decode    step t (t >= 1) for the a_t samples still running, at context c = prompt + t:
              FLOPs  a_t x (2 N + 4 L H d c)         (matmuls + QK^T and AV)
              bytes  N x w + a_t x c x 2 L K d x w   (the weights, then each sample's KV cache)

with N the parameters the matmuls use (the body plus the tied lm_head, the embedding lookup
being free), L layers, H query and K key/value heads of d dims, w the bytes of the engine's
dtype. bound tokens/s = generated tokens / (prefill + sum of decode steps); fraction = measured
tokens/s / bound. Counting the distinct prompts' prefill (not every sample's) holds an engine
that prefills a prompt once per sample to the bound of one that shares it.

Figures: `rollout_fraction_of_bound_b{1,16,256}` for the engine and dtype the defaults pick,
`rollout_fraction_of_bound_<other engine>_b{...}` for the others (`vllm_compiled`: `VARIANTS`).

Usage: python benchmarks/roofline.py [--quick] [--engines vllm vllm_compiled hf] [--dtype auto]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"batches": ((1, 1), (2, 8), (32, 8)), "max_new_tokens": 40, "repeats": 2}
QUICK = {"batches": ((1, 1), (2, 8)), "max_new_tokens": 16, "repeats": 1}
TARGETS = {256: 0.5, 16: 0.4}
MODEL = "embedded:smollm2-135m"
# Engines the benchmark can name beyond the registered ones: (registered engine, its options).
# vllm_compiled is `engine.vllm.enforce_eager=false`: vLLM's torch.compile graphs instead of
# eager PyTorch; faster steps, a longer start (the table's start column) and other roundings.
VARIANTS = {"vllm_compiled": ("vllm", {"enforce_eager": False})}


def matmul_peak(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of the fastest of the two shapes' best-of-`repeats` matmuls in `dtype`."""
    from dphrl.precision import matmul_seconds

    shapes = ((256, 576, 1536), (2048, 2048, 2048))
    return max(2.0 * m * k * n / matmul_seconds(m, k, n, dtype, repeats) for m, k, n in shapes)


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of the fastest `sum` over a float32 tensor of `mib` MiB (reads only)."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        seconds = min(seconds, time.perf_counter() - start)
    return x.numel() * 4 / seconds


def model_shape(model_path: str) -> dict[str, int]:
    """What the bound needs of the model: matmul parameters, layers, heads, head dim."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    vocab, inter = config["vocab_size"], config["intermediate_size"]
    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    body = layers * (attn + 3 * hidden * inter)
    return {
        "matmul_params": body + vocab * hidden,  # the lm_head reads the (tied) embedding table
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }


def bound_seconds(
    shape: dict[str, int],
    prompt_lens: list[int],
    completion_lens: list[list[int]],
    peak: float,
    bandwidth: float,
    width: int,
) -> float:
    """Seconds the roofline allows for these completions (the module docstring's sums).
    `completion_lens[i]` are prompt i's samples' generated lengths; `width` bytes per value."""
    n, layers, d = shape["matmul_params"], shape["layers"], shape["head_dim"]
    heads, kv = shape["heads"], shape["kv_heads"]
    weight_bytes = n * width
    prefill_flops = 2.0 * n * sum(prompt_lens)
    seconds = max(prefill_flops / peak, weight_bytes / bandwidth)
    samples = [(p, length) for p, lens in zip(prompt_lens, completion_lens) for length in lens]
    for t in range(1, max((length for _, length in samples), default=0)):
        alive = [p + t for p, length in samples if length > t]  # contexts of running samples
        flops = 2.0 * n * len(alive) + 4.0 * layers * heads * d * sum(alive)
        kv_bytes = 2.0 * layers * kv * d * width * sum(alive)
        seconds += max(flops / peak, (weight_bytes + kv_bytes) / bandwidth)
    return seconds


def worker(engine_name: str, dtype: str, batches: list[tuple[int, int]], max_new: int) -> dict:
    """One engine at each batch: tokens, seconds, the completions' lengths and a digest."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from dphrl.config import TaskConfig
    from dphrl.data import render_prompts
    from dphrl.embedded import resolve_model_path
    from dphrl.engine import Sampling, make_engine
    from dphrl.models import load_tokenizer
    from dphrl.tasks import get_task

    model_path = resolve_model_path(MODEL)
    most = max(p for p, _ in batches)
    rows = get_task("arith").load(TaskConfig(limit=most), "eval")
    ids, _ = render_prompts(load_tokenizer(model_path), [r["prompt"] for r in rows], 512)
    started = time.perf_counter()
    name, options = VARIANTS.get(engine_name, (engine_name, {}))
    engine = make_engine(
        name, model_path, dtype=dtype, seed=0, max_model_len=512 + max_new, **options
    )
    engine.generate(ids[:1], 1, Sampling(temperature=1.0, max_new_tokens=8, seed=99))  # warm-up
    start_seconds = time.perf_counter() - started
    runs = []
    for prompts, n in batches:
        start = time.perf_counter()
        out = engine.generate(ids[:prompts], n, Sampling(1.0, max_new_tokens=max_new, seed=0))
        seconds = time.perf_counter() - start
        lens = [[len(c.token_ids) for c in group] for group in out]
        tokens = [c.token_ids for group in out for c in group]
        runs.append(
            {
                "batch": prompts * n,
                "seconds": seconds,
                "tokens": sum(map(sum, lens)),
                "prompt_lens": [len(p) for p in ids[:prompts]],
                "completion_lens": lens,
                "digest": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:12],
            }
        )
    engine.close()
    return {"engine": engine_name, "dtype": dtype, "start_seconds": start_seconds, "runs": runs}


def starts_text(seconds: list[float]) -> str:
    return " / ".join(f"{s:.0f}" for s in seconds)


def run_worker(engine_name: str, dtype: str, cfg: dict) -> dict:
    batches = ",".join(f"{p}x{n}" for p, n in cfg["batches"])
    command = [sys.executable, __file__, "--worker", engine_name, "--dtype", dtype]
    command += ["--batches", batches, "--max-new-tokens", str(cfg["max_new_tokens"])]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{engine_name} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", nargs="+", default=["vllm", "vllm_compiled", "hf"])
    parser.add_argument("--dtype", default="auto", help="the engines' dtype; auto: dphrl's pick")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        batches = [tuple(map(int, b.split("x"))) for b in args.batches.split(",")]
        print(json.dumps(worker(args.worker, args.dtype, batches, args.max_new_tokens)))
        return

    from benchmarks.report import publish
    from dphrl.embedded import resolve_model_path
    from dphrl.engine import resolve_engine_name
    from dphrl.precision import resolve_dtype

    cfg = QUICK if args.quick else FULL
    dtype = resolve_dtype(args.dtype, "cpu")
    default_engine = resolve_engine_name("auto")
    load_before = os.getloadavg()[0]
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    bandwidth = read_bandwidth()
    shape = model_shape(resolve_model_path(MODEL))
    best: dict[str, dict[int, dict]] = {}
    starts: dict[str, list[float]] = {}  # each process's engine start + warm-up, seconds
    for _ in range(cfg["repeats"]):  # alternating engines; each batch's best run counts
        for name in args.engines:
            result = run_worker(name, dtype, cfg)
            starts.setdefault(name, []).append(result["start_seconds"])
            for r in result["runs"]:
                kept = best.setdefault(name, {}).get(r["batch"])
                if kept is None or r["seconds"] / r["tokens"] < kept["seconds"] / kept["tokens"]:
                    best[name][r["batch"]] = r
    width = 2 if dtype in ("bfloat16", "float16") else 4
    peak = peaks["bfloat16" if width == 2 else "float32"]
    figures, rows = {}, []
    for name, by_batch in best.items():
        for batch, r in sorted(by_batch.items()):
            bound = r["tokens"] / bound_seconds(
                shape, r["prompt_lens"], r["completion_lens"], peak, bandwidth, width
            )
            measured = r["tokens"] / r["seconds"]
            infix = "" if name == default_engine else f"{name}_"
            figures[f"rollout_fraction_of_bound_{infix}b{batch}"] = measured / bound
            rows.append(
                f"| {name} | {starts_text(starts[name])} | {batch} | {r['tokens']} | "
                f"{r['seconds']:.2f} | {measured:.1f} | "
                f"{bound:.0f} | **{measured / bound:.0%}** | `{r['digest']}` |"
            )
    verdicts = ", ".join(
        f"b{b}: {figures.get(f'rollout_fraction_of_bound_b{b}', float('nan')):.0%} "
        f"(target >= {t:.0%})"
        for b, t in sorted(TARGETS.items())
    )
    body = f"""
Each engine samples the embedded SmolLM2-135M ({shape["matmul_params"] / 1e6:.0f}M matmul
parameters) in **{dtype}** (`auto` on this CPU), `arith` eval prompts, temperature 1.0, at most
{cfg["max_new_tokens"]} new tokens, seeded, with log-probs; each engine in its own process,
best of {cfg["repeats"]} alternating run(s). Measured in the same run: float32 matmul peak
{peaks["float32"] / 1e9:.0f} GFLOP/s, bfloat16 {peaks["bfloat16"] / 1e9:.0f} GFLOP/s, read
bandwidth {bandwidth / 1e9:.1f} GB/s. The bound counts every pass at the longer of its FLOPs at
the {dtype} peak and its bytes at the bandwidth, the prefill once per distinct prompt
(`benchmarks/roofline.py`'s docstring). Load average (1 min) before / after:
{load_before:.1f} / {os.getloadavg()[0]:.1f}.

| engine | start s | batch | generated tokens | seconds | tokens/s | bound tokens/s | fraction | samples |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Default engine ({default_engine}): {verdicts}. The samples column is a digest of the generated
token ids: equal digests mean the same samples. Start s: the engine's start and an 8-token
warm-up, not in the tokens/s, one figure per process in the order they ran (the first compiled
start fills torch.compile's cache, the later ones read it).
"""
    out = publish("roofline", "Sampling against the roofline", body, figures, args.quick)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
