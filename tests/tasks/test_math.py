"""The math verifier and loader: real math-verify on tiny inputs, no model."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dphrl.errors import ConfigError, DataError
from dphrl.tasks import Verdict, get_task
from dphrl.tasks import math as mt


def cfg(**kw):
    base = dict(path=None, eval_path=None, limit=None, timeout_s=5.0, workers=1)
    return SimpleNamespace(**{**base, **kw})


# --- extraction --------------------------------------------------------------------------------


def test_last_boxed_handles_nested_braces_and_takes_the_last():
    text = r"First \boxed{1}. Then \boxed{\frac{\sqrt{3}}{2}} is final."
    assert mt.last_boxed(text) == r"\frac{\sqrt{3}}{2}"


def test_last_boxed_skips_an_unclosed_box_cut_off_at_the_token_limit():
    assert mt.last_boxed(r"\boxed{12} so far, and then \boxed{\frac{1}{") == "12"
    assert mt.last_boxed("no box here") is None


def test_hashes_form_and_last_number_fallback():
    assert mt.extract_answer("She has 3 + 4 = 7 left.\n#### 7") == "7"
    assert mt.extract_answer("The answer is 1,234 apples.") is None
    assert mt.extract_answer("The answer is 1,234 apples.", number_fallback=True) == "1234"
    assert mt.extract_answer(r"#### 5 but \boxed{6}") == "6"  # boxed wins


# --- verification where string matching fails -------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "truth"),
    [
        (r"So the result is \boxed{\frac{1}{2}}.", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1,000}", "1000"),
        (r"The answer is \boxed{\text{(B)}}", "B"),
        (r"\boxed{\dfrac{\sqrt3}2}", r"\frac{\sqrt{3}}{2}"),
        ("Total: 18 dollars.\n#### $18", "18"),
        (r"\boxed{x+1}", "1+x"),
    ],
)
def test_math_verify_accepts_equal_values_in_other_forms(completion, truth):
    assert completion.split("boxed")[-1] != truth  # string matching alone would fail
    assert mt.score(completion, truth) == 1.0


def test_wrong_and_missing_answers_score_zero_with_reasons():
    wrong, missing = mt.verify_batch([r"\boxed{3}", "I do not know"], ["5", "5"], 5.0, 1)
    assert wrong == Verdict(0.0, "3", None)
    assert missing == Verdict(0.0, None, "no_answer")


def test_equal_values_share_one_answer_key():
    a, b = mt.verify_batch([r"\boxed{0.5}", r"\boxed{\frac{1}{2}}"], ["1/2", "1/2"], 5.0, 1)
    assert a.reward == b.reward == 1.0 and a.answer == b.answer


# --- time limits --------------------------------------------------------------------------------

HUGE = r"\boxed{9^{9^{9^{9}}}}"  # sympy tries to evaluate this for far longer than any limit


def test_timeout_is_counted_not_raised():
    (verdict,) = mt.verify_batch([HUGE], ["5"], timeout_s=0.3, workers=1)
    assert verdict == Verdict(0.0, None, "timeout")


def test_timeout_restores_an_outer_alarm():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        mt.score(HUGE, "5", timeout_s=0.2)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left < 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_exception_in_the_verifier_is_counted(monkeypatch):
    def boom(answer):
        raise RuntimeError("verifier bug")

    monkeypatch.setattr(mt, "_parse", boom)
    assert mt.score(r"\boxed{1}", "1") == 0.0
    (verdict,) = mt.verify_batch([r"\boxed{1}"], ["1"], 5.0, 1)
    assert verdict.error == "exception"


def test_non_main_thread_goes_through_worker_processes():
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(
            v=mt.verify_batch([r"\boxed{\frac{1}{2}}", HUGE], ["0.5", "1"], 1.0, 1)
        )
    )
    thread.start()
    thread.join(120)
    assert [v.reward for v in out["v"]] == [1.0, 0.0]
    assert out["v"][1].error == "timeout"


def test_large_batches_use_a_pool_and_keep_order():
    task = get_task("math")
    completions = [rf"\boxed{{{i}}}" for i in range(mt.PARALLEL_MIN)]
    truths = [str(i if i % 3 else i + 1) for i in range(mt.PARALLEL_MIN)]
    try:
        verdicts = task.verify(completions, truths, cfg(workers=2))
        assert task._pool._pool is not None  # the workers stay for the next batch
    finally:
        task._pool.close()
    assert [v.reward for v in verdicts] == [
        0.0 if i % 3 == 0 else 1.0 for i in range(mt.PARALLEL_MIN)
    ]


# --- loading --------------------------------------------------------------------------------------

OFFICIAL = [
    {
        "data_source": "math",
        "prompt": [{"role": "user", "content": "1+1?"}],
        "reward_model": {"ground_truth": "2"},
    },
    {
        "data_source": "math",
        "prompt": [{"role": "user", "content": "half?"}],
        "reward_model": {"ground_truth": r"\frac{1}{2}"},
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_official_rows_from_jsonl_and_parquet_agree(tmp_path):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", OFFICIAL)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(OFFICIAL), parquet)
    from_jsonl = get_task("math").load(cfg(path=jsonl))
    from_parquet = get_task("math").load(cfg(path=str(parquet)))
    assert from_jsonl == from_parquet
    assert [r["reward_model"]["ground_truth"] for r in from_jsonl] == ["2", r"\frac{1}{2}"]
    assert [r["id"] for r in from_jsonl] == [0, 1]


def test_simple_math_and_gsm8k_rows_are_converted(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {
                "question": "Tom has 3 apples and buys 4. How many?",
                "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
            },
            {"problem": "What is half of 1?", "answer": r"\frac{1}{2}"},
            {"problem": "Solve.", "solution": r"It is \boxed{\frac{3}{4}}."},
        ],
    )
    rows = get_task("gsm8k").load(cfg(path=path, limit=2))
    assert len(rows) == 2
    assert rows[0]["reward_model"]["ground_truth"] == "7"
    assert rows[0]["data_source"] == "gsm8k"
    assert rows[0]["prompt"][0]["content"].endswith(r"within \boxed{}.")
    assert rows[1]["reward_model"]["ground_truth"] == r"\frac{1}{2}"
    assert (
        get_task("math").load(cfg(path=path))[2]["reward_model"]["ground_truth"] == r"\frac{3}{4}"
    )


def test_row_without_fields_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}, {"question": "no answer"}]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*question.*answer"):
        get_task("math").load(cfg(path=path))


def test_unreadable_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(OFFICIAL[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        get_task("math").load(cfg(path=str(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl"]  # nothing written


def test_official_row_with_a_non_string_truth_is_rejected(tmp_path):
    row = {**OFFICIAL[0], "reward_model": {"ground_truth": {"gold_sql": "SELECT 1"}}}
    path = write_jsonl(tmp_path / "sql.jsonl", [OFFICIAL[0], row])
    with pytest.raises(DataError, match=r"sql\.jsonl:2: .*ground_truth"):
        get_task("math").load(cfg(path=path))


def test_eval_split_without_eval_path_says_what_to_set():
    with pytest.raises(ConfigError, match="task.eval_path"):
        get_task("math").load(cfg(path="x"), "eval")
