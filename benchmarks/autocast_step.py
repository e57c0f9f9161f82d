"""The train phase in float32 vs under `model.autocast=bfloat16`: time, and how far the log-probs move.

`dphrl train` keeps float32 weights on the CPU (AdamW's updates of 1e-5 would round away in
bfloat16), so every matmul of the forward and backward runs in float32 unless
`model.autocast` puts the decoder body under `torch.autocast`. On a CPU with bfloat16 matmul
units (AMX, AVX512-BF16) or a GPU that should make the train phase, most of a small run's step,
faster. This measures by how much, and what it costs in accuracy:

- time: one `Trainer` (GRPO, no reference, engine=hf, the embedded initial policy), its train
  phase as `Trainer.step` runs it (advantages, packing, the loss forward and backward over the
  shared-prefix layout, the clipped AdamW step) on fixed rollouts of the reproduction's shape
  (`prompts` arith prompts x G responses of `length` random tokens, rewards alternating so
  every response is forwarded), the two modes alternating on the same trainer, medians;
- accuracy: on the initial weights, the per-token log-probs of real answers (the arith
  warm-up's worked answers to arith prompts) in both modes, the mean and largest absolute
  difference, and the same for the sum over a response. The lm_head and log-softmax are
  float32 in both modes (`dphrl.rl.logprobs._scaled_logits`), so this is the body's rounding.

Threads are torch's default (`dphrl train` sets none), unlike train_step.py's one thread.

Usage: python benchmarks/autocast_step.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The reproduction's step (scripts/reproduce_small.sh): 16 prompts x 8 responses of ~25 tokens.
FULL = {"prompts": 16, "group": 8, "length": 24, "warmup": 1, "steps": 3, "answers": 64}
QUICK = {"prompts": 2, "group": 8, "length": 16, "warmup": 1, "steps": 1, "answers": 8}
MODES = {"float32": None, "bfloat16": "bfloat16"}


def bf16_matmul_units() -> str:
    """The CPU flags that give bfloat16 matmuls their speed, or 'none' (a GPU names itself)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none"


def logprob_error(trainer, answers: int) -> dict[str, float]:
    """|log-prob difference| between the modes on `answers` real (prompt, answer) pairs."""
    import torch

    from dphrl.data import render_prompts
    from dphrl.rl.batching import pack
    from dphrl.tasks import arith

    pairs = arith.warmup_examples(answers, seed=1)
    tok = trainer.tokenizer
    prompt_ids, kept = render_prompts(tok, [m for m, _ in pairs], max_len=10_000)
    responses = [tok(pairs[i][1], add_special_tokens=False)["input_ids"] for i in kept]
    batch = pack(prompt_ids, responses, tok.pad_token_id)
    logp = {}
    for mode, autocast in MODES.items():
        trainer.cfg.model.autocast = autocast
        logp[mode] = trainer.logprobs(trainer.policy, batch, 1.0)  # (N, T), 0 off the mask
    trainer.cfg.model.autocast = None
    mask = batch.response_mask.bool()
    diff = (logp["bfloat16"] - logp["float32"]).abs()
    seq = (logp["bfloat16"].sum(-1) - logp["float32"].sum(-1)).abs()
    return {
        "tokens": int(mask.sum()),
        "token_mean": float(diff[mask].mean()),
        "token_max": float(diff[mask].max()),
        "seq_mean": float(seq.mean()),
        "seq_max": float(seq.max()),
        "mean_logp": float(logp["float32"][mask].mean()),
        "finite": bool(torch.isfinite(logp["bfloat16"]).all()),
    }


def measure(sizes: dict, folder: str) -> dict:
    """Accuracy on the initial weights, then the modes' train phases, interleaved."""
    from benchmarks.mfu import fixed_rollouts, train_phase
    from benchmarks.trl_step import _rows, grpo_trainer

    rows = _rows(sizes["prompts"])
    trainer = grpo_trainer(Path(folder) / "run", rows, [])
    error = logprob_error(trainer, sizes["answers"])
    rollouts = fixed_rollouts(trainer, rows, sizes["group"], sizes["length"])
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(sizes["warmup"] + sizes["steps"]):
        for mode, autocast in MODES.items():
            trainer.cfg.model.autocast = autocast
            pack_s, update_s, _ = train_phase(trainer, rollouts)
            times[mode].append(pack_s + update_s)
            print(f"autocast_step: {mode}: {pack_s + update_s:.2f} s", flush=True)
    trainer.engine.close()
    medians = {mode: statistics.median(t[sizes["warmup"] :]) for mode, t in times.items()}
    return {"error": error, "seconds": medians, "all": times}


def main(quick: bool = False) -> dict[str, float]:
    """Measure, write BENCHMARKS.md's section and the `autocast_*` keys of results.json."""
    import torch

    from benchmarks.report import publish
    from benchmarks.trl_step import MODEL

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        m = measure(sizes, folder)
    s, e = m["seconds"], m["error"]
    speedup = s["float32"] / s["bfloat16"]
    body = f"""
dphrl's train phase on model `{MODEL}` (weights float32; CPU; {torch.get_num_threads()} torch
threads, torch's default as in `dphrl train`; bfloat16 matmul units: {bf16_matmul_units()}),
GRPO without a reference, over fixed rollouts of {sizes["prompts"]} arith prompts x
{sizes["group"]} responses of {sizes["length"]} tokens, every response forwarded. The two
modes alternate on one trainer: {sizes["warmup"]} warm-up + {sizes["steps"]} timed train
phase(s) each; medians.{" Quick sizes." if quick else ""}

| mode | train phase s |
| --- | --- |
| float32 | {s["float32"]:.2f} |
| `model.autocast=bfloat16` | {s["bfloat16"]:.2f} |

**Speed-up of the train phase: {speedup:.2f}x.**

Log-probs of {e["tokens"]} real answer tokens ({sizes["answers"]} worked arith answers, mean
float32 log-prob {e["mean_logp"]:.3f}) on the initial weights, bfloat16 body vs float32
(lm_head and log-softmax float32 in both): per token mean |diff| {e["token_mean"]:.4f}, largest
{e["token_max"]:.4f}; summed over a response, mean {e["seq_mean"]:.4f}, largest
{e["seq_max"]:.4f}; all finite: {e["finite"]}. This is how far the bfloat16 body moves the
policy's log-probs from float32's, not an error of log r: precompute-ref makes the ref store
under the same `model.autocast`, so log r is 0 at step 0 in either mode.

A whole step also samples (the engine) and pushes weights, which autocast does not touch, so
a step gains less than its train phase.
"""
    results = {
        "autocast_train_phase_speedup": speedup,
        "autocast_logp_token_mean_abs": e["token_mean"],
    }
    return publish(
        "autocast_step", "Train phase: float32 vs model.autocast=bfloat16", body, results, quick
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny batch (about a minute)")
    args = parser.parse_args()
    print(json.dumps(main(quick=args.quick), indent=2))
