"""Every shipped config composes and validates; the names configs allow match the registries."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dphrl import config as C
from dphrl.algo_config import RENAMED_KEYS, AlgoName
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
    assert typed.task.name == "arith" and typed.model.name == "smollm2-135m-arith"


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
    from dphrl.engine import ENGINES
    from dphrl.tasks import TASKS

    assert set(_options("divergence")) == set(C.DivergenceName)
    assert set(_options("task")) <= set(TASKS)  # a registered task may be eval-only
    assert set(_options("layout")) == set(C.LayoutName)
    assert set(_options("algo")) == set(AlgoName)
    assert set(_options("engine")) == {"auto", *ENGINES}


def test_a_task_registered_once_is_allowed(monkeypatch):
    from dphrl.tasks import TASKS

    cfg = _compose("train", ["task.name=newtask"])
    with pytest.raises(ConfigError, match="task.name='newtask' is not known; allowed: arith"):
        C.validate(cfg)
    monkeypatch.setitem(TASKS, "newtask", "somewhere:NewTask")
    C.validate(cfg)


def test_every_config_key_has_a_reader():
    """No schema key that nothing reads: each leaf name appears in code outside config.py."""
    import dataclasses
    import re

    root = Path(C.__file__).parent
    code = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "config.py")
    unread = []

    def walk(schema, prefix):
        for f in dataclasses.fields(schema):
            kind = schema.__dataclass_fields__[f.name].default_factory
            if dataclasses.is_dataclass(kind):
                walk(kind, prefix + f.name + ".")
            elif not re.search(rf"\b{f.name}\b", code):
                unread.append(prefix + f.name)

    walk(C.DphrlConfig, "")
    assert unread == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("divergence.beta=-0.5", "divergence.beta=-0.5 is out of range"),
        ("divergence=alpha divergence.alpha=1.5", "divergence.alpha=1.5"),
        ("task.limit=0", "task.limit=0"),
        ("eval.k=[1,32] eval.n=8", "eval.k contains 32"),
        ("split.threshold=1.5", "split.threshold=1.5"),
        ("trainer.adam_betas=[1.5,0.999]", "trainer.adam_betas=[1.5, 0.999] is out of range"),
        ("trainer.weight_decay=-1", "trainer.weight_decay=-1.0 is out of range"),
        ("engine.name=sglang", "engine.name='sglang' is not known; allowed: auto, vllm, hf"),
        ("engine.vllm.gpu_memory_utilization=0", "engine.vllm.gpu_memory_utilization=0.0"),
        ("algo.advantage=passk algo.passk_k=16", "algo.passk_k=16 is out of range"),
        ("algo.rollout_correction.high=0.4", "algo.rollout_correction.high=0.4 must be >"),
        ("divergence=forward_kl_topk ref.topk=0", "ref.topk=0 stores none; set ref.topk=8"),
        ("algo.entropy.coef_init=0.1", "algo.entropy.coef_init=0.1 > algo.entropy.coef_max"),
        ("algo.cispo.low=1.5", "algo.cispo.low=1.5 is out of range"),
    ],
)
def test_bad_values_raise_one_clear_error(override, message):
    cfg = _compose("train", override.split())
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        C.validate(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("algo.loss_agg=sum", "Invalid value 'sum', expected one of [token-mean,"),
        ("ref.keep=best", "Invalid value 'best', expected one of [correct, all]"),
        ("divergence.name=kl", "Invalid value 'kl'"),
        ("algo.loss=ppo", "Invalid value 'ppo', expected one of [ppo_clip,"),
        ("algo.rollout_correction.name=is", "Invalid value 'is'"),
        ("engine.dtype=fp8", "Invalid value 'fp8'"),
    ],
)
def test_closed_sets_are_checked_as_the_config_composes(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _compose("train", [override])
    assert message in str(err.value.__cause__ or err.value)


def test_layout_keeps_no_process_counts():
    """torchrun decides the process count; the layout has no key that nothing would read."""
    assert not {"nproc_per_node", "nnodes"} & {f for f in C.LayoutConfig.__dataclass_fields__}


def test_lora_under_fsdp_is_refused_by_validation_before_any_model_loads():
    cfg = _compose("train", ["layout=gpu8", "model.lora.r=8"])
    with pytest.raises(ConfigError, match="model.lora.r=8 with layout=gpu8"):
        C.validate(cfg)


def test_variant_keys_compose_into_their_groups():
    cfg = OmegaConf.to_object(_compose("train", ["algo.clip_cov.ratio=0.01", "algo=dapo_ds"]))
    assert cfg.algo.clip_cov.ratio == 0.01 and cfg.algo.clip_cov.high == 5.0
    assert cfg.algo.overlong.filter is True and cfg.algo.rollout_correction.name == "none"


# The group key itself: `algo.rollout_correction=tis` is refused by check_overrides before
# Hydra, whose type error for it would not name algo.rollout_correction.name.
_OVERRIDABLE = sorted(set(RENAMED_KEYS) - {"algo.rollout_correction"})


@pytest.mark.parametrize("old", _OVERRIDABLE)
@pytest.mark.parametrize("plus", ["", "++"])
def test_a_renamed_key_on_the_command_line_names_its_new_key(old, plus):
    message = f"{old} was renamed: use {RENAMED_KEYS[old]}"
    with pytest.raises(ConfigError, match=message):
        C.check_overrides([f"{plus}{old}=1"])
    cfg = _compose("train", [f"{plus}{old}=1"])  # what Hydra alone lets through
    with pytest.raises(ConfigError, match=message):
        C.validate(cfg)


@pytest.mark.parametrize("arg", ["algo.rollout_correction=tis", "+algo.rollout_correction=tis"])
def test_the_old_rollout_correction_key_names_the_groups_name(arg):
    with pytest.raises(ConfigError, match="use algo.rollout_correction.name"):
        C.check_overrides([arg])


def test_new_keys_and_whole_groups_pass_the_override_check():
    C.check_overrides(
        ["algo.rollout_correction.name=tis", "algo.rollout_correction={name: tis}", "seed=1"]
    )


def test_a_renamed_key_in_a_users_yaml_file_names_its_new_key(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "old.yaml").write_text(
        "# @package _global_\nalgo:\n  loss: clip_cov\n  clip_cov_ratio: 0.001\n"
    )
    cfg = _compose("train", [f"hydra.searchpath=[file://{tmp_path}]", "+experiment=old"])
    with pytest.raises(
        ConfigError, match="algo.clip_cov_ratio was renamed: use algo.clip_cov.ratio"
    ):
        C.validate(cfg)


def test_an_unknown_algo_key_is_refused_naming_the_known_ones():
    cfg = _compose("train", ["algo.clip_cov_rate=1"])
    with pytest.raises(ConfigError, match="algo.clip_cov_rate is not a config key; algo has: name"):
        C.validate(cfg)


def test_config_choices_pickle_across_ranks():
    """Configs cross torchrun ranks pickled (dist.broadcast_object): every closed set of values
    must be found again by pickle in the module that defines it."""
    import pickle

    from dphrl import algo_config, config

    for value in (config.RefKeep.all, config.DTypeAuto.auto, algo_config.LossAgg["token-mean"]):
        assert pickle.loads(pickle.dumps(value)) == value
