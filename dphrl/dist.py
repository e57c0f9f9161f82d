"""torch.distributed and FSDP2: the layout resolved to processes, devices and shards.

One process (`layout=cpu` or `gpu1`) or many under `torchrun` (`gpu8`, `multinode`, or
`cpu` with `--nproc_per_node 2` over gloo, which is how the tests see it). Every rank rolls
out its share of the prompts and trains on it; FSDP2 (`fully_shard`) shards the policy, and
gradients are averaged across ranks by FSDP (or by an all-reduce when not sharded). Rank 0
alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from dphrl.config import LayoutConfig


@dataclass(frozen=True)
class Layout:
    name: str
    device: str  # "cpu" or "cuda:<local rank>"
    backend: str
    fsdp: bool
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_layout(cfg: LayoutConfig) -> Layout:
    """Turn `layout.*` into a concrete layout; `auto` is gpu1 with CUDA, else cpu."""
    cuda = torch.cuda.is_available()
    name = str(cfg.name) if cfg.name != "auto" else ("gpu1" if cuda else "cpu")
    device = (
        str(cfg.device) if cfg.device != "auto" else ("cuda" if name != "cpu" and cuda else "cpu")
    )
    if device == "cuda" and not cuda:
        from dphrl.errors import ConfigError

        raise ConfigError(f"layout={name} needs CUDA, and torch sees no GPU here; use layout=cpu")
    backend = (
        str(cfg.backend) if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local}"
    if cfg.fsdp and "RANK" not in os.environ:
        from dphrl.errors import ConfigError

        raise ConfigError(
            f"layout.fsdp=true (layout={name}) needs torchrun: torchrun --nproc_per_node N -m dphrl train ..."
        )
    return Layout(name, device, backend, bool(cfg.fsdp), rank, world, local)


def ranks_from_submitit() -> None:
    """Under hydra-submitit-launcher (`hydra/launcher=slurm`) with several tasks, set torchrun's
    variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the job's: each
    task is one rank, as each of torchrun's processes is. Every task keeps seeing all the
    node's GPUs and takes `cuda:<LOCAL_RANK>`. Nothing under torchrun or outside submitit."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)


def init(layout: Layout) -> None:
    """Join the process group when started by torchrun with several ranks or with FSDP."""
    global _OWNED
    if (layout.world_size > 1 or layout.fsdp) and not dist.is_initialized():
        if layout.device.startswith("cuda"):
            torch.cuda.set_device(layout.local_rank)
        dist.init_process_group(backend=layout.backend)
        _OWNED = True


_OWNED = False  # whether `init` made the default group (in-process vLLM may make its own)


def shutdown() -> None:
    """Leave the group `init` joined; a group vLLM made in-process is vLLM's to destroy."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def owns_default_group() -> bool:
    """Whether `init` made the default process group (torchrun), so it is dphrl's to destroy."""
    return _OWNED and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    """This process's rank in the default group; 0 outside one."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group; 1 outside one."""
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(
    model: torch.nn.Module, layout: Layout, compute_dtype: str | None = None
) -> torch.nn.Module:
    """FSDP2: shard each decoder layer, then the root, over a 1-D mesh of all ranks.

    The sharded parameters (the master weights AdamW steps) stay float32. With `compute_dtype`
    (model.dtype bfloat16 on GPUs) each decoder layer all-gathers its weights in that dtype and
    computes in it, and gradients are reduced in float32 (`MixedPrecisionPolicy(param_dtype,
    reduce_dtype=float32)`); the root (embeddings, final norm, lm_head) stays float32, so the
    lm_head and the log-softmax run in float32 as on one process.
    """
    if not layout.fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(
        "cuda" if layout.device.startswith("cuda") else "cpu", (layout.world_size,)
    )
    layer_policy = MixedPrecisionPolicy(
        param_dtype=getattr(torch, compute_dtype or "float32"), reduce_dtype=torch.float32
    )
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    return model


def forward_on_every_rank(layout: Layout) -> bool:
    """FSDP2 ranks must all forward and backward (their collectives), even with nothing to learn."""
    return layout.fsdp and layout.world_size > 1


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def average_gradients(model: torch.nn.Module, layout: Layout) -> None:
    """Without FSDP, average gradients across ranks (FSDP2 reduce-scatters them itself)."""
    if layout.world_size == 1 or layout.fsdp:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum floats across ranks (identity in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: str) -> list[float]:
    """Elementwise maximum of floats across ranks (identity in one process); the minimum is
    minus the maximum of the negated values."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def offsets(counts: list[int], device: str) -> list[int]:
    """Where this rank's items start in the order of all ranks' (rank 0's first): for each
    count, the sum of that count over the lower ranks (0s in one process)."""
    if not dist.is_initialized():
        return [0] * len(counts)
    mine = torch.zeros(dist.get_world_size(), len(counts), dtype=torch.float64, device=device)
    mine[dist.get_rank()] = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(mine)
    return [int(v) for v in mine[: dist.get_rank()].sum(0).tolist()]


def rank_denominator(count: float, layout: Layout) -> float:
    """A count summed over ranks (at least 1), divided by the world size: what each rank
    divides its loss sum by, so that the rank-average of gradients is the global mean's."""
    return max(all_reduce_sum([count], layout.device)[0], 1.0) / layout.world_size


def peak_memory_gib(device: str) -> float | None:
    """The CUDA allocator's peak since the last call, in GiB (None off CUDA); resets the peak,
    so each training phase (rollout, train, weight sync) reports its own."""
    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def free_cache(device: str) -> None:
    """Return the CUDA allocator's cached blocks to the device (a no-op elsewhere): between
    training and the engine's wake-up, so the engine finds the memory training freed."""
    if device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def is_main() -> bool:
    """Rank 0 of the default group, or the one process."""
    return rank() == 0


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself in one process): what rank 0 read or decided
    (the chunks still to do, a build's result), so every rank acts on the same."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere); `[value]` in one process."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out
