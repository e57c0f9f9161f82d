"""The embedded arith task: deterministic, banded, correct, train and eval disjoint; no model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from dphrl.data import check_rows
from dphrl.tasks import arith, get_task


def cfg(**kw):
    base = dict(path=None, eval_path=None, limit=None, timeout_s=5.0, workers=1)
    return SimpleNamespace(**{**base, **kw})


def question(row):
    return row["prompt"][0]["content"].removesuffix(arith.INSTRUCTION)


def test_generation_is_deterministic_and_sized():
    task = get_task("arith")
    first, again = task.load(cfg()), task.load(cfg())
    assert first == again
    assert json.dumps(first) == json.dumps(arith.generate("train"))
    # band 0 is drawn but not served: about a sixth of train and a third of eval
    assert 0.8 * arith.TRAIN_SIZE < len(first) < arith.TRAIN_SIZE
    assert 0.6 * arith.EVAL_SIZE < len(task.load(cfg(), "eval")) < 0.7 * arith.EVAL_SIZE


def test_rows_have_the_official_shape():
    rows = get_task("arith").load(cfg(limit=5))
    assert len(rows) == 5
    assert check_rows([dict(r) for r in rows], "arith") == rows
    for row in rows:
        assert row["data_source"] == "arith"
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["prompt"][0]["content"].endswith(arith.INSTRUCTION)
        assert re.fullmatch(r"-?\d+", row["reward_model"]["ground_truth"])


def test_every_served_band_is_present_even_in_a_small_limit():
    rows = get_task("arith").load(cfg(limit=2))
    assert [r["extra_info"]["band"] for r in rows] == [1, 2]
    for split in ("train", "eval"):
        rows = arith.generate(split)
        assert {r["extra_info"]["band"] for r in rows} == set(arith.SERVED_BANDS)
        assert [r["id"] for r in rows] == list(range(len(rows)))


def test_answers_are_the_right_integers():
    for row in arith.generate("train") + arith.generate("eval"):
        q, truth = question(row), int(row["reward_model"]["ground_truth"])
        numbers = [int(n) for n in re.findall(r"\d+", q)]
        if row["extra_info"]["band"] < 2:
            assert truth == numbers[0] + numbers[1]
        elif "gives away" in q:
            assert truth == numbers[0] * numbers[1] - numbers[2] >= 1
        else:
            assert truth == numbers[0] * numbers[1] + numbers[2]


def test_train_and_eval_are_disjoint_and_have_no_duplicates():
    train = {question(r) for r in arith.generate("train")}
    held_out = {question(r) for r in arith.generate("eval")}
    assert len(train) == len(arith.generate("train"))
    assert len(held_out) == len(arith.generate("eval"))
    assert not train & held_out


def test_a_band_that_runs_out_drops_out_of_the_cycle():
    drawn = arith.problems(seed=7, count=200)
    assert len(drawn) == 200
    assert sum(band == 0 for band, *_ in drawn) <= 81  # single-digit sums: 9 x 9 questions


def test_verify_reads_boxed_answers_and_falls_back_to_the_last_number():
    task = get_task("arith")
    verdicts = task.verify(
        [r"3 + 4 = \boxed{7}", "3 + 4 = 7 in \\boxed{}", "The answer is 8.", "I cannot say."],
        ["7", "7", "7", "7"],
        cfg(),
    )
    assert [v.reward for v in verdicts] == [1.0, 1.0, 0.0, 0.0]
    assert verdicts[2].answer == "8"
    assert verdicts[3].error == "no_answer"


def test_math_does_not_use_the_last_number_fallback():
    (verdict,) = get_task("math").verify(["The answer is 7."], ["7"], cfg())
    assert verdict.error == "no_answer"


def test_a_given_path_replaces_the_embedded_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    rows = get_task("arith").load(cfg(path=str(path)))
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["4"]


def test_out_of_domain_set_is_other_operations_disjoint_from_train_and_eval():
    ood = arith.generate("ood")
    assert len(ood) == arith.OOD_SIZE
    seen = {question(r) for r in arith.generate("train") + arith.generate("eval")}
    for row in ood:
        q, truth = question(row), int(row["reward_model"]["ground_truth"])
        assert q not in seen
        a, op, b = re.fullmatch(r"What is (\d+) ([-x]) (\d+)\?", q).groups()
        assert truth == (int(a) - int(b) if op == "-" else int(a) * int(b))
    assert get_task("arith_ood").load(cfg(limit=3), "eval") == ood[:3]


def test_warmup_examples_are_worked_boxed_answers_never_from_the_evaluated_sets():
    examples = arith.warmup_examples(64, seed=0)
    assert examples == arith.warmup_examples(64, seed=0)
    taken = {question(r) for s in ("train", "eval", "ood") for r in arith.generate(s)}
    verdicts = get_task("arith").verify(
        [response for _, response in examples],
        [re.search(r"\\boxed\{(-?\d+)\}", response).group(1) for _, response in examples],
        cfg(),
    )
    assert all(v.reward == 1.0 for v in verdicts)
    for messages, response in examples:
        assert messages[0]["content"].removesuffix(arith.INSTRUCTION) not in taken
        assert re.fullmatch(r"(\d+ [-+x] \d+ = -?\d+\. )+\\boxed\{-?\d+\}", response)
    assert any(m[0]["content"].startswith("Add ") for m, _ in examples)  # the addition facts
