"""The supervised warm-up that makes the embedded initial policy: loss on responses only,
deterministic, cached under a folder named for its recipe."""

from __future__ import annotations

import json

import pytest

from dphrl import embedded, warmup


def test_padding_masks_the_prompt_and_the_padding_from_the_loss():
    ids, labels, mask = warmup._pad([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert labels.tolist() == [[-100, -100, -100, 4, 5], [-100, 7, 8, 9, -100]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


@pytest.mark.slow  # trains the warm-up twice (~8-26 s)
def test_warm_up_lowers_the_response_loss_and_is_deterministic(tiny_model_dir, tmp_path):
    from dphrl.tasks.arith import warmup_examples

    recipe = warmup.Recipe(base="tiny", task="arith", steps=6, batch_size=4, lr=3e-3, seed=0)
    examples = warmup_examples(4, seed=0) * 6  # one batch, seen six times: the loss must fall
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(warmup.warm_up(tiny_model_dir, examples, tmp_path / name, recipe))
    first, again = runs
    assert first["last_loss"] < first["first_loss"]
    assert (first["first_loss"], first["last_loss"]) == (again["first_loss"], again["last_loss"])
    saved = json.loads((tmp_path / "a" / "warmup.json").read_text())
    assert saved["recipe"]["steps"] == 6 and (tmp_path / "a" / "config.json").exists()


def test_a_changed_recipe_is_a_new_cache_folder(monkeypatch):
    name = "smollm2-135m-arith"
    before = embedded._folder_name(name)
    assert before.startswith(name + "-")
    monkeypatch.setitem(embedded.WARMED, name, {**embedded.WARMED[name], "lr": 1.0})
    assert embedded._folder_name(name) != before
    assert embedded._folder_name("smollm2-135m") == "smollm2-135m"


def test_an_unknown_embedded_name_lists_the_warmed_ones_too():
    from dphrl.errors import ConfigError

    with pytest.raises(ConfigError, match="embedded:smollm2-135m-arith"):
        embedded.resolve_model_path("embedded:nope")
