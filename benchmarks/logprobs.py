"""Peak memory of per-token log-probs: dphrl's chunked path vs the naive log_softmax().gather().

Both variants do what a training step does with one 4k-token response at Llama-3's vocabulary:
final hidden states `# (T, H)` and the lm_head weight `# (V, H)` in, per-token log-probs out,
then backward to hidden and weight. Naive: `(h @ W.T).log_softmax(-1).gather(...)`. Ours:
`dphrl.rl.logprobs.hidden_logprobs` (chunked, checkpointed), and, for reference, `token_logprobs`
given full logits (what `response_logprobs(from_hidden=False)` does).

How memory is measured: torch's CPU allocations are invisible to tracemalloc, so each variant
runs in a fresh subprocess, builds its inputs, warms up, resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`), runs forward + backward, and reports peak RSS (VmHWM) minus RSS just
before the run. With glibc's mmap threshold fixed low, large tensors are mmap'd and returned
on free, so this is the high-water mark of memory the computation itself touched. Values and gradients of the variants
are compared (allclose) before any figure is written.

Usage: python benchmarks/logprobs.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = {"vocab": 128_256, "seq": 4096, "hidden": 64, "chunk": 1024}
QUICK = {"vocab": 32_000, "seq": 1024, "hidden": 64, "chunk": 256}
VARIANTS = ("naive", "ours_hidden", "ours_logits")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run(variant: str, hidden, weight, ids, chunk: int):
    import torch

    from dphrl.rl.logprobs import hidden_logprobs, token_logprobs

    if variant == "naive":
        logits = hidden @ weight.T  # (T, V)
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    elif variant == "ours_hidden":
        logp, _ = hidden_logprobs(hidden, weight, ids, chunk=chunk)
    else:
        logp, _ = token_logprobs(hidden @ weight.T, ids, chunk=chunk)
    logp.sum().backward()
    return logp.detach(), torch.stack([hidden.grad.norm(), weight.grad.norm()])


def worker(variant: str, vocab: int, seq: int, hidden_size: int, chunk: int, out: str) -> None:
    """One measurement in this (fresh) process; writes values, grads and figures to `out`."""
    import torch

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(seq, hidden_size, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).requires_grad_(True)
    ids = torch.randint(0, vocab, (seq,), generator=g)
    small = [t[:8].detach().clone().requires_grad_(True) for t in (hidden, weight)]
    _run(variant, *small, ids[:8] % 8, chunk=4)  # warm-up: thread pools, kernels, autograd
    hidden.grad = weight.grad = None
    clear_refs = Path("/proc/self/clear_refs")
    clear_refs.write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    logp, grad_norms = _run(variant, hidden, weight, ids, chunk)
    seconds = time.perf_counter() - start
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    torch.save({"logp": logp, "grad_norms": grad_norms}, out + ".pt")
    Path(out + ".json").write_text(json.dumps({"peak_mib": peak_mib, "seconds": seconds}))


def _measure(variant: str, sizes: dict[str, int], folder: str) -> dict:
    out = os.path.join(folder, variant)
    args = [str(sizes[k]) for k in ("vocab", "seq", "hidden", "chunk")]
    # A fixed mmap threshold turns off glibc's adaptive one, so every large tensor is mmap'd and
    # unmapped on free: RSS then follows live tensors instead of heap fragmentation.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--worker", variant, *args, out]
    subprocess.run(cmd, check=True, env=env)
    import torch

    result = json.loads(Path(out + ".json").read_text())
    result.update(torch.load(out + ".pt"))
    return result


def main(quick: bool = False) -> dict[str, float]:
    """Measure all variants, check they agree, write BENCHMARKS.md's section and results.json."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.report import record, update_section

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        runs = {v: _measure(v, sizes, folder) for v in VARIANTS}
    naive = runs["naive"]
    for v in VARIANTS[1:]:
        torch.testing.assert_close(runs[v]["logp"], naive["logp"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(runs[v]["grad_norms"], naive["grad_norms"], atol=1e-3, rtol=1e-4)
    ratio = runs["ours_hidden"]["peak_mib"] / naive["peak_mib"]
    ratio_logits = runs["ours_logits"]["peak_mib"] / naive["peak_mib"]
    rows = "\n".join(
        f"| {v} | {r['peak_mib']:.0f} | {r['peak_mib'] / naive['peak_mib']:.3f} | {r['seconds']:.1f} |"
        for v, r in runs.items()
    )
    body = f"""
Per-token log-probs of one response, forward + backward, float32: vocabulary {sizes["vocab"]},
sequence {sizes["seq"]}, hidden size {sizes["hidden"]}, batch 1, chunk {sizes["chunk"]}
tokens{" (quick sizes)" if quick else ""}. `naive` = `(h @ W.T).log_softmax(-1).gather(...)`;
`ours_hidden` = `hidden_logprobs` (logits made chunk by chunk from the lm_head weight, the
default path of `response_logprobs`); `ours_logits` = `token_logprobs` given full logits.
Values and gradients of all three agree (allclose) in the same run.

| variant | peak MiB | vs naive | seconds |
| --- | --- | --- | --- |
{rows}

Peak memory is peak RSS minus RSS just before the computation, each variant in a fresh
subprocess with the kernel's peak counter reset (`/proc/self/clear_refs`) after inputs are
built and a warm-up has run (torch CPU allocations are invisible to tracemalloc), and with
`MALLOC_MMAP_THRESHOLD_` fixed so that every large tensor is mmap'd and returned on free: RSS
then follows live tensors. Target: `ours_hidden` <= 0.25x naive. Given full logits
(`ours_logits`), the logits and their gradient must exist anyway; only the float32
log-softmax copies are saved. Seconds are indicative only (a shared CPU); the chunked paths
remake each chunk's logits in the backward pass, one extra lm_head matmul.
"""
    update_section("logprobs", "Log-probs: peak memory, chunked vs naive log-softmax", body)
    results = {
        "logprobs_peak_mem_ratio": ratio,
        "logprobs_peak_mem_ratio_from_logits": ratio_logits,
    }
    record(results)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds, not minutes)")
    parser.add_argument("--worker", nargs=6, metavar=("VARIANT", "V", "T", "H", "CHUNK", "OUT"))
    args = parser.parse_args()
    if args.worker:
        variant, *nums, out = args.worker
        worker(variant, *map(int, nums), out)
    else:
        print(json.dumps(main(quick=args.quick), indent=2))
