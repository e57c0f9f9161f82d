"""eval-passk end to end on the embedded model and the `arith` task, with both engines, and
resume after a kill. Kept tiny (a few prompts, a few samples, short answers)."""

from __future__ import annotations

import json
import shutil

import pytest

import dphrl.commands.eval_passk as passk
from dphrl.config import DphrlConfig, EngineConfig, EvalConfig, ModelConfig, TaskConfig
from dphrl.errors import ConfigError

FILES = ("passk.json", "passk.md", "passk.png", "samples.jsonl")


def check_outputs(folder, n: int, expected: list[tuple[str, str]]) -> dict:
    """The four files exist; one result per (model, dataset); per-prompt c <= n; k monotone."""
    for name in FILES:
        assert (folder / name).stat().st_size > 0, name
    payload = json.loads((folder / "passk.json").read_text())
    assert [(r["model"], r["dataset"]) for r in payload["results"]] == expected
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    for r in payload["results"]:
        assert r["prompts"] > 0
        assert all(p["n"] == n and 0 <= p["c"] <= n for p in r["per_prompt"])
        values = list(r["pass_at_k"].values())
        assert values == sorted(values)
        mine = [s for s in samples if (s["model"], s["dataset"]) == (r["model"], r["dataset"])]
        assert sum(not s["greedy"] for s in mine) == n * r["prompts"]
        assert all(isinstance(s["reward"], float) for s in mine)
    return payload


@pytest.mark.slow
def test_eval_passk_cli_with_vllm(tmp_path):
    from dphrl.cli import run_command

    args = ["engine=vllm", "task.limit=4", "eval.n=4", "eval.k=[1,2,4]", "eval.greedy=true"]
    run_command("eval-passk", [*args, "model.max_new_tokens=32", f"hydra.run.dir={tmp_path}"])
    payload = check_outputs(tmp_path, 4, [("embedded:smollm2-135m-arith", "arith")])  # the default
    assert payload["settings"]["engine"] == "vllm"
    assert payload["results"][0]["greedy"] is not None
    assert "rollout engine: vllm" in (tmp_path / "eval-passk.log").read_text()


def small_config(max_new_tokens: int = 12, **eval_options) -> DphrlConfig:
    options = {"n": 2, "k": [1, 2], "greedy": True, **eval_options}
    return DphrlConfig(
        task=TaskConfig(limit=4),
        model=ModelConfig(max_new_tokens=max_new_tokens),
        engine=EngineConfig(name="hf"),
        eval=EvalConfig(**options),
    )


@pytest.mark.slow
def test_eval_passk_hf_two_models_two_datasets(tmp_path, real_model_path):
    cfg = small_config(
        models=["embedded:smollm2-135m", real_model_path],
        datasets=["arith", "minisql"],
        limit=1,
        greedy=False,
        max_new_tokens=8,
    )
    passk.run(cfg, tmp_path)
    pairs = [(m, d) for m in cfg.eval.models for d in ("arith", "minisql")]
    payload = check_outputs(tmp_path, 2, pairs)
    assert payload["settings"]["engine"] == "hf"
    table = (tmp_path / "passk.md").read_text()
    assert "## arith" in table and "## minisql" in table


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_passk_json(tmp_path, monkeypatch):
    monkeypatch.setattr(passk, "CHUNK_PROMPTS", 2)
    cfg = small_config()
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    passk.run(cfg, whole)

    # What a kill during the second chunk's append leaves: the first chunk's rows (2 prompts x
    # (2 samples + 1 greedy)) and a torn line.
    lines = (whole / "samples.jsonl").read_text().splitlines(keepends=True)
    resumed.mkdir()
    (resumed / "samples.jsonl").write_text("".join(lines[:6]) + lines[6][:40])
    shutil.copy(whole / "passk_settings.json", resumed)

    chunks = []
    original = passk._Evaluator.sample
    monkeypatch.setattr(
        passk._Evaluator, "sample", lambda self, *a: chunks.append(a[4]) or original(self, *a)
    )
    passk.run(cfg, resumed)
    assert chunks == [2]  # only the second chunk (from prompt 2) was sampled again
    assert (resumed / "passk.json").read_text() == (whole / "passk.json").read_text()
    rows = lambda folder: sorted((folder / "samples.jsonl").read_text().splitlines())  # noqa: E731
    assert rows(resumed) == rows(whole)


@pytest.mark.slow
def test_a_model_added_to_a_finished_eval_is_sampled_alone(tmp_path, monkeypatch, real_model_path):
    """A comparison that gains an arm reuses the folder: the models done are not sampled
    again, and a model's samples do not depend on its place in the list (the same weights
    under a second label give the same counts)."""
    first = small_config(models=["embedded:smollm2-135m"], limit=2)
    before = passk.run(first, tmp_path)["results"]
    sampled = []
    original = passk._Evaluator.sample
    monkeypatch.setattr(
        passk._Evaluator,
        "sample",
        lambda self, *a: sampled.append(self.model_path) or original(self, *a),
    )
    both = small_config(models=["embedded:smollm2-135m", real_model_path], limit=2)
    after = passk.run(both, tmp_path)["results"]
    assert sampled == [real_model_path]
    assert after[0] == before[0]
    assert [p["c"] for p in after[1]["per_prompt"]] == [p["c"] for p in before[0]["per_prompt"]]
    recorded = json.loads((tmp_path / "passk_settings.json").read_text())
    assert recorded["models"] == ["embedded:smollm2-135m", real_model_path]


def test_resume_refuses_a_folder_made_with_other_settings(tmp_path):
    (tmp_path / "passk_settings.json").write_text(json.dumps({"n": 99}))
    with pytest.raises(ConfigError, match="other settings"):
        passk.run(small_config(), tmp_path)
