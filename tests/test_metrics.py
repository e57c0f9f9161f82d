"""Metrics: the jsonl record, resume truncation, tensorboard events, timer, rank reduction."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from dphrl.errors import DphrlError
from dphrl.metrics import METRICS_FILE, MetricsLogger, Timer, format_line, reduce_metrics


def _logger(run_dir, **kwargs) -> tuple[MetricsLogger, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    return MetricsLogger(run_dir, console=console, **kwargs), out


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_jsonl_has_one_line_per_step(tmp_path):
    logger, out = _logger(tmp_path, tensorboard=False)
    with logger:
        logger.log(1, {"reward_mean": 0.5, "pg_loss": -0.25})
        logger.log(2, {"reward_mean": 0.75, "pg_loss": float("nan")})
        assert len(_rows(tmp_path)) == 2  # flushed per step, readable while the run goes on
    assert _rows(tmp_path) == [
        {"step": 1, "reward_mean": 0.5, "pg_loss": -0.25},
        {"step": 2, "reward_mean": 0.75, "pg_loss": None},  # strict JSON: no NaN literal
    ]
    assert "step 2 | reward 0.750" in out.getvalue()


def test_truncate_after_drops_redone_steps_and_torn_tail(tmp_path):
    logger, _ = _logger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"reward_mean": step / 10})
    logger.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "rew')  # a write cut by a kill

    resumed, _ = _logger(tmp_path, tensorboard=False)
    resumed.truncate_after(3)
    assert [row["step"] for row in _rows(tmp_path)] == [1, 2, 3]
    resumed.log(4, {"reward_mean": 0.9})
    resumed.close()
    assert [row["step"] for row in _rows(tmp_path)] == [1, 2, 3, 4]
    assert _rows(tmp_path)[-1]["reward_mean"] == 0.9


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger, _ = _logger(tmp_path, tensorboard=True)
    with logger:
        for step in (1, 2, 3):
            logger.log(step, {"reward_mean": step / 4, "time_rollout": 0.1})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [
        (1, 0.25),
        (2, 0.5),
        (3, 0.75),
    ]


def test_disabled_logger_writes_nothing(tmp_path):
    logger, out = _logger(tmp_path / "run", tensorboard=True, enabled=False)
    logger.log(1, {"reward_mean": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "run").exists() and out.getvalue() == ""


def test_wandb_missing_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here")
    with pytest.raises(DphrlError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb=True, enabled=False)  # every rank fails alike


def test_console_line_formats_key_metrics_and_time_split():
    line = format_line(
        7, {"reward_mean": 0.5, "lr": 1e-6, "time_rollout": 1.234, "time_train": 0.5, "other": 3}
    )
    assert (
        line
        == "[bold]step 7[/bold] | reward 0.500 | lr 1.00e-06 | [dim]rollout 1.23s train 0.50s[/dim]"
    )
    # a divergence that is small early in a run must not print as 0.0000
    assert "div 2.5e-07" in format_line(1, {"div_loss": 2.5e-7})


def test_timer_accumulates_per_phase_and_pops():
    timer = Timer()
    for _ in range(2):
        with timer("rollout"):
            time.sleep(0.01)
    with timer("verify"):
        pass
    split = timer.pop()
    assert set(split) == {"time_rollout", "time_verify"}
    assert split["time_rollout"] >= 0.02 and split["time_verify"] < split["time_rollout"]
    assert timer.pop() == {}
    with timer("train"):
        pass
    assert set(timer.totals()) == {"train"}
    timer.reset()
    assert timer.totals() == {}


def test_timer_counts_a_phase_that_raises():
    timer = Timer()
    with pytest.raises(RuntimeError), timer("train"):
        raise RuntimeError("boom")
    assert "time_train" in timer.pop()


def test_reduce_is_identity_without_distributed():
    metrics = {"reward_mean": 0.5, "pg_loss": -1.0}
    assert reduce_metrics(metrics) == metrics


def _pythonpath() -> str:
    """This checkout first, so the torchrun script imports this dphrl, installed or not."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


_REDUCE_SCRIPT = """
import torch.distributed as dist
from dphrl.metrics import reduce_metrics
dist.init_process_group("gloo")
rank = dist.get_rank()
mine = {"reward_mean": float(rank), "tokens": 10.0 * (rank + 1), "x_max": 3.0 - 2 * rank}
out = reduce_metrics(mine, sum_keys=["tokens"])
assert out == {"reward_mean": 0.5, "tokens": 30.0, "x_max": 3.0}, out
print("reduced", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_reduce_averages_across_gloo_ranks_and_keeps_maxima(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(_REDUCE_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reduced") == 2


def test_tensorboard_forgets_redone_steps_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, _ = _logger(tmp_path, tensorboard=True)
    with first:
        for step in range(1, 6):
            first.log(step, {"reward_mean": float(step)})
    time.sleep(1.1)  # event file names carry the second they were opened in
    resumed, _ = _logger(tmp_path, tensorboard=True)
    resumed.truncate_after(3)
    with resumed:
        resumed.log(4, {"reward_mean": 40.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 40),
    ]


def test_console_line_shows_the_rehearsal_forgetting():
    line = format_line(3, {"kl_ref": 0.01, "ref_forgot_frac": 0.25, "ref_logratio_seq": -0.4})
    assert "kl 0.01 | forgot 0.25" in line and "logratio" not in line  # the jsonl has the rest
