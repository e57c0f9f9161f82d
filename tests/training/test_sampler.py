"""The data position: deterministic epochs, and resume mid-epoch and at an epoch's end."""

from __future__ import annotations

import json

import pytest

from dphrl.errors import DataError
from dphrl.training.sampler import EpochSampler


def _stream(sampler: EpochSampler, steps: int, size: int) -> list[list[int]]:
    return [sampler.next_batch(size) for _ in range(steps)]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = EpochSampler(6, seed=1)
    first, second = sampler.next_batch(6), sampler.next_batch(6)
    assert sorted(first) == sorted(second) == list(range(6))
    assert first != second
    assert sampler.epoch == 1 and sampler.offset == 6


def test_same_seed_same_stream_other_seed_other_stream():
    assert _stream(EpochSampler(9, seed=4), 5, 4) == _stream(EpochSampler(9, seed=4), 5, 4)
    assert _stream(EpochSampler(9, seed=4), 5, 4) != _stream(EpochSampler(9, seed=5), 5, 4)


def test_batch_crosses_epoch_boundary():
    sampler = EpochSampler(5, seed=0)
    reference = EpochSampler(5, seed=0)
    epoch0, epoch1 = reference.next_batch(5), reference.next_batch(5)
    assert sampler.next_batch(3) == epoch0[:3]
    assert sampler.next_batch(4) == epoch0[3:] + epoch1[:2]
    assert sampler.next_batch(12) == epoch1[2:] + reference.next_batch(5) + reference.next_batch(4)


@pytest.mark.parametrize(
    "steps_before", [1, 2, 3], ids=["mid-epoch", "epoch-boundary", "next-epoch"]
)
def test_resume_continues_the_uninterrupted_stream(steps_before):
    # 8 items, batches of 4: after 2 steps the position sits exactly at the end of epoch 0.
    expected = _stream(EpochSampler(8, seed=7), 6, 4)
    first = EpochSampler(8, seed=7)
    done = _stream(first, steps_before, 4)
    saved = json.loads(json.dumps(first.state_dict()))  # through JSON, as a checkpoint stores it

    resumed = EpochSampler(8, seed=7)
    resumed.load_state_dict(saved)
    rest = _stream(resumed, 6 - steps_before, 4)
    assert done + rest == expected
    assert all(len(batch) == 4 for batch in rest)  # never an empty step at the boundary


def test_resume_at_epoch_boundary_starts_next_epoch():
    sampler = EpochSampler(4, seed=0)
    sampler.next_batch(4)
    assert sampler.state_dict()["offset"] == 4
    resumed = EpochSampler(4, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    batch = resumed.next_batch(2)
    assert len(batch) == 2 and resumed.epoch == 1


def test_resume_over_different_data_is_refused():
    saved = EpochSampler(8, seed=7).state_dict()
    with pytest.raises(DataError, match="8 prompts with seed 7"):
        EpochSampler(9, seed=7).load_state_dict(saved)


def test_empty_training_set_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        EpochSampler(0)
