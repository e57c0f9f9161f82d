"""One full GRPO step (rollout, reward, update): `dphrl train` vs TRL's `GRPOTrainer`.

Both sides, each in a fresh subprocess (alternating, `repeats` rounds):

- model: the embedded default initial policy (SmolLM2-135M-Instruct after its arith warm-up,
  `model=smollm2-135m-arith`), the same weights on both sides, float32, on CPU, the same number
  of torch threads;
- prompts: the same `prompts` arith training rows every step (chat-templated by each side with
  the model's chat template and the generation prompt);
- rollout: the same transformers model class, eager PyTorch, on the CPU: TRL calls `generate`
  (`use_vllm=False`), dphrl's `engine=hf` runs its own decode loop over the same model class
  (each prompt prefilled once for its group, finished rows dropped at once); all prompts x
  group in one batch, temperature 1.0, top_p 1.0, no top-k, at most `max_new` new tokens,
  stopping at EOS;
- reward: dphrl's arith verifier (`get_task("arith").verify`, in-process) for both;
- update: GRPO group advantages (std-normalised), PPO-clip epsilon 0.2, token-mean loss over
  the batch (TRL's `loss_type="dapo"`), one optimizer step over the whole batch (TRL:
  per_device_train_batch_size = prompts x group, no accumulation, num_iterations 1), AdamW
  lr 1e-6 constant, betas (0.9, 0.999), no weight decay, grad clip 1.0;
- no reference model and no KL term: dphrl `divergence=none`, TRL `beta=0.0`.

What differs by design (dphrl's choices, which the ratio measures): dphrl generates with a
separate engine copy of the weights and copies the new weights into it after the update
(`sync`, counted in its step); its log-prob forward lays a group's responses after one copy of
their prompt (`model.pack_tokens`), where TRL forwards one padded row per response; it skips
the forward of responses whose advantage is exactly 0 (groups with equal rewards, which add
nothing to the PPO-clip loss or its gradient), where TRL computes them; both skip the separate
old-log-prob forward (one PPO pass). Samplers differ (dphrl: one seeded stream per
sequence), so generated lengths differ at random: several timed steps, medians, and a
per-token ratio besides the per-step one.

Time per step is measured after one warm-up step: dphrl around `Trainer.step()` (its own phase
timer gives the split), TRL from `on_step_begin` to `on_step_end` (generation timed by
wrapping `_generate_single_turn`, the reward by the reward function itself).

Usage: python benchmarks/trl_step.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = {"prompts": 2, "group": 8, "max_new": 64, "warmup": 1, "steps": 3, "repeats": 1}
QUICK = {"prompts": 1, "group": 8, "max_new": 16, "warmup": 1, "steps": 1, "repeats": 1}
THREADS = 1  # see train_step.py: one thread is faster than two on the shared 2-core machine
MODEL = "smollm2-135m-arith"  # `dphrl train`'s default initial policy, for both sides
SIDES = ("dphrl", "trl")
LR = 1e-6


def _rows(n: int) -> list[dict]:
    from dphrl.config import TaskConfig
    from dphrl.tasks import get_task

    return get_task("arith").load(TaskConfig(limit=n), "train")


def grpo_trainer(run_dir: Path, rows: list[dict], extra: list[str]):
    """dphrl's Trainer as these benchmarks measure it: divergence=none (GRPO, no reference
    model), engine=hf, on the CPU, model `MODEL`, lr `LR`, `extra` overrides on top."""
    from benchmarks.train_step import compose
    from dphrl import dist
    from dphrl.embedded import resolve_model_path
    from dphrl.training.trainer import Trainer

    cfg = compose(
        [
            "divergence=none",
            f"model={MODEL}",
            "engine=hf",
            "layout=cpu",
            *extra,
            f"trainer.lr={LR}",
            "trainer.tensorboard=false",
            "task.workers=1",
            f"trainer.run_dir={run_dir}",
        ]
    )
    layout = dist.resolve_layout(cfg.layout)
    dist.init(layout)
    model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    return Trainer(cfg, run_dir, layout, rows, [], model_path)


def run_dphrl(sizes: dict, folder: str) -> dict:
    """Steps of dphrl's Trainer with divergence=none (GRPO, no reference model), engine=hf."""
    import torch

    from benchmarks.train_step import _status_kib

    torch.set_num_threads(THREADS)
    n = sizes["prompts"] * sizes["group"]
    extra = [
        f"engine.hf.batch_size={n}",
        f"algo.prompts_per_step={sizes['prompts']}",
        f"algo.group_size={sizes['group']}",
        f"model.max_new_tokens={sizes['max_new']}",
    ]
    trainer = grpo_trainer(Path(folder) / "dphrl", _rows(sizes["prompts"]), extra)
    steps = []
    for k in range(sizes["warmup"] + sizes["steps"]):
        start = time.perf_counter()
        m = trainer.step()
        seconds = time.perf_counter() - start
        if k >= sizes["warmup"]:
            steps.append(
                {
                    "step_s": seconds,
                    "rollout_s": m["time_rollout"],
                    "reward_s": m["time_verify"],
                    "train_s": m["time_train"],
                    "sync_s": m["time_weight_sync"],
                    "tokens": m["response_len"] * n,
                    "reward_mean": m["reward_mean"],
                }
            )
    return {
        "side": "dphrl",
        "threads": torch.get_num_threads(),
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "steps": steps,
    }


def run_trl(sizes: dict, folder: str) -> dict:
    """Steps of TRL's GRPOTrainer on CPU with transformers generate, beta=0 (no ref model)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.train_step import _status_kib
    from dphrl.config import TaskConfig
    from dphrl.embedded import resolve_model_path
    from dphrl.tasks import get_task

    torch.set_num_threads(THREADS)
    model_path = resolve_model_path(f"embedded:{MODEL}")
    rows = _rows(sizes["prompts"])
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]} for r in rows]
    )
    task, task_cfg = get_task("arith"), TaskConfig(workers=1)
    timing = {"generate_s": 0.0, "reward_s": 0.0, "tokens": 0, "rewards": []}

    def arith_reward(completions, ground_truth, **_):
        start = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [v.reward for v in task.verify(texts, list(ground_truth), task_cfg)]
        timing["reward_s"] += time.perf_counter() - start
        timing["rewards"] += rewards
        return rewards

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            start = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            timing["generate_s"] += time.perf_counter() - start
            timing["tokens"] += sum(len(c) for c in out[0])
            return out

    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()
            timing.update(generate_s=0.0, reward_s=0.0, tokens=0, rewards=[])

        def on_step_end(self, args, state, control, **kw):
            steps.append(
                {
                    "step_s": time.perf_counter() - self.start,
                    "rollout_s": timing["generate_s"],
                    "reward_s": timing["reward_s"],
                    "tokens": timing["tokens"],
                    "reward_mean": statistics.fmean(timing["rewards"] or [0.0]),
                }
            )

    n = sizes["prompts"] * sizes["group"]
    args = GRPOConfig(
        output_dir=f"{folder}/trl",
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=sizes["group"],
        num_iterations=1,
        max_completion_length=sizes["max_new"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=sizes["warmup"] + sizes["steps"],
        shuffle_dataset=False,
        use_vllm=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        log_completions=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = Timed(
        model=model,
        reward_funcs=arith_reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.train()
    for s in steps:
        s["train_s"] = s["step_s"] - s["rollout_s"] - s["reward_s"]
        s["sync_s"] = 0.0
    return {
        "side": "trl",
        "threads": torch.get_num_threads(),
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "steps": steps[sizes["warmup"] :],
    }


def _subprocess(side: str, sizes: dict, folder: str) -> dict:
    from benchmarks.train_step import env

    cmd = [sys.executable, __file__, "--worker", side, json.dumps(sizes), folder]
    # Time only, so malloc keeps its defaults: train_step's fixed mmap threshold (there so RSS
    # follows live tensors) page-faults every large allocation, a cost no real run pays.
    worker_env = {k: v for k, v in env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=worker_env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"trl_step {side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> dict[str, float]:
    """Both sides alternating; write BENCHMARKS.md's section and results.json."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import publish

    sizes = QUICK if quick else FULL
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(sizes["repeats"]):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                runs[side].append(_subprocess(side, sizes, folder))
                print(f"trl_step: {side} round {r}: {runs[side][-1]['steps']}", flush=True)
    keys = ("step_s", "rollout_s", "reward_s", "train_s", "sync_s", "tokens", "reward_mean")
    med = {
        side: {k: statistics.median(s[k] for r in rs for s in r["steps"]) for k in keys}
        for side, rs in runs.items()
    }
    ours, trl = med["dphrl"], med["trl"]
    ratio = ours["step_s"] / trl["step_s"]

    def seconds_per_token(side: str) -> float:  # over all timed steps: lengths vary per step
        steps = [s for r in runs[side] for s in r["steps"]]
        return sum(s["step_s"] for s in steps) / max(sum(s["tokens"] for s in steps), 1)

    per_token = seconds_per_token("dphrl") / seconds_per_token("trl")
    results = {
        "trl_step_time_ours_over_trl": ratio,
        "trl_step_time_per_token_ours_over_trl": per_token,
        "trl_step_rollout_time_ours_over_trl": ours["rollout_s"] / trl["rollout_s"],
        "trl_step_train_time_ours_over_trl": (ours["train_s"] + ours["sync_s"]) / trl["train_s"],
    }
    rows = "\n".join(
        f"| {side} | {m['step_s']:.1f} | {m['rollout_s']:.1f} | {m['reward_s']:.2f} "
        f"| {m['train_s']:.1f} | {m['sync_s']:.2f} | {m['tokens']:.0f} | {m['reward_mean']:.2f} |"
        for side, m in med.items()
    )
    n = sizes["prompts"] * sizes["group"]
    verdict = "meets" if ratio <= 0.5 else "misses"
    body = f"""
One GRPO step on the embedded default initial policy (SmolLM2-135M-Instruct after its arith
warm-up; the same weights on both sides; float32, CPU, {THREADS} torch thread(s) each): the same {sizes["prompts"]} arith prompt(s) x group {sizes["group"]} = {n} rollouts, at most
{sizes["max_new"]} new tokens, temperature 1.0, top_p 1.0, eager transformers models on both sides
(TRL `use_vllm=False`: `generate`; dphrl `engine=hf`: its decode loop, a prompt prefilled once per
group, finished rows dropped), dphrl's arith verifier as the reward on both, PPO-clip 0.2,
token-mean loss, one AdamW step (lr {LR}, constant, grad clip 1.0) over the whole batch, no
reference model (dphrl `divergence=none`, TRL `beta=0`). Each side in a fresh process,
{sizes["repeats"]} alternating round(s) of {sizes["warmup"]} warm-up + {sizes["steps"]} timed step(s);
medians, seconds.{" Quick sizes." if quick else ""}

| side | step | rollout | reward | train | weight sync | generated tokens | mean reward |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

**dphrl / TRL time per step: {ratio:.2f}x** (target <= 0.5x: {verdict} it); per generated token
{per_token:.2f}x (all timed steps' seconds over their tokens); rollout {results["trl_step_rollout_time_ours_over_trl"]:.2f}x; train (dphrl's
train + weight sync vs TRL's step minus generation and reward)
{results["trl_step_train_time_ours_over_trl"]:.2f}x.

TRL's train column holds everything in its step but generation and reward (its log-prob
forward over one padded row per response, backward, optimizer, logging). dphrl's train holds
packing, advantages, the loss forward over shared-prefix rows (a group's prompt once, no
padding; only responses with a nonzero advantage) and backward, and the fused AdamW step.
Generation length is random per side (different samplers), so the generated-token counts
differ; the per-token ratio corrects for that to first order.
"""
    return publish(
        "trl_step", "Full GRPO step: dphrl train vs TRL GRPOTrainer", body, results, quick
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch (about two minutes)")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "SIZES", "FOLDER"))
    args = parser.parse_args()
    if args.worker:
        side, sizes, folder = args.worker
        sys.path.insert(0, str(ROOT))
        fn = run_dphrl if side == "dphrl" else run_trl
        print(json.dumps(fn(json.loads(sizes), folder)))
    else:
        print(json.dumps(main(quick=args.quick), indent=2))
