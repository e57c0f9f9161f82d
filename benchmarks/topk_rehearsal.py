"""The top-k rehearsal (`divergence=forward_kl_topk`, `ref.topk`): its store size and its cost.

On the embedded SmolLM2-135M-Instruct (float32, CPU), over `answers` real responses (the arith
warm-up's worked answers to arith prompts, the kind of text a ref store holds):

- store size: the ref-store records precompute-ref makes (`_add_ref_logprobs`: the training
  forward's ref log-probs, plus the top-k ids and log-probs at k > 0) written as a parquet shard
  (`_write_shard`, pyarrow's default compression); bytes per response token at k = 0, 8, 32.
- step time: the rehearsal's part of a train step, the only part the divergence changes: the
  policy's forward over the ref batch (with the k stored ids scored at every position for
  top-k), the divergence, token-mean, backward. `js` (the default) against `forward_kl_topk`
  at k = 8 and 32, interleaved, `repeats` rounds, median seconds.

Usage: python benchmarks/topk_rehearsal.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "embedded:smollm2-135m"
FULL = {"answers": 32, "batch": 8, "repeats": 5, "threads": 1}
QUICK = {"answers": 8, "batch": 4, "repeats": 2, "threads": 1}
KS = (8, 32)


def records(policy, tok, answers: int, topk: int) -> list[dict]:
    """What precompute-ref keeps for `answers` responses, with top-k at `topk` > 0."""
    from dphrl.data import render_prompts
    from dphrl.presample.refstore import _add_ref_logprobs
    from dphrl.tasks import arith

    pairs = arith.warmup_examples(answers, seed=1)
    prompt_ids, kept = render_prompts(tok, [m for m, _ in pairs], max_len=10_000)
    out = [
        {
            "id": str(i),
            "prompt_ids": p,
            "response_ids": tok(pairs[i][1], add_special_tokens=False)["input_ids"],
            "reward": 1.0,
            "response_text": pairs[i][1],
        }
        for p, i in zip(prompt_ids, kept)
    ]
    _add_ref_logprobs(policy, out, tok.pad_token_id, "cpu", 4096, None, topk=topk)
    return out


def store_bytes(rows: list[dict], folder: Path, name: str) -> float:
    """Bytes of the parquet shard of `rows` per response token."""
    from dphrl.presample.refstore import _write_shard

    path = folder / f"{name}.parquet"
    _write_shard(path, rows)
    return path.stat().st_size / sum(len(r["response_ids"]) for r in rows)


def rehearsal_seconds(policy, tok, rows: list[dict], name: str, k: int) -> float:
    """One rehearsal forward + divergence + backward over `rows` (the ref batch)."""
    import torch

    from dphrl.rl.aggregation import aggregate
    from dphrl.rl.batching import pack_topk, pack_with
    from dphrl.rl.divergence import make_divergence
    from dphrl.rl.logprobs import batch_logprobs

    packed, ref = pack_with(
        [r["prompt_ids"] for r in rows],
        [r["response_ids"] for r in rows],
        [r["ref_logprobs"] for r in rows],
        tok.pad_token_id,
    )
    divergence = make_divergence(name)
    extra = top_ref = None
    if k:
        extra, top_ref = pack_topk([r | _cut(r, k) for r in rows], packed.response_mask)
    policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logp, _ = batch_logprobs(policy, packed, pack_tokens=4096, extra_ids=extra)
    values = divergence(logp, ref) if not k else divergence(logp[..., 1:], top_ref)
    aggregate(values, packed.response_mask, "token-mean").backward()
    seconds = time.perf_counter() - start
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    torch.testing.assert_close(values.detach(), torch.zeros_like(values), atol=1e-4, rtol=0)
    return seconds


def _cut(row: dict, k: int) -> dict:
    """A k-wide view of a record stored with more columns (the top-k is sorted)."""
    return {
        "ref_topk_ids": [ids[:k] for ids in row["ref_topk_ids"]],
        "ref_topk_logprobs": [lp[:k] for lp in row["ref_topk_logprobs"]],
    }


def main(quick: bool = False) -> dict[str, float]:
    import torch

    from benchmarks.report import publish
    from dphrl.embedded import resolve_model_path
    from dphrl.models import load_policy, load_tokenizer

    sizes = QUICK if quick else FULL
    torch.set_num_threads(sizes["threads"])
    path = resolve_model_path(MODEL)
    policy, tok = load_policy(path, "float32", "cpu"), load_tokenizer(path)
    policy.train()
    size = {}
    with tempfile.TemporaryDirectory() as tmp:
        by_k = {k: records(policy, tok, sizes["answers"], k) for k in (0, max(KS))}
        size[0] = store_bytes(by_k[0], Path(tmp), "k0")
        for k in KS:
            size[k] = store_bytes([r | _cut(r, k) for r in by_k[max(KS)]], Path(tmp), f"k{k}")
    tokens = sum(len(r["response_ids"]) for r in by_k[0])
    batch = by_k[max(KS)][: sizes["batch"]]
    arms = [("js", 0), *(("forward_kl_topk", k) for k in KS)]
    times: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    rehearsal_seconds(policy, tok, batch, "js", 0)  # warm-up
    for _ in range(sizes["repeats"]):
        for name, k in arms:
            times[(name, k)].append(rehearsal_seconds(policy, tok, batch, name, k))
    med = {arm: statistics.median(v) for arm, v in times.items()}
    batch_tokens = sum(len(r["response_ids"]) for r in batch)
    rows = "\n".join(
        f"| {name}{f' k={k}' if k else ''} | {med[(name, k)]:.3f} | "
        f"{med[(name, k)] / med[('js', 0)]:.3f} |"
        for name, k in arms
    )
    body = f"""
Store size: {len(by_k[0])} ref responses ({tokens} response tokens; the arith warm-up's worked
answers) scored by the embedded `{MODEL}` (float32, CPU) as precompute-ref does, written as one
parquet shard each way. Bytes per response token: k=0 {size[0]:.1f}, k=8 {size[8]:.1f}
(x{size[8] / size[0]:.1f}), k=32 {size[32]:.1f} (x{size[32] / size[0]:.1f}); raw, a top-k
token costs 8 k bytes (int32 id + float32 log-prob). The shard also holds the prompt ids and
the response text, which top-k does not change.

Rehearsal step time: the policy's forward over a ref batch of {len(batch)} responses
({batch_tokens} tokens, shared-prefix layout), the divergence, token-mean and backward; the
rest of a train step (rollouts, PPO-clip, AdamW) is the same for every divergence. Median of
{sizes["repeats"]} interleaved rounds, {torch.get_num_threads()} torch thread(s). Every arm's
value is 0 at the initial weights (checked), as in training's first step.

| divergence | seconds | vs js |
| --- | --- | --- |
{rows}
"""
    results = {
        "topk_store_bytes_k8_vs_k0": size[8] / size[0],
        "topk_store_bytes_k32_vs_k0": size[32] / size[0],
        **{
            f"topk_rehearsal_time_k{k}_vs_js": med[("forward_kl_topk", k)] / med[("js", 0)]
            for k in KS
        },
    }
    print(body)
    return publish(
        "topk_rehearsal", "Top-k rehearsal: store size and step time", body, results, quick
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
