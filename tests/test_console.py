"""What the console shows: dphrl's own lines and progress; third-party logging in the log file."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from dphrl.logs import ConsoleFilter, route
from dphrl.progress import plain_line, track


def test_plain_line_says_done_total_rate_and_eta():
    assert plain_line("split", 30, 120, 10.0, "prompts") == (
        "split: 30/120 prompts (25%), 3.00 prompts/s, ETA 30s"
    )
    # a resumed run's skipped work is not in the rate
    assert plain_line("split", 60, 120, 10.0, "prompts", skipped=30).endswith("ETA 20s")
    assert plain_line("train", 4, 4, 125.0, "steps").endswith("done in 2m05s")


def test_non_terminal_progress_prints_at_most_every_interval(monkeypatch):
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    monkeypatch.setenv("DPHRL_PROGRESS_SECONDS", "3600")
    with track("stage", 10, "items", console=console) as progress:
        for _ in range(10):
            progress.advance()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("stage: 0/10 items") and lines[1].startswith("stage: 10/10 items")
    assert len(lines) == 2  # no line in between: the interval never passed
    monkeypatch.setenv("DPHRL_PROGRESS_SECONDS", "0")
    out.truncate(0)
    out.seek(0)
    with track("stage", 3, "items", console=console) as progress:
        progress.advance(3)
    assert len(out.getvalue().splitlines()) == 2  # start and end; the last advance is the end


def test_console_filter_keeps_own_lines_and_any_error():
    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    keep = ConsoleFilter().filter
    assert keep(record("dphrl.presample.split", logging.INFO))
    assert not keep(record("vllm.engine", logging.INFO))
    assert not keep(record("py.warnings", logging.WARNING))
    assert keep(record("transformers.modeling_utils", logging.ERROR))


def test_route_filters_the_console_not_the_file(tmp_path, monkeypatch):
    for name in ("VLLM_CONFIGURE_LOGGING", "TQDM_DISABLE"):  # unset here, restored after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    root = logging.getLogger()
    console_out = io.StringIO()
    console = logging.StreamHandler(console_out)
    file = logging.FileHandler(tmp_path / "run.log")
    saved = root.handlers[:], root.level
    root.handlers[:] = [console, file]
    root.setLevel(logging.INFO)
    try:
        route(verbose=False)
        logging.getLogger("vllm.worker").info("kernel registered")
        logging.getLogger("dphrl.commands.split").info("chunk done")
        logging.getLogger("somelib.cuda").error("out of memory")
        assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0" and os.environ["TQDM_DISABLE"] == "1"
        route(verbose=True)
        logging.getLogger("vllm.worker").info("shown when verbose")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.captureWarnings(False)
        file.close()
    shown = console_out.getvalue()
    assert "chunk done" in shown and "out of memory" in shown
    assert "kernel registered" not in shown and "shown when verbose" in shown
    kept = (tmp_path / "run.log").read_text()
    assert "kernel registered" in kept and "chunk done" in kept


@pytest.mark.slow  # a CLI subprocess: ~25 s on the shared 2-core machine
def test_piped_split_shows_progress_and_no_third_party_info(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "COLUMNS": "120", "DPHRL_PROGRESS_SECONDS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "dphrl", "split", f"model.path={tiny_model_dir}", "engine=hf"]
        + ["task.limit=4", "split.k=2", "split.chunk_size=2", "model.max_new_tokens=4"]
        + [f"split.out={tmp_path / 'split'}", f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert re.search(
        r"split: 2 samples per prompt: 2/4 prompts \(50%\), [\d.]+ prompts/s, ETA", console
    )
    assert "4/4 prompts (100%)" in console and "split ->" in console  # the summary table
    for line in console.splitlines():
        logger = re.match(r"\[[^]]+\]\[([\w.]+)\]\[(\w+)\]", line)
        if logger:
            assert logger[1].startswith("dphrl") or logger[2] == "ERROR", line
    assert "Loading weights" not in console  # transformers' bar
    assert (run / "split.log").exists()
