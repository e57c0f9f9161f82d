"""Every command line the shipped scripts run, composed and validated as the CLI would.

Each script runs with DRY_RUN=1 (it prints its `+ command` lines and runs none of them) on
stand-in data folders; every dphrl line it prints (a `--multirun` line: every job of its sweep)
must compose, validate, resolve its layout and load its data. On this CPU the only error
allowed is a GPU layout's "needs CUDA". A line that reads what an earlier one writes (the
quickstart's D_pef set) gets a stand-in of it. scripts/reproduce_small.sh is not here: most of
its lines read what earlier lines wrote, and tests/commands/test_reproduce.py runs it for real.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
from itertools import product
from pathlib import Path

import pytest

from dphrl.errors import ConfigError
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("split", "precompute-ref", "train", "eval-passk")


def _database(folder: Path, db_id: str) -> None:
    (folder / db_id).mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(folder / db_id / f"{db_id}.sqlite") as db:
        db.execute("CREATE TABLE singer (name TEXT, age INTEGER)")
        db.execute("INSERT INTO singer VALUES ('Ann', 30)")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """BIRD and Spider folders in their published layouts, one question each."""
    import json

    root = tmp_path_factory.mktemp("data")
    bird, spider = root / "bird", root / "spider"
    row = {"question": "How many singers?", "evidence": "", "SQL": "SELECT count(*) FROM singer"}
    for part, dbs in (("train", "train_databases"), ("dev", "dev_databases")):
        (bird / part).mkdir(parents=True)
        (bird / part / f"{part}.json").write_text(json.dumps([{**row, "db_id": "concert"}]))
        _database(bird / part / dbs, "concert")
    spider.mkdir()
    spider_row = {"question": "How many singers?", "query": "SELECT count(*) FROM singer"}
    (spider / "dev.json").write_text(json.dumps([{**spider_row, "db_id": "concert"}]))
    _database(spider / "database", "concert")
    return {"BIRD": str(bird), "SPIDER": str(spider)}


def _printed_lines(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1", **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def _dphrl_call(argv: list[str]) -> tuple[str, list[str], int]:
    """(command, overrides, processes) of a printed line that runs dphrl."""
    nproc = 1
    if Path(argv[0]).name == "torchrun":
        nproc = int(argv[argv.index("--nproc_per_node") + 1])
        argv = argv[argv.index("dphrl") + 1 :]
    elif Path(argv[0]).name == "dphrl":
        argv = argv[1:]
    else:
        raise AssertionError(f"not a dphrl line: {argv}")
    return argv[0], argv[1:], nproc


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a line: itself, or every combination of a --multirun line's sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    if "--multirun" not in overrides:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides([o for o in overrides if o != "--multirun"])
    choices = [
        [f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    return [list(job) for job in product(*choices)]


def _check(command: str, overrides: list[str], nproc: int) -> None:
    """What `dphrl <command> ... dry_run=true` checks, and the layout torchrun would give it."""
    from dphrl import dist
    from dphrl.commands.eval_passk import dataset_specs, task_config
    from dphrl.tasks import get_task

    cfg = compose_config(overrides, command)
    if nproc > 1:
        assert cfg.layout.fsdp or command != "train", "torchrun train without FSDP"
    try:
        dist.resolve_layout(cfg.layout)
    except ConfigError as err:
        assert "needs CUDA" in str(err), err
    if command == "eval-passk":
        for spec in dataset_specs(cfg):
            task = task_config(cfg.task, spec, cfg.eval.db_roots)
            assert get_task(task.name).load(task, "eval"), spec
    else:
        assert get_task(cfg.task.name).load(cfg.task, "train")


@pytest.mark.slow
def test_every_line_of_the_paper_script_composes(stand_ins, tmp_path):
    lines = _printed_lines("paper_bird_8gpu.sh", {**stand_ins, "OUT": str(tmp_path)})
    calls = [_dphrl_call(argv) for argv in lines]
    assert [c[0] for c in calls] == ["split", "precompute-ref", *["train"] * 6, "eval-passk"]
    for command, overrides, nproc in calls:
        for job in _jobs(overrides):
            _check(command, job, nproc)


@pytest.mark.parametrize("script", ["quickstart.sh", "sweep_divergences.sh"])
def test_every_line_of_the_cpu_scripts_composes(script, tmp_path):
    # the quickstart evaluates the D_pef file its split line writes: a stand-in of it, in a
    # split.out given to every line as the script's overrides are
    from dphrl.data import write_jsonl
    from dphrl.tasks import arith

    write_jsonl(tmp_path / "split" / "pef.jsonl", arith.generate("train")[:1])
    args = [f"split.out={tmp_path}/split"] if script == "quickstart.sh" else []
    lines = _printed_lines(script, {"RUN": str(tmp_path), "OUT": str(tmp_path)}, *args)
    assert lines
    for argv in lines:
        command, overrides, nproc = _dphrl_call(argv)
        for job in _jobs(overrides):
            _check(command, job, nproc)
