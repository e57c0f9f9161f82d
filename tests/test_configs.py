"""Every shipped config composes and validates; the names configs allow match the registries."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dphrl import config as C
from dphrl.cli import COMMANDS, CONF_DIR
from dphrl.errors import ConfigError

GROUPS = ["divergence", "task", "model", "engine", "layout", "algo"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _compose(config_name: str, overrides: list[str]):
    C.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_composes_with_defaults(command):
    cfg = _compose(COMMANDS[command][0], [])
    C.validate(cfg)
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, C.DphrlConfig)
    assert typed.task.name == "arith" and typed.model.name == "smollm2-135m"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "task" and option in ("bird", "spider", "math", "gsm8k"):
        data = tmp_path / "rows.jsonl"
        data.write_text("")
        overrides.append(f"task.path={data}")
    cfg = _compose("train", overrides)
    C.validate(cfg)
    assert cfg[group].name == option


def test_names_allowed_by_validation_match_the_config_files():
    assert set(_options("divergence")) == set(C.DIVERGENCE_NAMES)
    assert set(_options("task")) == set(C.TASK_NAMES)
    assert set(_options("layout")) == set(C.LAYOUT_NAMES)
    assert set(_options("algo")) == set(C.ALGO_NAMES)
    assert set(_options("engine")) == set(C.ENGINE_NAMES)


def test_task_names_match_the_task_registry():
    from dphrl.tasks import TASKS

    assert set(TASKS) == set(C.TASK_NAMES)


@pytest.mark.parametrize(
    "override,message",
    [
        ("divergence.beta=-0.5", "divergence.beta=-0.5 is out of range"),
        ("divergence=alpha divergence.alpha=1.5", "divergence.alpha=1.5"),
        ("task.limit=0", "task.limit=0"),
        ("algo.loss_agg=sum", "algo.loss_agg='sum' is not known; allowed: token-mean"),
        ("eval.k=[1,32] eval.n=8", "eval.k contains 32"),
        ("split.threshold=1.5", "split.threshold=1.5"),
        ("ref.keep=best", "ref.keep='best'"),
        ("algo.loss=ppo", "algo.loss='ppo' is not known; allowed: ppo_clip"),
        ("algo.advantage=passk algo.passk_k=16", "algo.passk_k=16 is out of range"),
        ("algo.rollout_correction=is", "algo.rollout_correction='is' is not known"),
        ("algo.rollout_correction_high=0.4", "algo.rollout_correction_high=0.4 must be >"),
        ("engine.dtype=fp8", "engine.dtype='fp8' is not known"),
    ],
)
def test_bad_values_raise_one_clear_error(override, message):
    cfg = _compose("train", override.split())
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        C.validate(cfg)
