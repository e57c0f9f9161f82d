"""A decoder's shape from its `config.json`, without its weights: what the memory plan counts.

A local folder's file, else a shipped preset's published values (`KNOWN`), else the hub
cache's copy; nothing is downloaded, so a hub ID with no local copy has no plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer (the keys of an HF `config.json`)."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections (+ q, k, v biases), gate / up / down, two RMSNorm weights."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        bias = q + 2 * kv if self.qkv_bias else 0
        return h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h

    @property
    def head_params(self) -> int:
        """The lm_head's own weights: none when tied to the embeddings."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """What FSDP2's root group holds besides the layers: embeddings, final norm, lm_head."""
        return self.vocab * self.hidden + self.hidden + self.head_params

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, r: int, targets: list[str]) -> int:
        """r (in + out) per adapted projection per layer (peft's A: r x in, B: out x r)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        sizes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return self.layers * sum(r * sum(sizes[t]) for t in targets if t in sizes)


def shape_from_config(cfg: dict) -> ModelShape:
    """A `ModelShape` from the dict of an HF `config.json` (Llama, Qwen2, Mistral keys)."""
    heads = cfg["num_attention_heads"]
    return ModelShape(
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        vocab=cfg["vocab_size"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate=cfg["intermediate_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
    )


_SMOLLM2_135M = ModelShape(576, 30, 49152, 9, 3, 64, 1536, tied=True)
# Shapes of the shipped presets, from their published config.json files, for machines that
# cannot read them (a hub ID with no local copy; nothing here downloads).
KNOWN = {
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(4096, 32, 128256, 32, 8, 128, 14336, False),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 28, 152064, 28, 4, 128, 18944, False, True),
    "embedded:smollm2-135m": _SMOLLM2_135M,
    "embedded:smollm2-135m-arith": _SMOLLM2_135M,
}


def find_shape(path: str) -> ModelShape | None:
    """The shape of `model.path`: a local folder's config.json, a shipped preset's, or the
    hub cache's copy; None when none is on this machine (the plan is then unavailable)."""
    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        return shape_from_config(json.loads(local.read_text()))
    if path in KNOWN:
        return KNOWN[path]
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()))
    return None
