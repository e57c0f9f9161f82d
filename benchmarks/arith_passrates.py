"""Measure how the embedded 135M model does on each `arith` band (the figures in its docstring).

Samples k completions per prompt at temperature 1.0 with transformers' batched generate (left
padding, the chat template), verifies them with the task's verifier, and prints per band the
mean pass rate, the share of prompts solved in all k samples and the share solved in none.
That is what `dphrl split` will see: 8/8 prompts go to D_pef, the rest to D_exp.

    .venv/bin/python benchmarks/arith_passrates.py --per-band 24
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dphrl.embedded import resolve_model_path
from dphrl.tasks.arith import BANDS, INSTRUCTION, generate
from dphrl.tasks.math import verify_batch


def sample(
    model, tokenizer, prompts: list[str], k: int, max_new_tokens: int, batch: int
) -> list[str]:
    """k completions per prompt, in prompt order."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
        for _ in range(k)
    ]
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            texts[start : start + batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-band", type=int, default=24)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instruction", default=None, help="replace the task's answer-format line")
    parser.add_argument("--show", type=int, default=0, help="print this many completions per band")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    path = resolve_model_path("embedded:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    cfg = SimpleNamespace(timeout_s=5.0, workers=1)

    rows = generate("train")
    print(
        f"k={args.k} temperature=1.0 max_new_tokens={args.max_new_tokens} prompts/band={args.per_band}"
    )
    for band in range(len(BANDS)):
        chosen = [r for r in rows if r["extra_info"]["band"] == band][: args.per_band]
        prompts = [r["prompt"][0]["content"] for r in chosen]
        if args.instruction is not None:
            prompts = [
                p.removesuffix(INSTRUCTION) + args.instruction.replace("\\n", "\n") for p in prompts
            ]
        truths = [r["reward_model"]["ground_truth"] for r in chosen]
        started = time.time()
        completions = sample(model, tokenizer, prompts, args.k, args.max_new_tokens, args.batch)
        verdicts = verify_batch(
            completions,
            [t for t in truths for _ in range(args.k)],
            cfg.timeout_s,
            cfg.workers,
            number_fallback=True,
        )
        rewards = [v.reward for v in verdicts]
        per_prompt = [sum(rewards[i * args.k : (i + 1) * args.k]) for i in range(len(prompts))]
        boxed = sum("\\boxed" in c for c in completions) / len(completions)
        print(
            f"band {band}: mean pass rate {sum(rewards) / len(rewards):.2f}, "
            f"prompts at {args.k}/{args.k}: {sum(s == args.k for s in per_prompt) / len(prompts):.2f}, "
            f"at 0/{args.k}: {sum(s == 0 for s in per_prompt) / len(prompts):.2f}, "
            f"boxed {boxed:.2f}, {time.time() - started:.0f}s"
        )
        for c, t in list(zip(completions, [t for t in truths for _ in range(args.k)], strict=True))[
            : args.show
        ]:
            print(f"  [truth {t}] {c!r}")


if __name__ == "__main__":
    main()
