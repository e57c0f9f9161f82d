"""The weight sync: the trainer's updated weights into the rollout engine, once a step.

The sequence on a GPU colocating FSDP and vLLM (as verl's and TRL's colocate modes do it):

    engine.sleep()                     before training: weights and KV cache released
                                       (vLLM sleep level 2: the weights are about to be
                                       overwritten, so they are dropped, not copied to host)
    ... the training phase ...
    free_cache                         the allocator's cached blocks back to the device
    engine.wake_up(["weights"])        the weight buffers only; no KV cache yet
    engine.load_weights(stream)        full tensors one at a time (all-gathered from the
                                       FSDP shards, or W + BA under LoRA), in the engine's dtype
    free_cache                         the last gathered tensor's memory
    engine.wake_up(["kv_cache"])       then the KV cache, into the memory training left

`stream` yields each full tensor and drops it before the next, so the sync holds at most two
full parameters beyond the shards (the one vLLM loads, and the one its loader's
`itertools.groupby` reads ahead); the engine must consume it lazily (`VLLMEngine.load_weights`
passes the generator through to vLLM's `reload_weights`; tests/training/test_gpu_path.py counts
them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from dphrl import dist

if TYPE_CHECKING:
    from dphrl.engine import Engine


def full_tensors(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Named full parameters, one at a time, in `dtype` (None: as stored).

    A DTensor shard (FSDP2) is cast, all-gathered into a full tensor (a collective: every
    rank iterates the same names in the same order), yielded, and released before the next.
    """
    for name, param in model.named_parameters():
        tensor = param.detach() if dtype is None else param.detach().to(dtype)  # cast the shard
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()  # then gather it: half the bytes for bfloat16
        yield name, tensor
        del tensor


def merged_tensors(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights with each LoRA delta merged, under the base model's names.

    A LoRA layer yields `base_layer.weight + delta` as `<layer>.weight`; the adapter's own
    parameters are not yielded; everything else passes through. The model is not changed.
    """
    from peft.tuners.lora import LoraLayer

    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        tensor = param.detach()
        if owner in lora_layers and name.endswith(".base_layer.weight"):
            layer = lora_layers[owner]
            for adapter in layer.active_adapters:
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor if dtype is None else tensor.to(dtype)
        del tensor


def push(policy: torch.nn.Module, engine: Engine, device: str, *, lora: bool, dtype: Any) -> None:
    """The sequence above: wake the engine's weights, stream the policy's into them, then the
    KV cache. `dtype` is the engine's (a torch dtype or its name): each tensor travels in it."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dist.free_cache(device)
    engine.wake_up(["weights"])
    tensors = merged_tensors(policy, dtype) if lora else full_tensors(policy, dtype)
    engine.load_weights(tensors)
    dist.free_cache(device)
    engine.wake_up(["kv_cache"])
