"""Supervised warm-up: the embedded initial policy, made once from the embedded base model.

Why it exists: DPH-RL starts from an *instruct* model that already answers in the task's
format, so that some prompts are solved in every sample (D_pef) and others are not (D_exp).
The only small instruct model found in a wheel, SmolLM2-135M-Instruct, does not follow the
arith task's format at the temperature RL samples at: at 1.0 its answers wander into prose,
it solves no prompt in all 8 samples, and few-shot prompts made it worse (measured; see
`dphrl/tasks/arith.py`). A short supervised fine-tune on worked answers of the task's shape,
drawn from a seed stream that training and evaluation never use, gives it that format; it
plays the role the instruct model plays in the paper. It is built on first use and cached
like the GGUF conversion (`dphrl.models`), so every command and every run share one
initial policy.

The loss is the usual next-token cross-entropy on the response tokens only (prompt tokens
are context), averaged over the batch's response tokens:

    L = - sum_{i, t in response_i} log p(y_{i,t} | x_i, y_{i,<t}) / sum_i |response_i|
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How an embedded warmed-up model is made from its base (all of it goes into the folder).

    task: whose `warmup_examples(count, seed)` give (prompt messages, response text) pairs.
    version: bumped when those examples change, so the cache makes a new model.
    """

    base: str
    task: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    version: int = 1


def warm_up(
    base_path: str, examples: list[tuple[list[dict], str]], out: Path, recipe: Recipe
) -> dict:
    """Fine-tune the model at `base_path` on `examples` (one pass, in order) and save it to `out`.

    Runs in float32 on the CPU with every core; deterministic for a recipe. Returns the
    figures worth keeping (seconds, first and last loss, tokens seen).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dphrl.data import render_prompts
    from dphrl.progress import track

    torch.manual_seed(recipe.seed)
    # not models.load_tokenizer: models calls this module, and imports point one way
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    prompt_ids, kept = render_prompts(tokenizer, [m for m, _ in examples], max_len=10_000)
    eos = tokenizer.eos_token_id
    pairs = [
        (prompt_ids[j], tokenizer(examples[i][1], add_special_tokens=False)["input_ids"] + [eos])
        for j, i in enumerate(kept)
    ]
    losses, tokens, started = [], 0, time.time()
    with track(f"warm-up of {recipe.base} on {recipe.task}", recipe.steps, "steps") as progress:
        for step in range(recipe.steps):
            batch = pairs[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            input_ids, labels, mask = _pad(batch, tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(mask.sum())
            progress.advance()
            if step % 10 == 0 or step == recipe.steps - 1:
                log.info("warm-up step %d/%d: loss %.3f", step + 1, recipe.steps, losses[-1])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stats = {
        "seconds": round(time.time() - started, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "tokens": tokens,
        "recipe": asdict(recipe),
    }
    (out / "warmup.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input ids, labels with -100 on prompt and padding, attention mask)."""
    import torch

    width = max(len(p) + len(r) for p, r in batch)
    ids, labels, mask = [], [], []
    for prompt, response in batch:
        seq = prompt + response
        fill = width - len(seq)
        ids.append(seq + [pad_id] * fill)
        labels.append([-100] * len(prompt) + response + [-100] * fill)
        mask.append([1] * len(seq) + [0] * fill)
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(mask)  # (B, T) each


def build(recipe: Recipe, base_path: str, out: Path) -> dict:
    """Make the warmed-up model of `recipe` from the resolved base folder into `out`."""
    from dphrl.tasks import get_task

    task = get_task(recipe.task)
    examples = task.warmup_examples(recipe.steps * recipe.batch_size, recipe.seed)
    random.Random(recipe.seed).shuffle(examples)
    log.info(
        "warming up %s on %d worked %s answers (made once, then cached)",
        recipe.base,
        len(examples),
        recipe.task,
    )
    return warm_up(base_path, examples, out, recipe)
