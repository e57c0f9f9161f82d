"""`scripts/reproduce_small.sh --quick`: the small reproduction end to end at smoke size.

It checks the files and the table's shape, not the outcome (that is RESULTS.md's job).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
    for arm in ("grpo", "dph_js"):  # the forgetting curves: held-out and D_pef (eval.pef_limit)
        assert {"eval_greedy", "eval_pef_greedy"} <= set(results["training_curves"][arm])
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


def load_report():
    """scripts/reproduce_report.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts/reproduce_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_sweep_table_has_each_runs_held_out_and_d_pef_points_and_minutes(tmp_path):
    """`reproduce_report.py --sweep`: one row per eval.every point of each sweep run, with its
    D_pef figures where training logged them (eval.pef_limit: what beta is chosen by) and the
    run's minutes (the sum of its step phases: what the budget rule weighs)."""
    report = load_report()
    for run, greedy in (("grpo_8x16_lr2e-5", 0.5), ("js_x10", 0.75)):
        (tmp_path / "sweep" / run).mkdir(parents=True)
        rows = [
            {"step": s, "eval_greedy": greedy, "eval_pass@1": 0.25, "eval_pass@16": 1.0}
            for s in (4, 8)
        ]
        if run == "js_x10":
            rows[1].update({"eval_pef_greedy": 0.875, "eval_pef_pass@1": 0.5})
        steps = [{"step": 1, "loss": 0.0, "time_rollout": 30.0, "time_train": 60.0}]
        (tmp_path / "sweep" / run / "metrics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in [*steps, *rows]) + "\n"
        )
    report.sweep(tmp_path)
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[2:] == [
        "| grpo_8x16_lr2e-5 | 1.5 | 4 | 50.0 | 25.0 | 100.0 | - | - | - |",
        "| grpo_8x16_lr2e-5 | 1.5 | 8 | 50.0 | 25.0 | 100.0 | - | - | - |",
        "| js_x10 | 1.5 | 4 | 75.0 | 25.0 | 100.0 | - | - | - |",
        "| js_x10 | 1.5 | 8 | 75.0 | 25.0 | 100.0 | 87.5 | 50.0 | - |",
    ]


def test_training_curve_takes_its_last_point_from_eval_passk_when_training_skipped_it(tmp_path):
    """eval.at_end=false: seed 0 was evaluated at step 4 of 8 during training, so its step-8
    point is its final model's held-out figures in eval/passk.json (the same prompts and n); the
    curve starts at the base model's. Seed 1 was not evaluated during training and adds nothing."""
    report = load_report()
    for seed in ("0", "1"):
        run = tmp_path / "arms" / "grpo" / f"seed{seed}"
        run.mkdir(parents=True)
        rows = [{"step": s, "loss": 0.0} for s in range(1, 9)]
        if seed == "0":
            rows[3].update({"eval_greedy": 0.5, "eval_pass@1": 0.25, "eval_pass@16": 0.75})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "eval").mkdir()

    def result(model, dataset, greedy, p1):
        return {
            "model": model,
            "dataset": dataset,
            "greedy": greedy,
            "pass_at_k": {"1": p1, "2": p1, "16": 1.0},
        }

    seed0, seed1 = (str(tmp_path / "arms" / "grpo" / s / "model") for s in ("seed0", "seed1"))
    results = [
        result("embedded:base", "arith=heldout.jsonl", 0.25, 0.125),
        result(seed0, "arith=heldout.jsonl", 0.625, 0.375),
        result(seed0, "arith=pef.jsonl", 1.0, 1.0),  # another set: not the held-out curve
        result(seed1, "arith=heldout.jsonl", 0.0, 0.0),  # no eval during training: ignored
    ]
    (tmp_path / "eval" / "passk.json").write_text(json.dumps({"results": results}))
    curves = report.with_base(
        report.training_curves(tmp_path, ["grpo"], ["0", "1"]), report.collect(tmp_path)
    )
    assert curves["grpo"]["eval_greedy"] == [(0, 0.25), (4, 0.5), (8, 0.625)]
    assert curves["grpo"]["eval_pass@1"] == [(0, 0.125), (4, 0.25), (8, 0.375)]
    assert curves["grpo"]["eval_pass@16"] == [(0, 1.0), (4, 0.75), (8, 1.0)]
    assert "eval_pass@2" not in curves["grpo"]  # only the keys training logged


def test_carry_analysis_counts_pass_at_1_and_the_spurious_carry_per_kind_of_sum(
    tmp_path, capsys, monkeypatch
):
    """scripts/carry_analysis.py: sampled answers only (the greedy one is not counted), sums split
    by whether the units carry, and "sum + 10" counted; rows that are not bare sums are skipped."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as when run: it imports reproduce_report
    spec = importlib.util.spec_from_file_location("carry", ROOT / "scripts/carry_analysis.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    (tmp_path / "sets").mkdir()
    (tmp_path / "eval").mkdir()
    ask = "What is {} + {}?\nPut the final answer in \\boxed{{}}."
    heldout = [
        {"id": 0, "prompt": [{"role": "user", "content": ask.format(39, 30)}]},  # no carry: 69
        {"id": 1, "prompt": [{"role": "user", "content": ask.format(38, 35)}]},  # carry: 73
        {"id": 2, "prompt": [{"role": "user", "content": "Ben has 5 boxes..."}]},
    ]
    (tmp_path / "sets" / "heldout.jsonl").write_text("\n".join(json.dumps(r) for r in heldout))
    (tmp_path / "sets" / "pef.jsonl").write_text("")
    grpo = str(tmp_path / "arms" / "grpo" / "seed0" / "model")
    samples = [
        (grpo, 0, "79", False, False),
        (grpo, 0, "69", True, False),
        (grpo, 0, "79", False, True),  # greedy: not counted
        (grpo, 1, "73", True, False),
        (grpo, 2, "9", False, False),  # not a bare sum
        ("embedded:base", 0, "69", True, False),
    ]
    (tmp_path / "eval" / "samples.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "model": m,
                    "dataset": f"arith={tmp_path}/sets/heldout.jsonl",
                    "id": i,
                    "answer": a,
                    "correct": c,
                    "greedy": g,
                }
            )
            for m, i, a, c, g in samples
        )
    )
    carry.main(tmp_path)
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows == [
        "| heldout | carry | grpo | 1 | 100 | 0 |",
        "| heldout | no carry | base | 1 | 100 | 0 |",
        "| heldout | no carry | grpo | 2 | 50 | 50 |",
    ]


def test_passk_over_steps_gains_the_forgetting_panel(tmp_path):
    """Synthetic runs: dph_js logs `ref_forgot_frac` every step (two seeds, averaged), grpo has
    no ref store and logs none; beside the held-out row's three panels (greedy, pass@1,
    pass@8; 4.5 x 3.6 inches each) the plot gets a fourth for it."""
    from PIL import Image

    report = load_report()
    for arm, seed, forgot in (("dph_js", "0", 0.0), ("dph_js", "1", 0.5), ("grpo", "0", None)):
        run = tmp_path / "arms" / arm / f"seed{seed}"
        run.mkdir(parents=True)
        rows = [
            {"step": s, "eval_greedy": 0.5, "eval_pass@1": 0.5, "eval_pass@8": 0.75} for s in (1, 2)
        ]
        for row in rows if forgot is not None else []:
            row["ref_forgot_frac"] = forgot * row["step"]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves = report.training_curves(tmp_path, ["grpo", "dph_js"], ["0", "1"])
    assert curves["dph_js"]["ref_forgot_frac"] == [(1, 0.25), (2, 0.5)]
    assert "ref_forgot_frac" not in curves["grpo"]
    report.plot_over_steps(curves, ["grpo", "dph_js"], tmp_path / "over.png")
    width, height = Image.open(tmp_path / "over.png").size
    assert width / height == pytest.approx(4 * 4.5 / 3.6, rel=0.05)
    del curves["dph_js"]["ref_forgot_frac"]  # no arm with a ref store: the three panels
    report.plot_over_steps(curves, ["grpo", "dph_js"], tmp_path / "three.png")
    width, height = Image.open(tmp_path / "three.png").size
    assert width / height == pytest.approx(3 * 4.5 / 3.6, rel=0.05)
    for c in curves.values():  # D_pef curves too (eval.pef_limit): a second row of panels
        c.update({f"eval_pef_{k[5:]}": v for k, v in list(c.items())})
    report.plot_over_steps(curves, ["grpo", "dph_js"], tmp_path / "rows.png")
    width, height = Image.open(tmp_path / "rows.png").size
    assert width / height == pytest.approx(3 * 4.5 / (2 * 3.6), rel=0.05)


def test_d_pef_curve_starts_at_the_base_and_ends_at_the_final_models_d_pef_eval(tmp_path):
    """eval.pef_limit: the D_pef curve (eval_pef_*) gets step 0 from the base model's D_pef
    figures and its last step from the final model's (the second of eval.datasets)."""
    report = load_report()
    run = tmp_path / "arms" / "dph_js" / "seed0"
    run.mkdir(parents=True)
    rows = [{"step": 1}, {"step": 2, "eval_greedy": 0.5, "eval_pef_greedy": 0.75}, {"step": 3}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "eval").mkdir()
    final = str(run / "model")
    results = [
        {"model": m, "dataset": d, "greedy": g, "pass_at_k": {"1": g}}
        for m, d, g in [
            ("embedded:base", "arith=heldout.jsonl", 0.25),
            ("embedded:base", "arith=pef.jsonl", 1.0),
            (final, "arith=heldout.jsonl", 0.625),
            (final, "arith=pef.jsonl", 0.875),
        ]
    ]
    (tmp_path / "eval" / "passk.json").write_text(json.dumps({"results": results}))
    curves = report.with_base(
        report.training_curves(tmp_path, ["dph_js"], ["0"]), report.collect(tmp_path)
    )
    assert curves["dph_js"]["eval_greedy"] == [(0, 0.25), (2, 0.5), (3, 0.625)]
    assert curves["dph_js"]["eval_pef_greedy"] == [(0, 1.0), (2, 0.75), (3, 0.875)]


def test_exported_record_recomputes_the_table_from_the_compressed_samples(tmp_path):
    """`--export`: eval-passk's samples gzipped beside the metrics; the report run on that
    folder alone (no passk.json) recomputes the same figures from the samples' verdicts."""
    from dphrl.commands.eval_passk import summarize

    report = load_report()
    out, dest = tmp_path / "out", tmp_path / "record"
    (out / "eval").mkdir(parents=True)
    run = out / "arms" / "grpo" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    models = ["embedded:base", str(run / "model")]
    samples = [
        {"model": m, "dataset": d, "id": i, "sample": j, "greedy": j == 2,
         "correct": (i + j + len(m)) % 3 == 0, "answer": str(j), "completion": f"{j}",
         "response_tokens": 2, "neg_logprob": 0.5}
        for m in models for d in ("arith=h.jsonl", "arith=p.jsonl", "ood=o.jsonl")
        for i in range(3) for j in range(3)
    ]  # fmt: skip
    (out / "eval" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "eval" / "passk_settings.json").write_text(json.dumps({"k": [1, 2], "greedy": True}))
    datasets = [
        {"model": m, "dataset": d, "ids": [0, 1, 2], "dropped": 0}
        for m in models for d in ("arith=h.jsonl", "arith=p.jsonl", "ood=o.jsonl")
    ]  # fmt: skip
    results = summarize(samples, datasets, [1, 2], True)
    (out / "eval" / "passk.json").write_text(json.dumps({"results": results}))
    report.export(out, dest)
    assert not (dest / "eval" / "passk.json").exists()
    assert (dest / "arms" / "grpo" / "seed0" / "metrics.jsonl").is_file()
    assert report.collect(dest) == report.collect(out)
    assert report.collect(dest)["grpo"]["D_pef"]["greedy"]  # the samples' own figures
