"""`dphrl report`: one table and one figure over the jobs of a sweep folder.

The fast tests build a sweep folder by hand (what Hydra and the commands leave), with exact
expected cells; the slow one runs a real two-job `dphrl train --multirun` and reports on it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dphrl.lock import folder_lock
from dphrl.report import load_runs, table, to_markdown, write_report

METRICS = {  # step -> (reward_mean, eval_greedy, eval_pass@1, eval_pass@4)
    "none": [(1, 0.25, None, None, None), (2, 0.5, 0.5, 0.25, 0.75), (3, 0.375, None, None, None)],
    "js": [(1, 0.5, 0.5, 0.5, 1.0), (2, 0.625, None, None, None)],
}


def make_job(sweep: Path, num: int, divergence: str, *, passk: bool) -> Path:
    """A job folder as `dphrl train --multirun` leaves it (plus an eval-passk's passk.json)."""
    job = sweep / f"{num}_divergence={divergence},trainer.max_steps=3"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"divergence={divergence}", "trainer.max_steps=3"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"run_dir": None}, "eval": {"out": None}})
    )
    keys = ("step", "reward_mean", "eval_greedy", "eval_pass@1", "eval_pass@4")
    rows = [{k: v for k, v in zip(keys, point) if v is not None} for point in METRICS[divergence]]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if passk:
        results = [
            {
                "model": str(job / "model"),
                "dataset": f"arith={sweep}/sets/{name}.jsonl",
                "greedy": greedy,
                "pass_at_k": {"1": p1, "2": p1 + 0.125, "4": 1.0},
            }
            for name, greedy, p1 in (("heldout", 0.5, 0.375), ("ood", 0.25, 0.125))
        ]
        (job / "passk.json").write_text(json.dumps({"settings": {}, "results": results}))
        (job / "model").mkdir()
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "multirun" / "train" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_job(sweep, 0, "none", passk=True)
    job = make_job(sweep, 1, "js", passk=False)
    with open(job / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_')  # a step being written: a torn last line
    return sweep


def test_rows_hold_overrides_final_and_best_metrics_passk_and_status(sweep):
    with folder_lock(sweep / "1_divergence=js,trainer.max_steps=3", "dphrl train"):
        rows = table(load_runs([sweep]))
    done, running = rows
    assert done["run"] == "0" and done["status"] == "done"
    assert running["status"] == "running" and running["steps"] == 2
    assert (done["divergence"], running["divergence"]) == ("none", "js")
    assert done["reward_mean"] == 0.375 and done["steps"] == 3
    assert (done["best reward_mean"], done["best reward_mean step"]) == (0.5, 2)
    assert (done["eval_pass@4"], running["best eval_greedy step"]) == (0.75, 1)
    assert done["arith=heldout.jsonl greedy"] == 0.5
    assert done["arith=ood.jsonl pass@2"] == 0.25
    assert running["arith=ood.jsonl pass@1"] is None  # no passk.json: empty cells
    assert table(load_runs([sweep]))[1]["status"] == "stopped"  # the lock's holder has gone


def test_markdown_puts_shared_overrides_above_and_best_with_its_step(sweep):
    md = to_markdown(table(load_runs([sweep]))).splitlines()
    assert md[0] == "Every run: `trainer.max_steps=3`"
    assert md[2] == (
        "| run | status | divergence | steps | reward_mean | best reward_mean | eval_greedy "
        "| best eval_greedy | eval_pass@1 | best eval_pass@1 | eval_pass@4 | best eval_pass@4 "
        "| arith=heldout.jsonl greedy | arith=heldout.jsonl pass@1 | arith=heldout.jsonl pass@4 "
        "| arith=ood.jsonl greedy | arith=ood.jsonl pass@1 | arith=ood.jsonl pass@4 |"
    )
    assert md[4] == (
        "| 0 | done | none | 3 | 0.375 | 0.500 @2 | 0.500 "
        "| 0.500 @2 | 0.250 | 0.250 @2 | 0.750 | 0.750 @2 | 0.500 | 0.375 | 1.000 | 0.250 "
        "| 0.125 | 1.000 |"
    )
    assert md[5].startswith("| 1 | stopped | js | 2 | 0.625 |")


def test_report_files_and_the_command(sweep, tmp_path):
    rows, md = write_report([sweep], tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == md
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text())))
    assert len(parsed) == 2 and parsed[0]["arith=heldout.jsonl pass@2"] == "0.5"
    assert parsed[0]["trainer.max_steps"] == "3" and parsed[1]["arith=ood.jsonl greedy"] == ""
    assert (tmp_path / "out" / "report.png").stat().st_size > 0

    env = {**os.environ, "COLUMNS": "100"}
    cli = [sys.executable, "-m", "dphrl", "report"]
    done = subprocess.run(cli + [str(sweep)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert md in done.stdout and "report: 2 rows ->" in done.stdout
    assert (sweep / "report.csv").exists()
    missing = tmp_path / "nothing"
    missing.mkdir()
    done = subprocess.run(
        cli + [str(missing)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and "no runs in" in done.stderr and "overrides.yaml" in done.stderr


@pytest.mark.slow  # a whole pipeline (split, ref store, two train jobs) on the tiny model: ~10 s
def test_report_of_a_real_two_job_sweep(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    train = [sys.executable, "-m", "dphrl", "train", "--multirun", "divergence=none,js"]
    train += [f"model.path={tiny_model_dir}", "engine=hf", "task.limit=8", "split.k=2"]
    train += ["trainer.max_steps=2", "algo.prompts_per_step=2", "algo.group_size=2"]
    train += ["model.max_new_tokens=8", "eval.every=1", "eval.limit=2", "eval.n=2"]
    train += ["eval.k=[1,2]", "ref.keep=all", f"hydra.sweep.dir={sweep}"]
    train += [f"split.out={tmp_path / 'split'}", f"ref.out={tmp_path / 'ref'}"]
    done = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, md = write_report([sweep], sweep)
    assert [(r["divergence"], r["status"], r["steps"]) for r in rows] == [
        ("none", "done", 2),
        ("js", "done", 2),
    ]
    assert all(0.0 <= r["best eval_pass@2"] <= 1.0 for r in rows)
    assert "eval_pass@2" in md.splitlines()[2]


def test_before_after_says_each_sets_change_and_whether_d_pef_was_kept():
    """The quickstart's last line: pass@1 and greedy of base -> trained per set; D_pef kept
    when pass@1 falls at most 2 points and greedy not at all."""
    from dphrl.report import before_after

    def result(model, dataset, p1, greedy):
        return {"model": model, "dataset": dataset, "prompts": 4, "greedy": greedy,
                "pass_at_k": {"1": p1, "8": 1.0}}  # fmt: skip

    results = [
        result("base", "arith", 0.5625, 0.75),
        result("base", "arith=pef.jsonl", 0.97, 1.0),
        result("run/model", "arith", 0.58, 0.75),
        result("run/model", "arith=pef.jsonl", 0.955, 1.0),
    ]
    line = before_after(results, "base", "run/model", ("held-out", "D_pef"))
    assert line == (
        "held-out (4 prompts) pass@1 0.56 -> 0.58, greedy 0.75 -> 0.75; "
        "D_pef (4 prompts) pass@1 0.97 -> 0.95, greedy 1.00 -> 1.00: kept"
    )
    results[3]["greedy"] = 0.75  # one D_pef prompt's greedy answer lost
    assert before_after(results, "base", "run/model", ("held-out", "D_pef")).endswith("not kept")
