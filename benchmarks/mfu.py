"""The train phase against the machine: model FLOP/s of dphrl's update over a float32 matmul's.

For each group size G, dphrl's `Trainer` (GRPO, `divergence=none`, the model of
`benchmarks/trl_step.py`, float32, CPU, the same torch threads) runs its train phase, what
`Trainer.step` times as `train` (advantages, packing, the loss forward and backward over the
shared-prefix layout, the clipped AdamW step), on fixed rollouts: `prompts` arith prompts x G
responses of exactly `length` random tokens, rewards alternating 0 / 1 in each group so every
response has a nonzero advantage and is forwarded (none is skipped). Fixed rollouts make the
work exact and the same at each repeat; the rollout itself is not measured here.

Model FLOPs of one train phase (forward + backward = 3 x forward; PaLM's appendix B count):

    6 x body parameters x tokens forwarded          (each real token of the packed rows once)
  + 6 x vocab x hidden x tokens scored              (the lm_head, only where a log-prob is taken)
  + 12 x layers x heads x head dim x attended (query, key) pairs   (QK^T and AV, where the mask allows)

The tokens, scored positions and pairs are counted from the very layout the loss forwards
(`dphrl.rl.batching.share_prefixes` at `model.pack_tokens`), so the prompt counts once per row.
The optimizer's few FLOPs per parameter are left out (time it costs counts against MFU).
The peak is the best of several n x n float32 matmuls timed in the same process with the same
threads. MFU = model FLOPs / train-phase seconds / peak. A torch.profiler table of the train
phase at G = 16 (or the largest G run) shows where the rest goes.

Then the same count at the reproduction's step (`REPRO`: 256 rollouts in two Adam updates, an
old-log-prob forward of the second update's rows first, the CPU's `auto` precision) against
the matmul peak in the dtype it computes in: `train_fraction_of_peak` in results.json (issue
30's target: 60 %).

Usage: python benchmarks/mfu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = {"groups": (4, 8, 16, 32), "prompts": 1, "length": 64, "warmup": 1, "steps": 2, "n": 2048}
QUICK = {"groups": (4, 16), "prompts": 1, "length": 32, "warmup": 1, "steps": 1, "n": 1024}
PROFILE_G = 16
TARGET = 0.5  # issue 16: at least 50 % at G = 16


def model_flops(
    body_params: int,
    head_params: int,
    layers: int,
    attn_dim: int,
    tokens: int,
    scored: int,
    pairs: int,
) -> dict[str, float]:
    """Forward + backward FLOPs of a decoder over `tokens` real tokens, with log-probs at
    `scored` positions and `pairs` attended (query, key) pairs, by term (PaLM, appendix B:
    6 N per token for the weights, 12 L d_attn per pair for attention). `body_params` leaves
    out the embeddings (a lookup), `head_params` is the lm_head's vocab x hidden."""
    terms = {
        "body": 6.0 * body_params * tokens,
        "head": 6.0 * head_params * scored,
        "attention": 12.0 * layers * attn_dim * pairs,
    }
    return {**terms, "total": sum(terms.values())}


def layout_counts(sp) -> dict[str, int]:
    """Real tokens, scored positions and attended (query, key) pairs of a `SharedPrefix`
    layout: a real query sees the real keys at or before it that are on the prompt or in its
    own response (`SharedPrefix.attention_bias` without the padding's self-loop)."""
    import torch

    seg = sp.segment  # (R, S)
    S = seg.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    real = seg >= 0
    allowed = (
        causal & real[:, None, :] & ((seg == 0)[:, None, :] | (seg[:, :, None] == seg[:, None, :]))
    )
    allowed &= real[:, :, None]  # (R, S, S)
    return {"tokens": int(real.sum()), "scored": len(sp.target), "pairs": int(allowed.sum())}


def matmul_peak(n: int, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls in `dtype` (after one untimed)."""
    from dphrl.precision import matmul_seconds

    return 2.0 * n**3 / matmul_seconds(n, n, n, dtype, repeats)


def model_terms(model) -> dict:
    """What `model_flops` needs of a model besides the layout's counts: body parameters (no
    embeddings, no lm_head), the lm_head's size, layers and attention width."""
    c = model.config
    head = model.get_output_embeddings().weight
    shared = {id(head), id(model.get_input_embeddings().weight)}
    attn_dim = c.num_attention_heads * (
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    )
    return {
        "body_params": sum(p.numel() for p in model.parameters() if id(p) not in shared),
        "head_params": head.numel(),
        "layers": c.num_hidden_layers,
        "attn_dim": attn_dim,
    }


def fixed_rollouts(trainer, rows: list[dict], group: int, length: int, seed: int = 0):
    """G responses of `length` random token ids per prompt, rewards 0 / 1 alternating."""
    import torch

    from dphrl.engine import Completion
    from dphrl.rollout import Rollouts, Scored, render_rows
    from dphrl.tasks import Verdict

    ids, _ = render_rows(trainer.tokenizer, rows, trainer.cfg.model.max_prompt_len, "train")
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.policy.config.vocab_size
    prompts, scored = [], []
    for p in ids:
        for j in range(group):
            tokens = torch.randint(100, vocab, (length,), generator=gen).tolist()
            completion = Completion("", tokens, [-1.0] * length, "length")
            prompts.append(p)
            scored.append(Scored(completion, Verdict(reward=float(j % 2))))
    return Rollouts(prompts, scored, group)


def train_phase(trainer, rollouts) -> tuple[float, float, object]:
    """One train phase as `Trainer.step` runs it: (pack seconds, update seconds, the batch)."""
    start = time.perf_counter()
    batch = trainer.batch(rollouts, trainer.advantages(rollouts))
    packed = time.perf_counter()
    trainer.update(batch)
    return packed - start, time.perf_counter() - packed, batch


def profile_table(trainer, rollouts, rows: int = 10) -> str:
    """torch.profiler's top ops of one train phase by self CPU time, as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_phase(trainer, rollouts)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    lines = [
        f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} | {100 * e.self_cpu_time_total / total:.1f} % "
        f"| {e.count} |"
        for e in top
    ]
    step = [e for e in events if e.key.startswith("Optimizer.step")]
    note = (
        f"\nThe optimizer step (`{step[0].key}`, all its ops): {step[0].cpu_time_total / 1e3:.0f} ms "
        f"of {total / 1e3:.0f} ms profiled."
        if step
        else ""
    )
    head = "| op | self CPU ms | share | calls |\n| --- | --- | --- | --- |\n"
    return head + "\n".join(lines) + "\n" + note


def build_trainer(folder: str, threads: int):
    """dphrl's Trainer as trl_step's dphrl side builds it (GRPO, no reference, engine=hf)."""
    import torch

    from benchmarks.trl_step import _rows, grpo_trainer

    torch.set_num_threads(threads)
    rows = _rows(8)
    return grpo_trainer(Path(folder) / "run", rows, []), rows


def measure(sizes: dict, folder: str, threads: int) -> dict:
    """Peak, then each G's train phases (medians), then the profile at PROFILE_G."""
    from dphrl.rl.batching import share_prefixes

    trainer, rows = build_trainer(folder, threads)
    peak = matmul_peak(sizes["n"])
    terms = model_terms(trainer.policy)
    per_g = {}
    for g in sizes["groups"]:
        rollouts = fixed_rollouts(trainer, rows[: sizes["prompts"]], g, sizes["length"])
        times = [train_phase(trainer, rollouts) for _ in range(sizes["warmup"] + sizes["steps"])]
        times = times[sizes["warmup"] :]
        sp = share_prefixes(times[0][2].rollouts, trainer.cfg.model.pack_tokens)
        counts = layout_counts(sp)
        flops = model_flops(**terms, **counts)
        seconds = statistics.median(p + u for p, u, _ in times)
        per_g[g] = {
            **counts,
            "flops": flops,
            "pack_s": statistics.median(p for p, _, _ in times),
            "update_s": statistics.median(u for _, u, _ in times),
            "train_s": seconds,
            "flop_per_s": flops["total"] / seconds,
            "mfu": flops["total"] / seconds / peak,
        }
        print(f"mfu: G={g}: {per_g[g]}", flush=True)
    profile_g = PROFILE_G if PROFILE_G in sizes["groups"] else max(sizes["groups"])
    rollouts = fixed_rollouts(trainer, rows[: sizes["prompts"]], profile_g, sizes["length"])
    profile = profile_table(trainer, rollouts)
    trainer.engine.close()
    return {"peak": peak, "per_g": per_g, "profile_g": profile_g, "profile": profile}


# The reproduction's step (scripts/reproduce_small.sh): 32 arith prompts x 8 responses, two
# Adam updates (minibatch = half), the CPU's `auto` precision; responses of the mean length
# its rollouts have (24 tokens, 2026-12-05 sweep).
REPRO = {"prompts": 32, "group": 8, "length": 24, "minibatch": 128, "warmup": 1, "steps": 2}
REPRO_QUICK = {"prompts": 8, "group": 8, "length": 24, "minibatch": 32, "warmup": 1, "steps": 1}
REPRO_TARGET = 0.6  # issue 30


def measure_repro(sizes: dict, folder: str) -> dict:
    """The train phase at the reproduction's batch and precision, against the same process's
    matmul peak in the dtype it computes in (bfloat16 under autocast): model FLOPs as
    `model_flops` (forward + backward), plus the forward of the old log-probs that a step of
    several updates makes first (2 N per token, 2 x head per scored position), counted on the
    rows it forwards (`Trainer.old_logprobs`: those of the minibatches after the first)."""
    import torch

    from benchmarks.trl_step import _rows, grpo_trainer
    from dphrl.rl.batching import share_prefixes

    torch.set_num_threads(os.cpu_count() or 1)
    rows = _rows(sizes["prompts"])
    extra = [
        f"algo.prompts_per_step={sizes['prompts']}",
        f"algo.group_size={sizes['group']}",
        f"algo.minibatch_size={sizes['minibatch']}",
    ]
    trainer = grpo_trainer(Path(folder) / "repro", rows, extra)
    dtype = trainer.compute_dtype or "float32"
    peak = matmul_peak(2048, dtype=dtype)
    terms = model_terms(trainer.policy)
    rollouts = fixed_rollouts(trainer, rows, sizes["group"], sizes["length"])
    old_rows = []  # the batches the old-log-prob forward covers, in the last phase
    in_parts = trainer.logprobs_in_parts
    trainer.logprobs_in_parts = lambda model, batch, t: (
        old_rows.append(batch) or in_parts(model, batch, t)
    )
    times = []
    for _ in range(sizes["warmup"] + sizes["steps"]):
        old_rows.clear()
        times.append(train_phase(trainer, rollouts))
    times = times[sizes["warmup"] :]
    pack = trainer.cfg.model.pack_tokens
    counts = layout_counts(share_prefixes(times[0][2].rollouts, pack))
    flops = model_flops(**terms, **counts)
    old = [layout_counts(share_prefixes(b, pack)) for b in old_rows]
    flops["old_logprobs"] = sum(
        2.0 * terms["body_params"] * c["tokens"] + 2.0 * terms["head_params"] * c["scored"]
        for c in old
    )
    flops["total"] += flops["old_logprobs"]
    seconds = statistics.median(p + u for p, u, _ in times)
    profile = profile_table(trainer, rollouts)
    trainer.engine.close()
    return {
        **counts,
        "old_tokens": sum(c["tokens"] for c in old),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "peak": peak,
        "flops": flops,
        "train_s": seconds,
        "fraction": flops["total"] / seconds / peak,
        "profile": profile,
    }


def main(quick: bool = False) -> dict[str, float]:
    """Measure, write BENCHMARKS.md's section and the `mfu_*` keys of results.json."""
    import torch

    from benchmarks.report import publish
    from benchmarks.trl_step import MODEL, THREADS

    sizes = QUICK if quick else FULL
    repro_sizes = REPRO_QUICK if quick else REPRO
    with tempfile.TemporaryDirectory() as folder:
        m = measure(sizes, folder, THREADS)
        rp = measure_repro(repro_sizes, folder)
    peak, per_g = m["peak"], m["per_g"]
    results = {f"mfu_train_phase_g{g}": r["mfu"] for g, r in per_g.items()}
    results["train_fraction_of_peak"] = rp["fraction"]
    f = rp["flops"]
    updates = repro_sizes["prompts"] * repro_sizes["group"] // repro_sizes["minibatch"]
    repro_verdict = "meets" if rp["fraction"] >= REPRO_TARGET else "misses"
    repro = f"""
### At the reproduction's step (`train_fraction_of_peak`)

scripts/reproduce_small.sh's train phase: {repro_sizes["prompts"]} arith prompts x
{repro_sizes["group"]} responses of {repro_sizes["length"]} tokens,
algo.minibatch_size={repro_sizes["minibatch"]} ({updates} Adam updates, so an old-log-prob
forward of the later minibatches' rows first: {rp["old_tokens"]} tokens), computing in
**{rp["dtype"]}** (the CPU's `auto` precision) on {rp["threads"]} torch thread(s). Peak: the fastest 2048^3 matmul in {rp["dtype"]} in the same
process, **{rp["peak"] / 1e9:.0f} GFLOP/s**. {rp["tokens"]} tokens forwarded, {rp["scored"]}
scored; model FLOPs {f["total"] / 1e9:.0f} G (body {f["body"] / 1e9:.0f}, lm_head
{f["head"] / 1e9:.0f}, attention {f["attention"] / 1e9:.0f}, old log-probs
{f["old_logprobs"] / 1e9:.0f}). Train phase, median of {repro_sizes["steps"]}:
{rp["train_s"]:.1f} s, {f["total"] / rp["train_s"] / 1e9:.0f} GFLOP/s:
**{100 * rp["fraction"]:.0f} % of the peak** (target >= {100 * REPRO_TARGET:.0f} %: {repro_verdict} it).

Where that train phase's time goes (torch.profiler, top 10 ops by self CPU time):

{rp["profile"]}
"""
    rows = "\n".join(
        f"| {g} | {r['tokens']} | {r['scored']} | {r['pairs'] / 1e6:.2f} "
        f"| {r['flops']['total'] / 1e9:.0f} | {100 * r['flops']['attention'] / r['flops']['total']:.1f} % "
        f"| {r['pack_s']:.2f} | {r['update_s']:.2f} | {r['flop_per_s'] / 1e9:.1f} | **{100 * r['mfu']:.0f} %** |"
        for g, r in per_g.items()
    )
    at = per_g.get(PROFILE_G)
    verdict = (
        f"At G = {PROFILE_G}: **{100 * at['mfu']:.0f} %** (target >= {100 * TARGET:.0f} %: "
        f"{'meets' if at['mfu'] >= TARGET else 'misses'} it)."
        if at
        else ""
    )
    body = f"""
dphrl's train phase (advantages, packing, the loss forward + backward on the shared-prefix
layout, clipped AdamW) on model `{MODEL}` (float32, CPU, {torch.get_num_threads()} torch
thread(s)), GRPO without a reference model, over fixed rollouts: {sizes["prompts"]} arith
prompt(s) x G responses of exactly {sizes["length"]} tokens, every response with a nonzero
advantage (so all are forwarded). Model FLOPs = 6 x body parameters x tokens forwarded + 6 x
vocab x hidden x tokens scored (lm_head) + 12 x layers x attention width x attended pairs, counted on
the packed rows the loss forwards (a prompt once per row). Peak: the fastest {sizes["n"]} x
{sizes["n"]} float32 matmul in the same process, **{peak / 1e9:.1f} GFLOP/s**.
{sizes["warmup"]} warm-up + {sizes["steps"]} timed train phase(s) per G; medians, seconds.{" Quick sizes." if quick else ""}

| G | tokens forwarded | tokens scored | attended pairs (M) | GFLOP | attention share | pack s | update s | GFLOP/s | MFU |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

{verdict}

Where the train phase's time goes at G = {m["profile_g"]} (torch.profiler, one train phase, top
10 ops by self CPU time; profiling adds overhead of its own):

{m["profile"]}
{repro}"""
    return publish(
        "mfu", "Train phase MFU: model FLOP/s over a float32 matmul's", body, results, quick
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two group sizes (about a minute)")
    args = parser.parse_args()
    print(json.dumps(main(quick=args.quick), indent=2))
