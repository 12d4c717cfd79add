"""Epoch order and per-rank shards: disjoint, covering, equal-length under drop_last,
reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sharding import dropped_per_epoch, epoch_order, shard_indices

# (n, world, batch_size): divisible, not divisible, world 1, world larger than a batch, ...
CASES = [(64, 2, 8), (100, 4, 8), (101, 3, 7), (37, 1, 5), (1000, 8, 16), (17, 4, 4), (9, 2, 4)]


def _shards(n, world, batch_size, drop_last, seed=0, epoch=0):
    return [shard_indices(n, r, world, seed=seed, epoch=epoch, batch_size=batch_size,
                          drop_last=drop_last)
            for r in range(world)]


@pytest.mark.parametrize("n,world,batch_size", CASES)
@pytest.mark.parametrize("epoch", [0, 3])
def test_shards_partition_the_split_without_drop_last(n, world, batch_size, epoch):
    shards = _shards(n, world, batch_size, drop_last=False, seed=5, epoch=epoch)
    for s in shards:
        assert s.dtype == np.int64 and len(np.unique(s)) == len(s)
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(shards[a].tolist()) & set(shards[b].tolist())
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1  # as even as a strided split allows
    assert sum(lengths) == n


@pytest.mark.parametrize("n,world,batch_size", CASES)
@pytest.mark.parametrize("epoch", [0, 3])
def test_drop_last_gives_equal_whole_batches_and_drops_exactly_the_reported_count(
        n, world, batch_size, epoch):
    shards = _shards(n, world, batch_size, drop_last=True, seed=5, epoch=epoch)
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1
    per_rank = lengths.pop()
    assert per_rank > 0 and per_rank % batch_size == 0
    # the most batches that fit: one more per rank would need more samples than there are
    assert (per_rank + batch_size) * world > n
    kept = np.concatenate(shards)
    assert len(np.unique(kept)) == len(kept)  # still disjoint
    assert set(kept.tolist()) <= set(range(n))
    assert n - len(kept) == dropped_per_epoch(n, world, batch_size)
    assert 0 <= dropped_per_epoch(n, world, batch_size) < world * batch_size


def test_dropped_per_epoch_closed_form():
    assert dropped_per_epoch(100, 4, 8) == 100 - 96
    assert dropped_per_epoch(64, 2, 8) == 0
    assert dropped_per_epoch(101, 3, 7) == 101 - 84
    assert dropped_per_epoch(1000, 8, 16) == 1000 - 896


def test_drop_last_drops_different_samples_in_different_epochs():
    n, world, bs = 100, 4, 8
    dropped = [frozenset(set(range(n))
                         - set(np.concatenate(_shards(n, world, bs, True, epoch=e)).tolist()))
               for e in range(5)]
    assert len(set(dropped)) > 1


def test_shard_is_a_strided_slice_of_the_epoch_order():
    order = epoch_order(50, 3, 2)
    for r in range(3):
        assert np.array_equal(shard_indices(50, r, 3, seed=3, epoch=2), order[r::3])


def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_seed():
    n = 200
    base = epoch_order(n, seed=1, epoch=0)
    assert sorted(base.tolist()) == list(range(n))
    assert np.array_equal(base, epoch_order(n, seed=1, epoch=0))  # same (seed, epoch), same order
    others = ([epoch_order(n, seed=1, epoch=e) for e in (1, 2, 3)]
              + [epoch_order(n, seed=2, epoch=0)])
    for o in others:
        assert sorted(o.tolist()) == list(range(n))
        assert not np.array_equal(o, base)
    # and so do the shards built on them
    assert not np.array_equal(shard_indices(n, 0, 2, seed=1, epoch=0),
                              shard_indices(n, 0, 2, seed=1, epoch=1))
    assert np.array_equal(shard_indices(n, 1, 2, seed=1, epoch=4),
                          shard_indices(n, 1, 2, seed=1, epoch=4))


def test_no_shuffle_reads_in_order():
    assert np.array_equal(epoch_order(10, 7, 3, shuffle=False), np.arange(10))
    assert shard_indices(10, 1, 3, epoch=5, shuffle=False).tolist() == [1, 4, 7]
    assert (shard_indices(10, 1, 2, shuffle=False, batch_size=2, drop_last=True).tolist()
            == [1, 3, 5, 7])


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (5, 4), (0, 0)])
def test_bad_rank_raises(rank, world):
    with pytest.raises(ValueError):
        shard_indices(100, rank, world)


@pytest.mark.parametrize("n,world,batch_size", [(7, 1, 8), (15, 2, 8), (0, 1, 1), (31, 4, 8)])
def test_dataset_too_small_for_one_batch_per_rank_raises(n, world, batch_size):
    with pytest.raises(ValueError):
        shard_indices(n, 0, world, batch_size=batch_size, drop_last=True)
    # exactly one batch on every rank is enough
    m = world * batch_size
    assert len(shard_indices(m, world - 1, world, batch_size=batch_size,
                             drop_last=True)) == batch_size


def test_drop_last_without_batch_size_raises():
    with pytest.raises(ValueError):
        shard_indices(100, 0, 2, drop_last=True)
