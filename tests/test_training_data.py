"""training.data: seeded samples, the epoch sampler and exact sharded evaluation."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from training.data import (EpochSampler, SeededSamples, ShardSampler, StreamSampler, mixed_seed, seed_step,
                           stream_loader, train_loader)
from training.distributed import DistInfo


class _RandomDraws(Dataset):
    """Each item: its index and one draw from each of Python's, NumPy's and torch's global generators."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def draws(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        out.append(torch.cat(list(loader)))
    return out


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_a_sample_depends_on_seed_epoch_and_index_only_not_on_the_workers():
    by_workers = {}
    for workers in (0, 2):
        loader = train_loader(_RandomDraws(), 3, seed=5, dist=DistInfo(), num_workers=workers, pin_memory=False)
        by_workers[workers] = draws(loader)
    for a, b in zip(by_workers[0], by_workers[2]):
        assert torch.equal(a, b)
    epoch0, epoch1 = by_workers[0]
    assert not torch.equal(epoch0, epoch1)  # another epoch, another order and other draws
    # the same index in another epoch draws differently; the same (epoch, index) always draws the same
    dataset = SeededSamples(_RandomDraws(), seed=5)
    assert torch.equal(dataset[(0, 3)], dataset[(0, 3)]) and not torch.equal(dataset[(0, 3)], dataset[(1, 3)])


def test_persistent_workers_give_each_epoch_its_own_draws_after_a_restart():
    """A resumed run starts new workers at epoch 1: its samples must equal those of workers that ran epoch 0."""
    loader = train_loader(_RandomDraws(), 3, seed=1, dist=DistInfo(), num_workers=2, pin_memory=False)
    straight = draws(loader)[1]
    resumed = train_loader(_RandomDraws(), 3, seed=1, dist=DistInfo(), num_workers=2, pin_memory=False)
    assert torch.equal(draws(resumed, epochs=(1,))[0], straight)


@pytest.mark.parametrize("length, world_size", [(12, 1), (13, 2), (10, 3)])
def test_epoch_sampler_deals_one_permutation_over_the_ranks(length, world_size):
    shares = []
    for rank in range(world_size):
        sampler = EpochSampler(length, seed=0, rank=rank, world_size=world_size)
        sampler.set_epoch(4)
        shares.append([i for e, i in sampler])
        assert all(e == 4 for e, _ in sampler) and len(sampler) == length // world_size
    flat = sum(shares, [])
    assert len(set(flat)) == len(flat) == (length // world_size) * world_size  # disjoint, equal, tail dropped
    other = EpochSampler(length, seed=0, rank=0, world_size=world_size)
    other.set_epoch(5)
    assert [i for _, i in other] != shares[0] or length // world_size < 2


@pytest.mark.parametrize("make, epoch, start, left, error, too_far", [
    (lambda: EpochSampler(20, seed=3), 2, 7, 13, "outside this rank's 20 samples", 21),
    (lambda: StreamSampler(6, seed=0, window=4), 3, 3, 1, "outside a window of 4", 5),
])
def test_samplers_can_start_in_the_middle_of_their_epoch(make, epoch, start, left, error, too_far):
    sampler = make()
    sampler.set_epoch(epoch)
    full = list(sampler)
    sampler.set_epoch(epoch, start=start)
    assert list(sampler) == full[start:] and len(sampler) == left
    with pytest.raises(ValueError, match=error):
        sampler.set_epoch(epoch, start=too_far)


def test_step_seeds_depend_on_rank_and_index():
    seed_step(0, 0, 5)
    a = torch.rand(3)
    seed_step(0, 0, 5)
    assert torch.equal(torch.rand(3), a)
    seed_step(0, 1, 5)
    assert not torch.equal(torch.rand(3), a)
    assert len({mixed_seed(0, e, i) for e in range(50) for i in range(1000)}) == 50 * 1000


def test_train_loader_drops_the_last_partial_batch():
    loader = train_loader(_RandomDraws(), 5, seed=2, dist=DistInfo(), num_workers=0, pin_memory=False)
    assert len(loader) == 2 and [len(batch) for batch in loader] == [5, 5]


@pytest.mark.parametrize("world_size", [1, 2])
def test_stream_sampler_windows_continue_the_epochs_of_the_data(world_size):
    """Windows of 5 samples over a dataset of 7 (3 per rank with 2 ranks): each rank's stream is its shares of
    EpochSampler's epochs 0, 1, 2, ... in order, and a window may span two of them."""
    for rank in range(world_size):
        sampler = StreamSampler(7, seed=4, window=5, rank=rank, world_size=world_size)
        stream = []
        for window in range(4):
            sampler.set_epoch(window)
            stream += list(sampler)
            assert len(sampler) == 5
        epochs = EpochSampler(7, seed=4, rank=rank, world_size=world_size)
        expected = []
        for epoch in range(20):
            epochs.set_epoch(epoch)
            expected += list(epochs)
        assert stream == expected[:20]


def test_stream_loader_gives_each_epoch_its_batches_and_resumes_exactly():
    """An iteration-based run resumed at epoch 2 (with new workers) gets the batches an uninterrupted one got."""
    loader = stream_loader(_RandomDraws(), 3, seed=1, dist=DistInfo(), num_workers=0, pin_memory=False,
                           batches_per_epoch=5)  # 15 samples per epoch of the run, 12 in the data
    straight = draws(loader, epochs=(0, 1, 2))
    assert len(loader) == 5 and all(len(epoch) == 15 for epoch in straight)
    assert sorted(straight[0][:12, 0].tolist()) == list(range(12))  # the first pass over the data, shuffled
    resumed = stream_loader(_RandomDraws(), 3, seed=1, dist=DistInfo(), num_workers=2, pin_memory=False,
                            batches_per_epoch=5)
    assert torch.equal(draws(resumed, epochs=(2,))[0], straight[2])
