"""`scripts/reproduce_small.sh --quick`: the small reproduction end to end at smoke size.

It checks the files and the table's shape, not the outcome (that is RESULTS.md's job).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETS = ("heldout", "pef", "ood")


def quick_reproduction(out: Path, timeout: int) -> subprocess.CompletedProcess:
    """`OUT=<out> bash scripts/reproduce_small.sh --quick`, its output captured."""
    return subprocess.run(
        ["bash", "scripts/reproduce_small.sh", "--quick"],
        cwd=ROOT,
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quick_reproduction_writes_the_table_the_json_and_both_plots(tmp_path):
    out = tmp_path / "repro"
    run = quick_reproduction(out, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("RESULTS.md", "results.json", "passk_curves.png", "passk_over_steps.png"):
        assert (out / name).stat().st_size > 0, name

    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["base", "grpo", "dph_js"]
    assert results["sets"] == ["held-out", "D_pef", "OOD"]
    for arm in results["arms"]:
        for cell in results["results"][arm].values():
            assert 0.0 <= cell["greedy"]["mean"] <= 1.0
            assert cell["pass@1"]["mean"] <= cell["pass@4"]["mean"] + 1e-9
    assert "eval_greedy" in results["training_curves"]["grpo"]
    lines = {n: len((out / "sets" / f"{n}.jsonl").read_text().splitlines()) for n in SETS}
    pef = len((out / "split" / "pef.jsonl").read_text().splitlines())
    assert lines == {"heldout": 4, "pef": min(4, pef), "ood": 4}  # the sets, cut to quick size

    table = [line for line in (out / "RESULTS.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one row per arm
    assert all(line.count("|") == 1 + 1 + 3 * 3 for line in table)  # arm + 3 sets x 3 columns
    assert table[2].startswith("| base (no training) |")

    again = quick_reproduction(out, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "+ .venv/bin/dphrl train" not in again.stdout  # finished arms are not trained again
