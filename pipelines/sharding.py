"""Epoch order, per-rank shards and per-sample seeds shared by every backend.

A shard is a strided slice of the epoch's permutation, so the ranks' shards are disjoint
and together cover the epoch. With `drop_last` every rank gets the same whole number of
batches (needed when the loss gathers across ranks); the few samples dropped change every
epoch because the permutation does, and the count is reported by `dropped_per_epoch`.
"""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def shard_indices(
    n: int,
    rank: int,
    world: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    batch_size: int | None = None,
    drop_last: bool = False,
) -> np.ndarray:
    """Indices of the split that `rank` of `world` reads in `epoch`, in reading order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    order = epoch_order(n, seed, epoch, shuffle)
    if drop_last:
        if batch_size is None:
            raise ValueError("drop_last needs batch_size")
        per_rank = (n // (world * batch_size)) * batch_size
        if per_rank == 0:
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch_size} on each of {world} processes: "
                f"lower data.batch_size"
            )
        return order[: per_rank * world][rank::world]
    return order[rank::world]


def dropped_per_epoch(n: int, world: int, batch_size: int) -> int:
    return n - (n // (world * batch_size)) * batch_size * world

