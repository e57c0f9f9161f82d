"""The hf engine: a transformers model behind its own decode loop; the fallback to vLLM.

The loop does what `generate` does for one sampled sequence, with two savings that matter when a
group of n samples shares a prompt (GRPO's case): each distinct prompt is prefilled once and
its KV cache copied to its n rows, and a row that has finished (EOS or length) leaves the batch
and the cache at once, instead of being computed, padded, until the longest row ends.

Each sequence draws from its own `torch.Generator`, seeded `sampling.seed + i * n + j` for
sample j of prompt i as in the vllm engine, so its tokens do not depend on which others share
its batch (`_SeededSampler`); the log-prob recorded for a drawn token is under the processed
distribution (after temperature and top_p), as `Completion.logprobs` must hold. At temperature
0 the log-probs are the model's own (temperature 1) ones, as vLLM reports them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from dphrl.engine import Completion, Sampling
from dphrl.errors import EngineError

log = logging.getLogger(__name__)


class HFEngine:
    """A transformers causal LM and its decode loop behind the `Engine` interface.

    Options: `dtype`, `device` (auto | cpu | cuda), `seed`, `batch_size` (sequences decoded
    together), `max_model_len` (checked: prompt + max_new_tokens must fit), `sleep_mode`
    (on CUDA, `sleep()` moves the weights to CPU memory): the shared engine settings and
    `engine.hf`'s.
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
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        """Sample one sequence per row; rows with equal prompts share one prefill."""
        import torch
        from transformers import DynamicCache

        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        which = {p: k for k, p in enumerate(distinct)}
        width = max(len(p) for p in distinct)
        input_ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long)  # (U, W)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(distinct):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        sampler = _SeededSampler(seeds, sampling.temperature, sampling.top_p, self.device)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        active = torch.arange(len(prompts))  # rows still generating, as indices into prompts
        next_pos = torch.tensor([len(p) for p in prompts])  # (B,)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            expand = torch.tensor([which[tuple(p)] for p in prompts], device=self.device)
            cache.batch_select_indices(expand)  # (U, ...) -> (B, ...): a copy per sample
            scores = out.logits[:, -1][expand]  # (B, V)
            attention = attention[expand.cpu()]  # (B, W)
            for step in range(sampling.max_new_tokens):
                drawn, lps = sampler.draw(scores, active)  # (b,), (b,)
                keep = []
                for k, (row, tok, lp) in enumerate(
                    zip(active.tolist(), drawn.tolist(), lps.tolist(), strict=True)
                ):
                    tokens[row].append(tok)
                    logprobs[row].append(lp)
                    if tok not in self.eos_ids and step + 1 < sampling.max_new_tokens:
                        keep.append(k)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index.to(self.device))
                    active, drawn, attention = active[index], drawn[index], attention[index]
                attention = torch.cat([attention, torch.ones(len(active), 1, dtype=torch.long)], 1)
                out = self.model(
                    input_ids=drawn[:, None].to(self.device),
                    attention_mask=attention.to(self.device),
                    position_ids=(next_pos[active] + step)[:, None].to(self.device),
                    past_key_values=cache,
                    use_cache=True,
                )
                scores = out.logits[:, -1]
        return [self._completion(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]

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

    def wake_up(self, tags: list[str] | None = None) -> None:
        """The weights back on the device (`tags` None or with "weights"); the hf engine keeps
        no cache between calls, so "kv_cache" needs nothing."""
        if self.sleep_mode and (tags is None or "weights" in tags):
            self.model.to(self.device)

    def close(self) -> None:
        """Drop the model (nothing else to shut down)."""
        del self.model


class _SeededSampler:
    """Draws each row's next token from the row's own generator, after temperature and top_p.

    Exponential race (what `torch.multinomial` does for one draw): token = argmax_v p_v / e_v
    with e_v ~ Exp(1) drawn from the row's generator, which picks v with probability p_v. The
    noise is per row, the argmax is over all rows at once; row r's draw depends only on its
    seed and its distribution, and a perturbation of the probabilities by float rounding (other
    batch neighbours, other ranks) flips a draw only where two ratios tie to that precision,
    unlike an inverse-CDF draw, whose cumulative sum over the vocabulary moves every boundary.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: Any) -> None:
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def draw(self, scores: Any, rows: Any) -> tuple[Any, Any]:
        """Tokens `# (b,)` for logits `# (b, V)` of these rows (indices into the seeds) and
        their log-probs under the processed distribution, both on the CPU."""
        import torch

        scores = scores.float()  # (b, V)
        if self.temperature == 0:
            logp = torch.log_softmax(scores, dim=-1)
            tokens = logp.argmax(dim=-1)
        else:
            logp = torch.log_softmax(_top_p(scores / self.temperature, self.top_p), dim=-1)
            noise = torch.empty_like(logp)  # (b, V): -log U ~ Exp(1), U from the row's stream
            for k, r in enumerate(rows.tolist()):
                noise[k].uniform_(generator=self.generators[r])
            noise.log_().neg_().clamp_(min=torch.finfo(noise.dtype).tiny)
            tokens = (logp.exp() / noise).argmax(dim=-1)  # p = 0 never wins
        picked = logp.gather(1, tokens[:, None])[:, 0]
        return tokens.cpu(), picked.cpu()


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
