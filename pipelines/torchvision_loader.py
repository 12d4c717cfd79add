"""The reference two-view loader: torchvision v2 transforms on CPU workers.

It is the baseline the fast backends are measured against and the oracle of the
statistical tests, so it stays a plain, readable rendering of the spec.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from pipelines.sharding import ShardedEpochs, sample_seed
from pipelines.sources import Split
from pipelines.spec import AugmentSpec, TwoViewBatch


def simclr_transform(spec: AugmentSpec) -> v2.Compose:
    """One SimCLR view, uint8 [3, H, W] -> float [3, S, S], in the paper's order."""
    ops = [
        v2.RandomResizedCrop(spec.size, scale=spec.crop_area, ratio=spec.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        # ColorJitter draws a fresh random order of its four adjustments per call.
        v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
    ]
    if spec.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.blur_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(ops)


def eval_transform(spec: AugmentSpec) -> v2.Compose:
    """Deterministic view for evaluation: resize the short side, centre crop, normalise."""
    return v2.Compose([
        v2.Resize(spec.size, antialias=True),
        v2.CenterCrop(spec.size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])


def load_image(split: Split, index: int) -> torch.Tensor:
    """uint8 [3, H, W] for sample `index` of the split (grayscale expanded to 3 channels)."""
    if split.images is not None:
        img = torch.from_numpy(np.array(split.images[index])).permute(2, 0, 1)  # [C, H, W]
        return img.expand(3, -1, -1) if img.shape[0] == 1 else img
    path = split.files[index]
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"cannot decode image '{path}' ({e}): re-run tools.convert to drop unreadable files") from None


class TwoViewDataset(Dataset):
    """Items are keyed by (epoch, index) so each sample's views depend only on (seed, epoch, index)."""

    def __init__(self, split: Split, spec: AugmentSpec, seed: int):
        self.split, self.seed = split, seed
        self.transform = simclr_transform(spec)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img = load_image(self.split, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            v1, v2_ = self.transform(img), self.transform(img)
        return v1, v2_, int(self.split.labels[index]), index


class _EpochBatches:
    """Batch sampler reading the owning loader's epoch and start position at each iteration."""

    def __init__(self, loader: TorchvisionTwoViewLoader):
        # A weak reference: a cycle loader -> DataLoader -> sampler -> loader would leave the
        # workers to the cycle collector, which joins each one with a 5 s timeout.
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        ld = self.loader
        idx = ld.indices()
        for b in range(ld._start_batch, len(ld)):
            yield [(ld.epoch, int(i)) for i in idx[b * ld.batch_size : (b + 1) * ld.batch_size]]

    def __len__(self) -> int:
        return len(self.loader) - self.loader._start_batch


def _worker_init(_):
    torch.set_num_threads(1)  # workers are processes already; threads would oversubscribe


class TorchvisionTwoViewLoader(ShardedEpochs):
    def __init__(self, split: Split, spec: AugmentSpec, *, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_workers: int = 2, shuffle: bool = True, drop_last: bool = True):
        self.split, self.spec = split, spec
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.device, self.dtype = torch.device(device), dtype
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self._start_batch, self._batch = 0, 0, 0
        self._dl = DataLoader(
            TwoViewDataset(split, spec, seed),
            batch_sampler=_EpochBatches(self),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if num_workers > 0 else None,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def __iter__(self):
        self._batch = self._start_batch
        for v1, v2_, label, index in self._dl:
            self._batch += 1
            yield TwoViewBatch(self._to_device(v1), self._to_device(v2_), label.to(self.device), index.to(self.device))
        self._start_batch = 0
