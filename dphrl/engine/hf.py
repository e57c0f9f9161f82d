"""The hf engine: transformers `generate`, batched with left padding; the fallback to vLLM.

Sampling happens in a logits processor (`_SeededSampler`) rather than in `generate`'s own
sampler, for two reasons: each sequence draws from its own `torch.Generator`, seeded
`sampling.seed + i * n + j` for sample j of prompt i as in the vllm engine, so a sequence's
tokens do not depend on which others share its batch; and the processor sees the processed
distribution (after temperature and top_p), whose log-prob of the drawn token is what
`Completion.logprobs` must hold. `generate` then runs greedy over a distribution the
processor has collapsed onto the drawn token. At temperature 0 the log-probs are the model's
own (temperature 1) ones, as vLLM reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from dphrl.engine import Completion, Sampling
from dphrl.errors import ConfigError, EngineError

log = logging.getLogger(__name__)


class HFEngine:
    """transformers generate behind the `Engine` interface.

    Options: `dtype`, `device` (auto | cpu | cuda), `seed`, `batch_size` (sequences per
    `generate` call), `max_model_len` (checked: prompt + max_new_tokens must fit), `sleep_mode`
    (on CUDA, `sleep()` moves the weights to CPU memory). `gpu_memory_utilization` and
    `enforce_eager` are vLLM's and ignored here; `tensor_parallel_size` must be 1.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "auto",
        seed: int = 0,
        batch_size: int = 64,
        max_model_len: int | None = None,
        sleep_mode: bool = False,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tensor_parallel_size != 1:
            raise ConfigError(
                f"engine.tensor_parallel_size={tensor_parallel_size}: the hf engine runs on one "
                "device; use engine=vllm for tensor parallelism"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError) as err:
            raise EngineError(f"engine=hf could not load {model_path}: {err}") from err
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_model_len = max_model_len
        self.sleep_mode = sleep_mode and self.device.type == "cuda"
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        torch.manual_seed(seed)

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: Sampling
    ) -> list[list[Completion]]:
        """For each prompt, `n` completions, stopping at EOS or `sampling.max_new_tokens`."""
        if self.max_model_len is not None:
            longest = max((len(p) for p in prompt_ids), default=0)
            if longest + sampling.max_new_tokens > self.max_model_len:
                raise EngineError(
                    f"a prompt of {longest} tokens + {sampling.max_new_tokens} new tokens exceeds "
                    f"max_model_len={self.max_model_len}"
                )
        # One entry per sequence: (prompt index, sample index); sorted by prompt length so
        # that a batch holds similar lengths and pads little.
        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        jobs.sort(key=lambda job: len(prompt_ids[job[0]]))
        results: dict[tuple[int, int], Completion] = {}
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            seeds = [sampling.seed + i * n + j for i, j in batch]
            done = self._generate_batch([prompt_ids[i] for i, _ in batch], seeds, sampling)
            results.update(zip(batch, done, strict=True))
        return [[results[i, j] for j in range(n)] for i in range(len(prompt_ids))]

    def _generate_batch(
        self, prompts: list[list[int]], seeds: list[int], sampling: Sampling
    ) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        sampler = _SeededSampler(seeds, sampling.temperature, sampling.top_p, self.device)
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
        new_tokens = out[:, width:].tolist()  # (B, <= max_new_tokens)
        logprobs = torch.stack(sampler.logprobs, dim=1).tolist()  # (B, steps)
        return [
            self._completion(tokens, lps) for tokens, lps in zip(new_tokens, logprobs, strict=True)
        ]

    def _completion(self, tokens: list[int], logprobs: list[float]) -> Completion:
        """Cut a padded row after its first EOS (kept, as vLLM keeps it) and decode the text."""
        end = next((t + 1 for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
        finish = "length" if end is None else "stop"
        tokens = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(
            text=text, token_ids=tokens, logprobs=logprobs[: len(tokens)], finish_reason=finish
        )

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy these named tensors (HF names) into the model's parameters."""
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                        continue
                    raise EngineError(f"load_weights: the model has no parameter named {name!r}")
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def sleep(self) -> None:
        """On CUDA with sleep_mode, move the weights to CPU memory while training."""
        if self.sleep_mode:
            import torch

            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.model.to(self.device)

    def close(self) -> None:
        """Drop the model (nothing else to shut down)."""
        del self.model


class _SeededSampler:
    """A logits processor that draws each row's next token from the row's own generator.

    It applies temperature and top_p, records the log-prob of the drawn token under that
    processed distribution, and returns scores that are 0 at the drawn token and -inf
    elsewhere, so that `generate`'s greedy step picks exactly the drawn token.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: Any) -> None:
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs: list[Any] = []  # per step, (B,)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float()  # (B, V)
        if self.temperature == 0:
            logp = torch.log_softmax(scores, dim=-1)
            tokens = logp.argmax(dim=-1)
        else:
            logp = torch.log_softmax(_top_p(scores / self.temperature, self.top_p), dim=-1)
            probs = logp.exp()
            tokens = torch.stack(
                [
                    torch.multinomial(probs[r], 1, generator=g)[0]
                    for r, g in enumerate(self.generators)
                ]
            )
        self.logprobs.append(logp.gather(1, tokens[:, None])[:, 0].cpu())
        return logp.fill_(float("-inf")).scatter_(1, tokens[:, None], 0.0)  # reuses logp's memory


def _top_p(logits: Any, top_p: float) -> Any:
    """Mask to -inf the tokens outside the smallest set whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    import torch

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold top_p of the mass.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
