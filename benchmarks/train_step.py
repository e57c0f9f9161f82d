"""Step time and peak memory: DPH-JS (ref store, no reference model) vs GRPO + reverse KL.

Both variants run dphrl's `Trainer` on the embedded SmolLM2-135M-Instruct (float32, CPU),
engine=hf, with the same D_exp prompts (the same `exp.jsonl`, the same sampler seed, so the
same prompts in the same order), prompts_per_step, group_size, max_new_tokens, temperature,
lr and PPO settings. They differ only in the divergence term:

- `js`: beta * JS (generator form) on a ref-store batch of `trainer.ref_batch_size`
  responses pre-sampled from the initial policy, with their stored ref log-probs. The ratio
  of ref samples to rollouts is the paper's: 256 ref samples per 2048 rollouts, 1:8.
- `reverse_kl`: beta * k3 reverse KL on the policy's own rollouts against an online reference
  model (a second full copy of the policy, forwarded over every rollout each step).

The ref store is made by the pipeline (`dphrl.commands.precompute_ref.run`, `ref.keep=all`) in a temporary
folder from a D_pef file of arith training prompts written here (the split itself is not what
is measured). Each variant runs in a fresh subprocess, alternating js / reverse_kl for
`repeats` rounds; each worker builds the Trainer, runs warm-up steps (first-touch of the
optimizer state, kernels), then times the phases of `Trainer.step` one by one:

    rollout (+ verify)   engine.generate + the arith verifier: the same work for both
    train                prepare (pack, advantages, old log-probs, [online-ref log-probs])
                         + ref_batch + update (forward/backward, AdamW): what differs
    sync                 new weights into the engine

Peak memory is RSS as in benchmarks/logprobs.py: `MALLOC_MMAP_THRESHOLD_` fixed so large
tensors are mmap'd and returned on free, the kernel's peak counter (VmHWM) read over the whole
process (models, engine, optimizer state and activations: what a user must provision), and,
separately, the peak of the train phase above the RSS just before it (`/proc/self/clear_refs`).

Usage: python benchmarks/train_step.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ref_batch = rollouts / 8, as the paper's 256 ref samples per 2048 rollouts.
# Sizes are small because this is a 2-core CPU machine shared with other work: one decode step
# of 16 sequences of the 135M model takes about a second there.
FULL = {
    "prompts": 2,
    "group": 8,
    "max_new": 64,
    "ref_batch": 2,
    "warmup": 1,
    "steps": 3,
    "repeats": 1,
    "threads": 1,
}
QUICK = {
    "prompts": 1,
    "group": 8,
    "max_new": 16,
    "ref_batch": 1,
    "warmup": 1,
    "steps": 1,
    "repeats": 1,
    "threads": 1,
}
VARIANTS = ("js", "reverse_kl")
PEF_PROMPTS = 4  # ref-store prompts (one response each); D_exp = the next arith prompts
EXP_PROMPTS = 16


def env() -> dict[str, str]:
    """The environment of every worker: the repo importable, one model cache, vLLM in-process."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DPHRL_CACHE": os.environ.get("DPHRL_CACHE", str(ROOT / ".cache")),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # Large tensors mmap'd and unmapped on free: RSS follows live tensors (see logprobs.py).
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }


def compose(overrides: list[str], command: str = "train"):
    """The typed, validated config these overrides give `command` (as the CLI composes it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dphrl import config
    from dphrl.cli import COMMANDS, CONF_DIR

    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name=COMMANDS[command][0], overrides=overrides)
    return config.typed(cfg)


def overrides(sizes: dict, folder: str, divergence: str) -> list[str]:
    rollouts = sizes["prompts"] * sizes["group"]
    return [
        f"divergence={divergence}",
        "engine=hf",
        "layout=cpu",
        f"engine.hf.batch_size={rollouts}",  # one generate call per step
        f"algo.prompts_per_step={sizes['prompts']}",
        f"algo.group_size={sizes['group']}",
        f"model.max_new_tokens={sizes['max_new']}",
        f"trainer.ref_batch_size={sizes['ref_batch']}",
        "trainer.lr=1e-6",
        "trainer.tensorboard=false",
        "task.workers=1",
        "ref.keep=all",
        f"split.out={folder}/split",
        f"ref.out={folder}/ref",
        f"trainer.run_dir={folder}/run-{divergence}",
    ]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def prepare(sizes: dict, folder: str) -> None:
    """D_pef / D_exp files from the arith training rows, then the ref store by the pipeline."""
    import torch

    from dphrl.commands import precompute_ref as reference
    from dphrl.data import write_jsonl
    from dphrl.tasks import get_task

    torch.set_num_threads(sizes["threads"])
    cfg = compose(overrides(sizes, folder, "js"))
    rows = get_task("arith").load(cfg.task, "train")
    split = Path(folder) / "split"
    split.mkdir(parents=True, exist_ok=True)
    write_jsonl(split / "pef.jsonl", rows[:PEF_PROMPTS])
    write_jsonl(split / "exp.jsonl", rows[PEF_PROMPTS : PEF_PROMPTS + EXP_PROMPTS])
    reference.run(cfg, Path(folder))


def worker(variant: str, sizes: dict, folder: str) -> dict:
    """Build the Trainer for `variant`, warm up, time each phase of the measured steps."""
    import torch

    from dphrl import dist
    from dphrl.data import read_jsonl
    from dphrl.embedded import resolve_model_path
    from dphrl.models import weights_hash
    from dphrl.presample.refstore import load_ref_store
    from dphrl.training.trainer import Trainer

    # One intra-op thread: on an oversubscribed 2-core machine, two spinning OpenMP threads
    # wait on each other and run slower than one (measured: 9.1 s vs 6.3 s per prefill).
    torch.set_num_threads(sizes["threads"])
    cfg = compose(overrides(sizes, folder, variant))
    layout = dist.resolve_layout(cfg.layout)
    dist.init(layout)
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    prompts = read_jsonl(Path(folder) / "split" / "exp.jsonl")
    ref_rows = (
        load_ref_store(
            Path(folder) / "ref",
            Path(folder) / "split" / "pef.jsonl",
            weights_hash(model_path),
            cfg.model.dtype,
        )
        if variant == "js"
        else []
    )
    trainer = Trainer(cfg, Path(cfg.trainer.run_dir), layout, prompts, ref_rows, model_path)
    setup_rss = _status_kib("VmRSS") / 1024
    peak = 0
    steps = []
    clear_refs = Path("/proc/self/clear_refs")
    for k in range(sizes["warmup"] + sizes["steps"]):
        t0 = time.perf_counter()
        rollouts = trainer.rollout()
        t1 = time.perf_counter()
        peak = max(peak, _status_kib("VmHWM"))
        clear_refs.write_text("5")  # VmHWM := current RSS
        before = _status_kib("VmRSS")
        batch = trainer.batch(rollouts, trainer.advantages(rollouts))
        trainer.update(batch)
        t2 = time.perf_counter()
        train_peak = (_status_kib("VmHWM") - before) / 1024
        trainer.push_weights()
        t3 = time.perf_counter()
        trainer.step_num += 1
        peak = max(peak, _status_kib("VmHWM"))
        if k >= sizes["warmup"]:
            steps.append(
                {
                    "rollout_s": t1 - t0,
                    "train_s": t2 - t1,
                    "sync_s": t3 - t2,
                    "step_s": t3 - t0,
                    "train_peak_mib": train_peak,
                    "rollout_tokens": int(batch.rollouts.response_mask.sum()),
                    "ref_tokens": int(batch.store.response_mask.sum()) if batch.store else 0,
                }
            )
    trainer.engine.close()
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "setup_rss_mib": setup_rss,
        "peak_rss_mib": peak / 1024,
        "steps": steps,
    }


def _subprocess(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(s[key] for r in runs for s in r["steps"])


def main(quick: bool = False) -> dict[str, float]:
    """Run both variants side by side, write BENCHMARKS.md's section and results.json."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import publish

    sizes = QUICK if quick else FULL
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        _subprocess(["--prepare", json.dumps(sizes), folder])
        for r in range(sizes["repeats"]):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                runs[v].append(_subprocess(["--worker", v, json.dumps(sizes), folder]))
                print(f"train_step: {v} round {r}: {runs[v][-1]['steps']}", flush=True)
    med = {
        v: {
            key: _median(rs, key)
            for key in ("rollout_s", "train_s", "sync_s", "step_s", "train_peak_mib")
        }
        for v, rs in runs.items()
    }
    for v, rs in runs.items():
        med[v]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        med[v]["setup_rss_mib"] = max(r["setup_rss_mib"] for r in rs)
        med[v]["rollout_tokens"] = _median(rs, "rollout_tokens")
        med[v]["ref_tokens"] = _median(rs, "ref_tokens")
    js, rkl = med["js"], med["reverse_kl"]
    results = {
        "train_step_time_rkl_over_js": rkl["step_s"] / js["step_s"],
        "train_step_train_phase_time_rkl_over_js": rkl["train_s"] / js["train_s"],
        "train_step_peak_rss_rkl_over_js": rkl["peak_rss_mib"] / js["peak_rss_mib"],
        "train_step_train_phase_peak_rkl_over_js": rkl["train_peak_mib"] / js["train_peak_mib"],
    }
    rows = "\n".join(
        f"| {v} | {m['rollout_s']:.1f} | {m['train_s']:.2f} | {m['sync_s']:.2f} | {m['step_s']:.1f} "
        f"| {m['setup_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['train_peak_mib']:.0f} "
        f"| {m['rollout_tokens']:.0f} | {m['ref_tokens']:.0f} |"
        for v, m in med.items()
    )
    n = sizes["prompts"] * sizes["group"]
    body = f"""
dphrl `Trainer` on the embedded SmolLM2-135M-Instruct (float32, CPU, engine=hf, {runs["js"][0]["threads"]}
torch threads), the same {sizes["prompts"]} arith D_exp prompts x group {sizes["group"]} = {n} rollouts per step,
at most {sizes["max_new"]} new tokens, temperature 1.0, lr 1e-6, one PPO epoch over one minibatch.
`js`: + beta * JS on {sizes["ref_batch"]} ref-store responses per step (1:8 ref samples to rollouts,
the paper's 256:2048), no reference model. `reverse_kl`: + beta * k3 reverse KL on the rollouts
against an online reference model (a second copy of the policy).{" Quick sizes." if quick else ""}
Each variant in a fresh process, {sizes["repeats"]} alternating round(s) of {sizes["warmup"]} warm-up +
{sizes["steps"]} timed step(s); medians over the timed steps (seconds), peaks in MiB.

| variant | rollout+verify s | train s | sync s | step s | RSS after setup | peak RSS | train-phase peak | rollout tokens | ref tokens |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

reverse_kl / js: **step time {results["train_step_time_rkl_over_js"]:.2f}x**, **train phase
{results["train_step_train_phase_time_rkl_over_js"]:.2f}x**, **peak RSS {results["train_step_peak_rss_rkl_over_js"]:.2f}x**
(train-phase peak above the RSS before it: {results["train_step_train_phase_peak_rkl_over_js"]:.2f}x).

Train phase = prepare (pack, advantages; reverse_kl also the reference model's log-probs on
every rollout) + ref batch + update (forward/backward, AdamW; js also over the ref batch). One
PPO pass, so neither computes separate old log-probs. js's rollouts carry PPO-clip alone, so
responses with advantage exactly 0 (groups of equal rewards) skip its forward; reverse_kl's KL
term needs every rollout's log-probs, so it forwards them all: a saving the design makes
possible, counted here. The rollout is the same work for both (same prompts and seeds; after
step 1 the weights differ by one lr-1e-6 step, so token counts may differ slightly). Peak RSS
covers the whole process: policy, its AdamW state, the engine's copy, and for reverse_kl the
reference model. With a 135M model on CPU the rollout, the same for both, is much of the
step and bounds the whole-step ratio; the train-phase ratio is what the missing reference
model saves, and it grows with the rollout batch (the reference forward scales with rollouts, the ref-store batch
with rollouts / 8).
"""
    return publish(
        "train_step", "Train step: DPH-JS (ref store) vs GRPO + reverse KL", body, results, quick
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch (about a minute)")
    parser.add_argument("--prepare", nargs=2, metavar=("SIZES", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "SIZES", "FOLDER"))
    args = parser.parse_args()
    if args.prepare:
        prepare(json.loads(args.prepare[0]), args.prepare[1])
        print("{}")
    elif args.worker:
        variant, sizes, folder = args.worker
        print(json.dumps(worker(variant, json.loads(sizes), folder)))
    else:
        print(json.dumps(main(quick=args.quick), indent=2))
