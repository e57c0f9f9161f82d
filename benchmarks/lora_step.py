"""LoRA vs full fine-tuning: peak memory and step time of one GRPO + reverse-KL train step.

Both variants run dphrl's `Trainer` on the embedded SmolLM2-135M-Instruct (float32, CPU,
engine=hf) with the same prompts, sampling and loss; they differ only in `model.lora.r`:

- `full` (r=0): every weight trains; AdamW keeps two moments per weight; the online reference
  of `divergence=reverse_kl` is a second full copy of the model.
- `lora` (r=16, alpha 32, attention + MLP projections): only the adapters train and have
  AdamW state; the reference is the policy with its adapters disabled (no second copy); the
  engine gets the merged weights each push.

Each variant runs in a fresh process (`MALLOC_MMAP_THRESHOLD_` fixed, as in train_step.py);
after one warm-up step, `steps` steps are timed. Peak memory is the process's VmHWM over
everything (model, reference, engine, optimizer state, activations): what a user provisions.

Usage: python benchmarks/lora_step.py [--steps N]   (prints one json line per variant)
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
SIZES = ["algo.prompts_per_step=2", "algo.group_size=4", "model.max_new_tokens=32"]


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def worker(variant: str, steps: int, folder: str) -> dict:
    import torch

    from benchmarks.train_step import compose
    from dphrl import dist
    from dphrl.embedded import resolve_model_path
    from dphrl.presample.inputs import training_data
    from dphrl.training.trainer import Trainer

    torch.set_num_threads(1)
    lora = ["model.lora.r=16", "model.lora.alpha=32"] if variant == "lora" else []
    cfg = compose(
        [
            "divergence=reverse_kl", "model=smollm2-135m", "engine=hf", "layout=cpu",
            "task=arith", "task.limit=16", "trainer.tensorboard=false", "trainer.lr=1e-5",
            f"trainer.run_dir={folder}/run-{variant}", *SIZES, *lora,
        ]
    )  # fmt: skip
    layout = dist.resolve_layout(cfg.layout)
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    prompts, _ = training_data(cfg, layout.is_main, model_path)
    t = Trainer(cfg, Path(folder), layout, prompts, [], model_path)
    t.step()  # warm-up: optimizer state, first-touch allocations
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        t.step()
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in t.policy.parameters() if p.requires_grad)
    t.engine.close()
    return {
        "variant": variant,
        "trainable_params": trainable,
        "second_model": t.ref_model is not None,
        "step_s": sum(times) / len(times),
        "train_phase_s": t.timer.totals().get("train", float("nan")),
        "peak_rss_mib": _vmhwm_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=["full", "lora"])
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.folder)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("full", "lora"):
            cmd = [sys.executable, "-m", "benchmarks.lora_step", "--worker", variant,
                   "--steps", str(args.steps), "--folder", folder]  # fmt: skip
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
