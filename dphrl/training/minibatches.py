"""A step's rows over the ranks, cut for the update: global minibatches (`algo.minibatch_size`)
and, inside each, micro-batches of at most `trainer.micro_batch_tokens` real tokens.

The counts are agreed over the ranks, so 1 rank and 8 update on the same rollouts, and every
FSDP rank forwards as often (its collectives pair up with the other ranks')."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dphrl import dist
from dphrl.rl.batching import micro_slices

if TYPE_CHECKING:
    from dphrl.rl.batching import Packed
    from dphrl.rl.hybrid import StepBatch


def updates_per_epoch(rollouts: int, minibatch_size: int, group_size: int, device: str) -> int:
    """Adam updates per pass over the step's rollouts: ceil(rollouts on all ranks /
    `algo.minibatch_size`), so 1 GPU and 8 make the same number for the same global batch;
    at most the groups of the rank with fewest, so every rank has rows in every minibatch."""
    if not minibatch_size:
        return 1
    groups = rollouts // group_size
    total, fewest = (
        dist.all_reduce_sum([float(rollouts)], device)[0],
        -float(dist.all_reduce_max([-float(groups)], device)[0]),
    )
    return int(max(1, min(math.ceil(total / minibatch_size), fewest)))


def minibatch_rows(
    batch: StepBatch, n_mb: int, group_size: int, device: str
) -> list[tuple[Tensor, Tensor | None]]:
    """This rank's rows of each global minibatch: prompt group g of the step (counted over
    all ranks) goes to minibatch g mod n_mb, and so does ref-store row j; so a minibatch
    holds the same rollouts on 1 rank and on 8, and a group's responses stay together
    (they share their prompt's forward, `model.pack_tokens`)."""
    n = len(batch)
    n_store = 0 if batch.store is None else len(batch.store)
    group_start, store_start = dist.offsets([n // group_size, n_store], device)
    group_of_row = torch.arange(n) // group_size + group_start
    store_index = torch.arange(n_store) + store_start
    return [
        (
            (group_of_row % n_mb == k).nonzero()[:, 0],
            None if batch.store is None else (store_index % n_mb == k).nonzero()[:, 0],
        )
        for k in range(n_mb)
    ]


def micro_batches(rows: Packed, budget: int, layout: dist.Layout) -> list[tuple[slice, float]]:
    """Micro-batches of `rows` of at most `budget` real tokens each, as many on every rank
    under FSDP, with each one's share of the rows' tokens. A rank with fewer rows than
    micro-batches forwards its first row again at weight 0: FSDP's collectives need every rank
    to forward as often."""
    tokens = rows.attention_mask.sum(-1).tolist()
    parts = len(micro_slices(tokens, budget))
    if dist.forward_on_every_rank(layout):
        parts = int(dist.all_reduce_max([float(parts)], layout.device)[0])
    total = max(sum(tokens), 1)
    out = []
    for s in micro_slices(tokens, budget, parts):
        if s.stop > s.start:
            out.append((s, sum(tokens[s]) / total))
        elif dist.forward_on_every_rank(layout) and tokens:
            out.append((slice(0, 1), 0.0))
    return out
