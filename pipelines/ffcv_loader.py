"""FFCV two-view loader: `<dataset dir>/<split>.beton` through two seeded numba pipelines.

Per view, top to bottom (`view_pipeline`): decode + random resized crop, then the tail (flip,
colour jitter in random order, grayscale, Gaussian blur; `ffcv_ops.SimCLRTail`, the numba kernel
of `pipelines.render_cpu`), to a torch tensor, then normalisation in torch. Every parameter comes
from the one sampler, keyed by (seed, epoch, index, view). On a CUDA device the tail runs after
the transfer instead, as `pipelines.render_gpu` with the same parameters. The order is
the rank's `shard_indices`, served by a traversal order that this loader controls, so no
process group is needed; one compiled FFCV Loader serves every epoch (the epoch reaches the
compiled code through `EpochKey`). Resume starts the traversal at the saved batch.
"""

from __future__ import annotations

import queue
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipelines.loader_base import TwoViewLoader, pixel_stats, to_device
from pipelines.sources import DatasetError, Split, find_beton
from pipelines.spec import AugmentSpec, TwoViewBatch


def beton_path(split: Split) -> Path:
    """The split's FFCV file, checked (missing or truncated: `DatasetError`)."""
    if split.root is None:
        raise ValueError(f"split '{split.name}' has no dataset directory (Split.root): open it "
                         f"with pipelines.sources.open_dataset(...).split(...)")
    return find_beton(split.root, split.name, split.artefacts)


def view_pipeline(spec: AugmentSpec, key, device: torch.device,
                  colour_on_device: bool = False) -> list:
    """The FFCV operations of one SimCLR view, ending on `device` as uint8 NHWC.

    With `colour_on_device`, the tail is left to `pipelines.render_gpu` after the transfer (the
    loader applies it), so the CPU only decodes and crops.
    """
    from ffcv.transforms import ToDevice, ToTensor

    from pipelines.ffcv_ops import SeededRandomResizedCrop, SimCLRTail

    ops = [SeededRandomResizedCrop(spec.size, spec.crop_area, spec.crop_ratio, key)]
    if not colour_on_device:
        ops.append(SimCLRTail(spec, key))
    ops.append(ToTensor())
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


class FfcvTwoViewLoader(TwoViewLoader):
    """Two SimCLR views per sample from an FFCV file; see the module docstring and
    `pipelines.loader`."""

    def __init__(self, split: Split, spec: AugmentSpec, *, timeout_s: float = 300.0,
                 colour_on_device: bool | None = None, **settings):
        super().__init__(split, spec, **settings)
        self.num_workers, self.timeout_s = max(1, self.num_workers), timeout_s
        # the tail in torch after ToDevice (default: on CUDA devices)
        self.colour_on_device = (self.device.type == "cuda" if colour_on_device is None
                                 else bool(colour_on_device))
        self.path = beton_path(split)
        self._order = np.ascontiguousarray(self.indices(0))
        self._ffcv = None
        self._mean, self._std = pixel_stats(spec, self.device)

    # ---- the FFCV Loader, built once --------------------------------------------------------
    def _loader(self):
        if self._ffcv is not None:
            return self._ffcv
        from ffcv.fields.decoders import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor
        from ffcv.traversal_order.base import TraversalOrder

        from pipelines.ffcv_ops import EpochKey

        # weak: self -> FFCV Loader -> order -> self would leave the loader to the cycle collector
        owner = weakref.proxy(self)

        class ShardOrder(TraversalOrder):
            # FFCV accepts an order instance and calls it with the loader.
            def __init__(self):
                pass

            def __call__(self, loader):
                super().__init__(loader)
                return self

            def sample_order(self, epoch: int):
                return owner._order

        self._keys = (EpochKey(), EpochKey())
        threads = torch.get_num_threads()
        # each view with its own spec (`view1`/`view2` overrides)
        views = [view_pipeline(self.spec.for_view(v), key, self.device, self.colour_on_device)
                 for v, key in enumerate(self._keys)]
        self._ffcv = Loader(
            str(self.path), batch_size=self.batch_size, num_workers=self.num_workers,
            order=ShardOrder(),
            os_cache=True, drop_last=False, batches_ahead=2,
            pipelines={
                "image": views[0],
                "label": [IntDecoder(), ToTensor()],
                "index": [IntDecoder(), ToTensor()],
                "image_0": PipelineSpec("image", decoder=None, transforms=views[1]),
            },
        )
        torch.set_num_threads(threads)  # FFCV's Loader sets it to num_workers process-wide
        return self._ffcv

    def _view(self, img: torch.Tensor, index: np.ndarray, view: int, epoch: int) -> torch.Tensor:
        """uint8 NHWC from FFCV -> the normalised float view [B, 3, S, S], channels_last."""
        if self.colour_on_device:
            from pipelines.augment_params import sample_views
            from pipelines.render_gpu import render_batch

            # the sizes matter to the crop only, done already
            _, params = sample_views(self.spec, self.seed, epoch, index, view, 1, 1)
            x = render_batch(img, params)  # [B, 3, S, S] float32 pixel values
        else:
            # NHWC storage = channels_last [B, 3, S, S]
            x = img.permute(0, 3, 1, 2).to(torch.float32)
        x = ((x - self._mean) / self._std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last)

    def _epoch(self, epoch: int, indices: np.ndarray, batches: range) -> Iterator[TwoViewBatch]:
        loader = self._loader()
        # Contiguous: a strided shard would give the compiled code new array types and recompile it.
        self._order = np.ascontiguousarray(indices[batches.start * self.batch_size:])
        self._keys[0].set(self.seed, epoch, 0)
        self._keys[1].set(self.seed, epoch, 1)
        threads = torch.get_num_threads()
        it = iter(loader)
        torch.set_num_threads(threads)
        try:
            for b in batches:
                img1, label, index, img2 = self._next(it, epoch, b)
                # FFCV reuses its buffers: normalising copies the views; copy labels and indices.
                idx = index.reshape(-1).numpy().astype(np.int64) if self.colour_on_device else None
                yield TwoViewBatch(self._view(img1, idx, 0, epoch), self._view(img2, idx, 1, epoch),
                                   to_device(label.reshape(-1).to(torch.int64), self.device),
                                   to_device(index.reshape(-1).to(torch.int64), self.device))
        finally:
            it.close()

    def _next(self, it, epoch: int, b: int):
        """Next batch of FFCV's epoch thread, or an exception if the thread died or stalled
        (an error inside an FFCV pipeline kills its thread and would leave `next()` waiting
        forever)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                item = it.output_queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not it.is_alive():
                    raise DatasetError(
                        f"FFCV loader thread died at batch {b} of epoch {epoch} of '{self.path}' "
                        f"(its traceback is printed above): check the file with 'python -m "
                        f"tools.convert --verify {self.path.parent}' or re-run tools.convert"
                    ) from None
                if time.monotonic() > deadline:
                    raise DatasetError(
                        f"FFCV loader produced no batch in {self.timeout_s:.0f} s (batch {b} of "
                        f"epoch {epoch} of '{self.path}'): check the file with 'python -m "
                        f"tools.convert --verify {self.path.parent}', or try "
                        f"data.backend=torchvision") from None
        if item is None:
            raise DatasetError(f"FFCV epoch ended early at batch {b} of epoch {epoch} of "
                               f"'{self.path}': check it with 'python -m tools.convert --verify "
                               f"{self.path.parent}'")
        slot, result = item
        if self.device.type == "cuda":
            it.current_stream.wait_stream(it.cuda_streams[slot])
        return result

