"""The base class of every loader backend, `TwoViewLoader` (its settings, the epoch's shard and
the resume position), and the helpers the backends share (`to_device`, `pixel_stats`).

The contract a backend keeps is in `pipelines.loader`, whose `build_loader` picks the backend. The
backends import this module and `pipelines.loader` imports the backends, so no import goes back.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipelines.sharding import shard_indices
from pipelines.sources import Split
from pipelines.spec import AugmentSpec, TwoViewBatch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied: to a GPU through (cached) pinned memory and without
    blocking, so the loader never waits for the training step queued before it."""
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.clone()


def pixel_stats(spec: AugmentSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """spec.mean and spec.std in pixel values (0..255) as [1, 3, 1, 1] on `device`: the backends
    that normalise in torch compute (x - mean) / std from uint8 pixels."""
    return tuple(torch.tensor([255.0 * v for v in values], device=device).view(1, 3, 1, 1)
                 for values in (spec.mean, spec.std))


def _check_subset(subset, n: int) -> np.ndarray:
    subset = np.asarray(subset, dtype=np.int64).reshape(-1)
    if len(subset) == 0 or subset.min() < 0 or subset.max() >= n:
        span = f" in [{subset.min()}, {subset.max()}]" if len(subset) else ""
        raise ValueError(f"subset must hold indices in [0, {n}) of the split, got "
                         f"{len(subset)}{span}")
    return subset


class TwoViewLoader:
    """The base of every backend: its settings, the epoch's shard and the resume position.

    A backend implements `_epoch`; `__iter__` hands it the epoch, its shard and the batches
    still to read, and counts the batches handed out for `state_dict`.
    """

    def __init__(self, split: Split, spec: AugmentSpec, *, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, num_workers: int = 2, shuffle: bool = True,
                 drop_last: bool = True, subset: np.ndarray | None = None):
        self.split, self.spec = split, spec
        self.subset = None if subset is None else _check_subset(subset, len(split))
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.device, self.dtype = torch.device(device), dtype
        self.num_workers, self.shuffle, self.drop_last = num_workers, shuffle, drop_last
        # `_start_batch`: where the next pass starts; `_batch`: batches handed out this epoch
        self.epoch, self._start_batch, self._batch = 0, 0, 0
        self.indices()  # fail now on a rank outside the world or an impossible drop_last

    def indices(self, epoch: int | None = None) -> np.ndarray:
        n = len(self.split) if self.subset is None else len(self.subset)
        shard = shard_indices(n, self.rank, self.world, seed=self.seed,
                              epoch=self.epoch if epoch is None else epoch, shuffle=self.shuffle,
                              batch_size=self.batch_size, drop_last=self.drop_last)
        return shard if self.subset is None else self.subset[shard]

    def __len__(self) -> int:
        return self._n_batches(self.indices())

    def _n_batches(self, indices: np.ndarray) -> int:
        return -(-len(indices) // self.batch_size)  # with drop_last the shard is whole batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start_batch, self._batch = int(epoch), 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start_batch = int(state["epoch"]), int(state["batch"])
        self._batch = self._start_batch

    def __iter__(self) -> Iterator[TwoViewBatch]:
        epoch, start = self.epoch, self._start_batch
        self._start_batch = 0  # a resume position serves one pass; the next starts the epoch
        indices = self.indices(epoch)
        n_batches = self._n_batches(indices)
        self._batch = min(start, n_batches)
        if start >= n_batches:
            return
        batches = self._epoch(epoch, indices, range(start, n_batches))
        try:
            for batch in batches:
                self._batch += 1
                yield batch
        finally:  # a pass left midway releases the backend's epoch now, not at garbage collection
            batches.close()

    def _epoch(self, epoch: int, indices: np.ndarray, batches: range) -> Iterator[TwoViewBatch]:
        """Batches `batches` (numbered from 0 in the epoch; `batches.stop` is the epoch's count)
        of the shard `indices` of `epoch`, in order."""
        raise NotImplementedError
