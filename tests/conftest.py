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


@pytest.fixture(scope="session")
def real_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct as a local HF folder (converted on first use)."""
    from dphrl.models import resolve_model_path

    return resolve_model_path("embedded:smollm2-135m")


@pytest.fixture
def tiny_model():
    """A tiny random Llama (vocab 128, hidden 32, 2 layers), seeded, in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()
