"""`auto` precision: bfloat16 only where the CPU has bfloat16 units, model.dtype on GPUs."""

from __future__ import annotations

import logging

import pytest

from dphrl import precision
from tests.conftest import compose_config


@pytest.fixture
def bf16_units(monkeypatch):
    def set_units(fast: bool) -> None:
        monkeypatch.setenv(precision.ENV, "1" if fast else "0")

    return set_units


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_a_cpu_picks_bfloat16_only_with_bf16_units(bf16_units, fast):
    bf16_units(fast)
    cfg = compose_config(["layout=cpu"])
    want = "bfloat16" if fast else "float32"
    assert cfg.engine.dtype == want
    assert cfg.model.autocast == ("bfloat16" if fast else None)
    assert cfg.model.numerics == ("float32+autocast:bfloat16" if fast else "float32")


def test_auto_on_a_gpu_layout_keeps_model_dtype(bf16_units):
    bf16_units(True)  # the CPU's units do not matter for a GPU run, planned from a CPU
    cfg = compose_config(["layout=gpu1", "model.dtype=bfloat16", "dry_run=true"])
    assert cfg.engine.dtype == "bfloat16"
    assert cfg.model.autocast is None
    cfg = compose_config(["layout=gpu1", "dry_run=true"])
    assert (cfg.engine.dtype, cfg.model.autocast) == ("float32", None)


def test_explicit_values_are_kept(bf16_units):
    bf16_units(True)
    cfg = compose_config(["layout=cpu", "engine.dtype=float32", "model.autocast=null"])
    assert (cfg.engine.dtype, cfg.model.autocast) == ("float32", None)
    cfg = compose_config(["layout=cpu", "engine.dtype=null"])  # null: model.dtype
    assert cfg.engine.dtype == "float32"


def test_the_flag_check_reads_cpuinfo(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "amx_bf16"}))
    assert precision.cpu_has_fast_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "avx2"}))
    assert not precision.cpu_has_fast_bf16()


def test_bfloat16_asked_on_a_cpu_without_units_warns_with_the_slowdown(
    bf16_units, monkeypatch, caplog
):
    bf16_units(False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 97.0)
    with caplog.at_level(logging.WARNING, logger="dphrl.precision"):
        compose_config(["layout=cpu", "engine.dtype=bfloat16"])
    assert "engine.dtype=bfloat16" in caplog.text and "97x slower" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dphrl.precision"):
        compose_config(["layout=cpu"])  # auto: float32 here, nothing to warn about
    assert caplog.text == ""


def test_a_config_built_in_code_settles_auto_where_it_is_read(bf16_units):
    from dphrl.config import ModelConfig

    bf16_units(True)
    assert ModelConfig().compute_dtype in ("bfloat16", None)  # this machine's default device
    bf16_units(False)
    assert ModelConfig().compute_dtype is None
