"""The fast tier's one whole run: `dphrl train` with DPH-JS on the tiny model, two steps,
making its split and ref store first; the weights move and both steps are logged (TRL's key
test). Every other whole-pipeline run is in the slow tier (tests/training/test_trainer.py, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dphrl.commands import train as trainer
from tests.helpers import toytask
from tests.training.test_trainer import _cfg, _weights


def test_two_steps_of_dph_js_make_their_data_and_move_the_weights(
    tiny_model_dir, tmp_path, monkeypatch, capsys, caplog
):
    toytask.register(monkeypatch)
    cfg = _cfg(tmp_path, tiny_model_dir, "divergence=js", "trainer.max_steps=2", "ref.keep=all")
    with caplog.at_level("INFO", logger="dphrl"):
        out = trainer.run(cfg, tmp_path)
    assert (tmp_path / "split" / "exp.jsonl").exists() and (tmp_path / "ref").is_dir()
    before, after = _weights(Path(tiny_model_dir)), _weights(out)
    assert sum(float((before[k] - after[k]).abs().max()) for k in before) > 0
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["grad_norm"] > 0 for m in metrics) and "div_loss" in metrics[0]
    shown = capsys.readouterr().out  # not a terminal: plain progress lines, one line each
    assert "train: 0/2 steps (0%)" in shown and "train: 2/2 steps (100%)" in shown
    assert "train: done, 2 steps" in caplog.text  # dphrl's records: the console and the log file
    assert re.search(r"train: D_pef \d+ of \d+ prompts \(\d+%", caplog.text)  # the split's
