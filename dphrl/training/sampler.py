"""The data position: which prompts the next step trains on, as a resumable stream.

Prompts are drawn in epochs, each a fresh permutation seeded by (seed, epoch), and a batch
that runs past the end of an epoch continues into the next. The whole position is two
integers, (epoch, offset), which a checkpoint stores as JSON; from them the stream continues
exactly where it stopped. Peers' resume bugs this shape rules out: the position is restored
(not restarted at the epoch's start), and a run stopped exactly at an epoch's end continues
with the next epoch's first batch instead of finding "no batches left" and running zero steps.
"""

from __future__ import annotations

import math

import numpy as np

from dphrl.errors import DataError


class EpochSampler:
    """An endless stream of item indices in per-epoch seeded permutations.

    The permutation of an epoch depends only on (seed, epoch), so it is recomputed on resume
    rather than stored.
    """

    def __init__(self, n_items: int, seed: int = 0) -> None:
        if n_items < 1:
            raise DataError(
                "no prompts to train on: the training set is empty; check task.path / task.limit"
            )
        self.n_items = n_items
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        # A SeedSequence from both numbers: seed 0 epoch 1 and seed 1 epoch 0 differ.
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.n_items).tolist()

    def next_batch(self, size: int) -> list[int]:
        """The next `size` indices, crossing into the next epoch when this one runs out."""
        if size < 1:
            raise ValueError(f"batch size {size}: must be at least 1")
        batch: list[int] = []
        while len(batch) < size:
            if self.offset >= self.n_items:
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(batch), self.n_items - self.offset)
            batch.extend(self._order[self.offset : self.offset + take])
            self.offset += take
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position as JSON-able integers, for the checkpoint's trainer_state."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "n_items": self.n_items,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position; refuse one saved over different data."""
        if state["n_items"] != self.n_items or state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint's data position was saved for {state['n_items']} prompts with seed "
                f"{state['seed']}, but this run has {self.n_items} with seed {self.seed}; resume with "
                "the same task, task.limit and seed, or start a new run folder"
            )
        self.epoch = state["epoch"]
        self.offset = state["offset"]
        self._order = self._permutation(self.epoch)


def steps_for_epochs(epochs: float, n_prompts: int, prompts_per_step: int) -> int:
    """`trainer.epochs` as steps: enough batches of `prompts_per_step` to see every prompt
    `epochs` times (the last batch may cross into the next epoch, as the sampler does)."""
    return max(1, math.ceil(epochs * n_prompts / prompts_per_step))
