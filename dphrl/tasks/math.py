"""Math tasks (`math`, `gsm8k`): final-answer extraction and verification through math-verify.

The final answer of a completion is the content of its last closed `\\boxed{...}` (nested
braces handled), else the text after GSM8K's last `####`, else (only where a task asks for it,
as `arith` does) the last number. Extracted answers and ground truths are both parsed by
math-verify as LaTeX, so `\\frac{1}{2}` matches `0.5`, `1,000` matches `1000` and
`\\text{(B)}` matches `B`, where string matching would fail.

Time limits: math-verify's own limit uses `signal.alarm` with whole seconds and raises in any
thread but the main one, and it swallows a timeout into "wrong". So dphrl switches it off and
puts one deadline of its own (`signal.setitimer`, fractional seconds) around the whole item:
parse the truth, parse the answer, compare. A timeout or an exception scores 0 with
`error='timeout'` / `'exception'`, for the caller to count; nothing is raised for a bad
completion. Where signals are unavailable (a non-main thread), and for large batches, the items
go to worker processes (`dphrl.tasks.workerpool`, shared with SQL), whose main threads can
take signals; the pool replaces a worker stuck in C code that the signal cannot interrupt.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from dphrl.data import check_rows, columns_of, limit_rows, read_rows
from dphrl.errors import ConfigError, DataError
from dphrl.tasks import Verdict
from dphrl.tasks.workerpool import WorkerPool, cpu_count, shared_pool

if TYPE_CHECKING:
    from dphrl.config import TaskConfig

# Below this many items, verifying in-process beats starting and feeding worker processes.
PARALLEL_MIN = 64
# How long past an item's own deadline the pool kills its worker (a parse stuck in C code).
KILL_GRACE_S = 5.0
PROMPT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


class _Deadline(BaseException):
    """Raised by the per-item alarm; a BaseException so that math-verify's and sympy's
    `except Exception` blocks cannot swallow it into a wrong answer."""


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` / `\\fbox{...}`; braces inside may nest.

    An unclosed box (a completion cut off at max_new_tokens) or an empty one (small models
    write "= 7 in \\boxed{}") is skipped, so an earlier complete one still counts.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    if text[start:i].strip():
                        return text[start:i].strip()
                    break
    return None


def after_hashes(text: str) -> str | None:
    """GSM8K's final-answer form: the rest of the line after the last `####`."""
    found = _HASHES.findall(text)
    if not found:
        return None
    answer = found[-1].strip().rstrip(".").strip()
    return answer or None


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators dropped (`arith`'s fallback)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, *, number_fallback: bool = False) -> str | None:
    """The final answer: last boxed, else `####`, else (if asked) the last number."""
    answer = last_boxed(text)
    if answer is None:
        answer = after_hashes(text)
    if answer is None and number_fallback:
        answer = last_number(text)
    return answer


# ---------------------------------------------------------------------------------------------
# Judging one item
# ---------------------------------------------------------------------------------------------


def _parse(answer: str) -> list:
    """math-verify's parse of one answer string as LaTeX (or a plain expression), untimed."""
    # A `$` inside the answer (GSM8K's currency) would close the math span early.
    body = answer.replace("\\$", "").replace("$", "").strip()
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return parse(f"${body}$", extraction_config=config, parsing_timeout=None)


def _key(parsed: list, answer: str) -> str:
    """A canonical string of the answer, so equal values (`0.5`, `1/2`) count as one."""
    value = parsed[0] if parsed else None
    if isinstance(value, sympy.Float):
        value = sympy.Rational(str(value))
    if isinstance(value, sympy.Basic):
        return str(value)
    return answer.strip()


def _judge(completion: str, ground_truth: str, number_fallback: bool) -> Verdict:
    answer = extract_answer(completion, number_fallback=number_fallback)
    if answer is None:
        return Verdict(0.0, None, "no_answer")
    gold = _parse(str(ground_truth))
    pred = _parse(answer)
    correct = verify(gold, pred, timeout_seconds=None)
    return Verdict(1.0 if correct else 0.0, _key(pred, answer), None)


def judge(
    completion: str, ground_truth: Any, timeout_s: float = 15.0, *, number_fallback: bool = False
) -> Verdict:
    """One verdict under a deadline of `timeout_s` seconds; never raises for a bad completion.

    Must run in a main thread (signals); `verify_batch` takes care of that for callers
    elsewhere.
    """
    previous_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    try:
        return _judge(completion, str(ground_truth), number_fallback)
    except _Deadline:
        return Verdict(0.0, None, "timeout")
    except Exception:  # a verifier bug on odd input scores 0 and is counted, never raised
        return Verdict(0.0, None, "exception")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer > 0:  # give back an outer alarm (pytest-timeout, a caller's own)
            left = previous_timer - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))


def _raise_deadline(signum: int, frame: Any) -> None:
    raise _Deadline


def score(completion: str, ground_truth: Any, timeout_s: float = 15.0) -> float:
    """1.0 if the completion's final answer equals `ground_truth` by math-verify, else 0.0.

    The stable entry point for scripts; a timeout or exception scores 0.0.
    """
    return _in_main_thread_or_pool([completion], [ground_truth], timeout_s, 1, False)[0].reward


# ---------------------------------------------------------------------------------------------
# Batches: in-process when small, else across worker processes
# ---------------------------------------------------------------------------------------------


def _quiet_worker() -> None:
    _quiet_math_verify()
    _parse("1")  # build math-verify's parser before the first item's deadline starts
    # The parent handles Ctrl-C; a worker interrupted mid-item would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _quiet_math_verify() -> None:
    # With its own timeouts off, math-verify warns once per process that it has no limit;
    # dphrl's deadline is the limit, so that warning would only mislead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _judge_item(item: tuple[str, Any, float, bool]) -> Verdict:
    """`judge` on one (completion, truth, timeout_s, number_fallback), in a worker process."""
    completion, truth, timeout_s, number_fallback = item
    return judge(completion, truth, timeout_s, number_fallback=number_fallback)


def verifier_pool(workers: int) -> WorkerPool:
    """The long-lived pool of math workers (0 = all cores), the one SQL uses too.

    Each item keeps its own deadline (the alarm in `judge`); the pool kills a worker stuck
    `KILL_GRACE_S` past it, where the alarm cannot reach (C code), and replaces it alone.
    """
    return shared_pool(_judge_item, workers, initializer=_quiet_worker, grace_s=KILL_GRACE_S)


_OUTCOMES = {"killed": "timeout", "crashed": "exception", "error": "exception"}


def _run_in_pool(
    pool: WorkerPool,
    completions: Sequence[str],
    truths: Sequence[Any],
    timeout_s: float,
    number_fallback: bool,
) -> list[Verdict]:
    """Verdicts in order; an item killed past its deadline scores 0 as a timeout."""
    items = [(c, t, timeout_s, number_fallback) for c, t in zip(completions, truths, strict=True)]
    return [
        done.value if done.status == "ok" else Verdict(0.0, None, _OUTCOMES[done.status])
        for done in pool.map(items, [timeout_s] * len(items))
    ]


def _in_main_thread_or_pool(
    completions: Sequence[str],
    truths: Sequence[Any],
    timeout_s: float,
    workers: int,
    number_fallback: bool,
    pool: WorkerPool | None = None,
) -> list[Verdict]:
    main = threading.current_thread() is threading.main_thread()
    if main and (workers <= 1 or len(completions) < PARALLEL_MIN):
        _quiet_math_verify()
        return [
            judge(c, t, timeout_s, number_fallback=number_fallback)
            for c, t in zip(completions, truths, strict=True)
        ]
    pool = pool or verifier_pool(workers)
    return _run_in_pool(pool, completions, truths, timeout_s, number_fallback)


def verify_batch(
    completions: Sequence[str],
    ground_truths: Sequence[Any],
    timeout_s: float = 15.0,
    workers: int = 0,
    *,
    number_fallback: bool = False,
    pool: WorkerPool | None = None,
) -> list[Verdict]:
    """One verdict per completion, using `workers` processes (0 = all cores) for big batches.

    Batches under `PARALLEL_MIN` items run in-process (start-up would dominate) unless the
    caller is not the main thread. Workers stay warm across calls (`verifier_pool`); they are
    not forked from the caller, so a script that calls this must keep its top level under
    `if __name__ == "__main__":`.
    """
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    if not completions:
        return []
    return _in_main_thread_or_pool(
        completions, ground_truths, timeout_s, workers or cpu_count(), number_fallback, pool
    )


# ---------------------------------------------------------------------------------------------
# Loading rows
# ---------------------------------------------------------------------------------------------


def gsm8k_answer(answer: str) -> str:
    """GSM8K's answer field is a worked solution ending "#### 42"; the answer is the part after."""
    final = after_hashes(answer)
    return final if final is not None else answer.strip()


def math_row(raw: dict, source: str, number: int, data_source: str) -> dict:
    """An official row from `{problem|question, answer}` (or MATH's `{problem, solution}`)."""
    question = raw.get("problem", raw.get("question"))
    if "answer" in raw:
        answer = gsm8k_answer(str(raw["answer"]))
    elif "solution" in raw:
        answer = last_boxed(str(raw["solution"]))
    else:
        answer = None
    if not isinstance(question, str) or answer is None:
        raise DataError(
            f"{source}:{number}: row has neither the official shape "
            '{"prompt": [...], "reward_model": {"ground_truth": "..."}} nor a math question '
            '{"problem" or "question": "...", "answer" or "solution": "..."}; ' + columns_of(raw)
        )
    row = {
        "data_source": raw.get("data_source", data_source),
        "prompt": [{"role": "user", "content": question.strip() + PROMPT_SUFFIX}],
        "reward_model": {"ground_truth": answer},
    }
    if "id" in raw:
        row["id"] = raw["id"]
    return row


def load_math_rows(path: str, data_source: str, limit: int | None = None) -> list[dict]:
    """Rows from an official-shape file or a simple math file (jsonl, json or parquet).

    Raises `DataError` naming the file and the 1-based row (the line, in a jsonl without blank
    lines) and what was expected; reading writes nothing.
    """
    raw_rows = read_rows(path)
    rows = []
    for number, raw in enumerate(raw_rows, start=1):
        if not isinstance(raw, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(raw).__name__}")
        if "prompt" in raw or "reward_model" in raw:
            rows.append(raw)
        else:
            rows.append(math_row(raw, path, number, data_source))
    rows = check_rows(rows, path)
    for number, row in enumerate(rows, start=1):
        truth = row["reward_model"]["ground_truth"]
        if not isinstance(truth, str | int | float) or isinstance(truth, bool):
            raise DataError(
                f"{path}:{number}: `reward_model.ground_truth` must be the answer string, got {type(truth).__name__}"
            )
        row["reward_model"]["ground_truth"] = str(truth)
    return limit_rows(rows, limit)


class MathTask:
    """`math` (MATH-style boxed answers) and `gsm8k`: rows from task.path / task.eval_path."""

    number_fallback = False

    def __init__(self, name: str = "math") -> None:
        self.name = name
        self._pool: WorkerPool | None = None

    def load(self, cfg: TaskConfig, split: str = "train") -> list[dict]:
        """Rows of `task.path` ("train") or `task.eval_path` ("eval"), the first `cfg.limit`."""
        key = {"train": "path", "eval": "eval_path"}.get(split)
        if key is None:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        path = getattr(cfg, key)
        if path is None:
            raise ConfigError(f"task={self.name} has no {split} data: set task.{key}=<rows file>")
        return load_math_rows(path, self.name, cfg.limit)

    def verify(
        self, completions: list[str], ground_truths: list[Any], cfg: TaskConfig
    ) -> list[Verdict]:
        """Verdicts under `cfg.timeout_s` per item, across `cfg.workers` processes for big batches."""
        workers = cfg.workers or cpu_count()
        self._pool = verifier_pool(workers)
        return verify_batch(
            completions,
            ground_truths,
            cfg.timeout_s,
            workers,
            number_fallback=self.number_fallback,
            pool=self._pool,
        )
