"""DALI two-view loader: decode and augment on the GPU (or the same graph on CPU operators).

The host side decides everything random (see `pipelines.dali_ops`): it walks the rank's
`shard_indices` for the epoch, reads the batch's file bytes (8-bit JPEG or PNG: tools.convert
normalised everything else; sizes and lengths from `<split>_sizes.npy`) or array images, draws
each view's parameters with the one sampler from (seed, epoch, index, view) and feeds all of it
through one batch-mode `external_source`. A damaged file, or one DALI cannot decode, is a
one-line `DatasetError` naming it. The graph, read top to bottom in
`dali_ops.simclr_view`, decodes (nvJPEG "mixed" on a GPU, libjpeg-turbo on CPU) and crops; on the
CPU it also renders the tail (flip, jitter in random order, grayscale, blur) and normalises. On a
GPU the loader renders the tail with `pipelines.render_gpu` and normalises in torch.

Resume: a view depends only on (seed, epoch, index, view), so resuming at batch b of epoch e
just starts the feed at b. A pipeline that finished its epoch is reset and fed the next one
(building one costs about 0.4 s on a CPU, a tenth of a CIFAR epoch); an epoch left midway
drops its pipeline, and the next pass builds a fresh one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import torch

from pipelines.augment_params import sample_views
from pipelines.dali_ops import simclr_view, view_inputs
from pipelines.formats import FormatError, image_size
from pipelines.loader_base import TwoViewLoader, pixel_stats, to_device
from pipelines.sources import DatasetError, Split, show_path
from pipelines.spec import AugmentSpec, TwoViewBatch


class _EpochFeed:
    """Batch-mode external_source callback: one call per batch, in shard order, then
    StopIteration."""

    def __init__(self, loader: DaliTwoViewLoader, epoch: int, indices: np.ndarray,
                 start_batch: int):
        # A weak reference: loader -> idle pipeline -> feed -> loader would be a cycle, leaving the
        # pipeline to the garbage collector, which might run its destructor in a forked child.
        self.loader = weakref.proxy(loader)
        self.per_view = _per_view_inputs(loader.device.type == "cuda")
        self.restart(epoch, indices, start_batch)

    def restart(self, epoch: int, indices: np.ndarray, start_batch: int) -> None:
        """Feed the shard `indices` of `epoch` from `start_batch` on (before the pipeline's
        reset)."""
        self.epoch, self.indices, self.batch = epoch, indices, start_batch

    def __call__(self):
        ld = self.loader
        lo = self.batch * ld.batch_size
        idx = np.ascontiguousarray(self.indices[lo:lo + ld.batch_size])
        if len(idx) == 0:
            raise StopIteration
        self.batch += 1
        images, heights, widths = ld.read(idx)
        views = []
        for v in (0, 1):
            boxes, params = sample_views(ld.spec, ld.seed, self.epoch, idx, v, heights, widths)
            views.extend(view_inputs(boxes, params)[:self.per_view])
        return (images, *views, ld.labels[idx], idx)


def _per_view_inputs(gpu: bool) -> int:
    """roi_start, roi_end and, where the graph renders the tail (CPU), the packed parameters."""
    return 2 if gpu else 3


def _two_view_pipeline(feed, spec: AugmentSpec, kind: str, device: str, out_dtype, **pipe_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    n_view = _per_view_inputs(device == "gpu")

    @pipeline_def(**pipe_kwargs)
    def pipe():
        # 0. host feed: images (JPEG/PNG bytes or HWC uint8), two views' parameters, label, index;
        #    every output is consumed below (an unused one makes DALI warn)
        outs = fn.external_source(source=feed, num_outputs=3 + 2 * n_view, batch=True,
                                  no_copy=False)
        data, labels, index = outs[0], outs[-2], outs[-1]
        # 1. decode (nvJPEG on the GPU via "mixed"), or copy the arrays to the device
        if kind == "files":
            # EXIF orientation is not applied, as torchvision's decode_image does not: tools.convert
            # stores EXIF-rotated images upright as PNGs, so no file read here is rotated
            image = fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu",
                                      output_type=types.RGB, adjust_orientation=False)
        else:
            image = data.gpu() if device == "gpu" else data
        # 2. two independent views of the same decoded image
        views = []
        for v in range(2):
            start, end, *params = outs[1 + v * n_view:1 + (v + 1) * n_view]
            views.append(simclr_view(image, start, end, params[0] if params else None, spec, device,
                                     out_dtype))
        return views[0], views[1], labels, index

    return pipe()


class DaliTwoViewLoader(TwoViewLoader):
    """Two SimCLR views per sample from DALI; see the module docstring and `pipelines.loader`."""

    def __init__(self, split: Split, spec: AugmentSpec, *, prefetch: int = 2, **settings):
        super().__init__(split, spec, **settings)
        self.num_workers, self.prefetch = max(1, self.num_workers), prefetch
        self.labels = np.asarray(split.labels, dtype=np.int64)
        self.kind = split.kind
        self._idle: tuple | None = None  # (pipeline, feed) of the last epoch run to its end
        if self.kind == "array" and split.images.ndim != 4:
            raise ValueError(f"split '{split.name}': images must be uint8 [N, H, W, C], got shape "
                             f"{split.images.shape}")
        self._mean, self._std = pixel_stats(spec, self.device)

    # ---- host reads -----------------------------------------------------------------------
    def read(self, idx: np.ndarray):
        """The batch's inputs for the feed: (images, heights, widths)."""
        if self.kind == "array":
            order = np.argsort(np.argsort(idx))
            imgs = np.ascontiguousarray(self.split.images[np.sort(idx)][order])
            if imgs.shape[-1] == 1:
                imgs = np.repeat(imgs, 3, axis=-1)
            n, h, w = imgs.shape[:3]
            return imgs, np.full(n, h), np.full(n, w)
        blobs = [np.frombuffer(self.split.file_bytes(i), dtype=np.uint8) for i in idx]
        if self.split.sizes is not None:  # recorded at conversion: JPEG and PNG alike
            return blobs, self.split.sizes[idx, 0], self.split.sizes[idx, 1]
        heights, widths = [], []
        for i, blob in zip(idx, blobs, strict=True):
            try:
                h, w = image_size(blob.tobytes(), name=self.split.files[i])
            except FormatError as e:
                raise DatasetError(str(e)) from None
            heights.append(h)
            widths.append(w)
        return blobs, np.array(heights), np.array(widths)

    def _culprit(self, epoch: int, b: int, error: Exception) -> DatasetError:
        """A one-line error for DALI's failure on batch `b`, naming the file it could not decode."""
        from pipelines.formats import decode_rgb

        brief = " ".join(str(error).split())[:200]
        if self.kind == "files":
            # the batch DALI failed on, or one it had prefetched
            idx = self.indices(epoch)[b * self.batch_size:(b + 1 + self.prefetch) * self.batch_size]
            for i in idx:
                try:
                    decode_rgb(self.split.file_bytes(i), name=self.split.files[i])
                except (FormatError, DatasetError) as e:
                    return DatasetError(str(e))
            names = ", ".join(f"'{show_path(self.split.files[i])}'" for i in idx[:3])
            return DatasetError(f"DALI failed on batch {b} of epoch {epoch} ({names}...): {brief}")
        return DatasetError(f"DALI failed on batch {b} of epoch {epoch} of split "
                            f"'{self.split.name}': {brief}")

    # ---- iteration ------------------------------------------------------------------------
    def _build(self, feed: _EpochFeed):
        from nvidia.dali import types

        on_gpu = self.device.type == "cuda"
        out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        device_id = None
        if on_gpu:
            device_id = (self.device.index if self.device.index is not None
                         else torch.cuda.current_device())
        pipe = _two_view_pipeline(feed, self.spec, self.kind, "gpu" if on_gpu else "cpu", out_dtype,
                                  batch_size=self.batch_size, num_threads=self.num_workers,
                                  device_id=device_id,
                                  prefetch_queue_depth=self.prefetch, seed=self.seed & 0x7FFFFFFF,
                                  exec_async=True, exec_pipelined=True)
        pipe.build()
        return pipe

    def _to_torch(self, tl, index: np.ndarray, view: int, epoch: int) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            from pipelines.render_gpu import render_batch

            t = tl.as_tensor()
            # [B, S, S, 3] cropped
            img = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(t, img, cuda_stream=torch.cuda.current_stream(self.device))
            # the sizes matter to the crop only, done already
            _, params = sample_views(self.spec, self.seed, epoch, index, view, 1, 1)
            x = render_batch(img, params)  # [B, 3, S, S] pixel values, channels_last
            return ((x - self._mean) / self._std).to(self.dtype)
        out = torch.from_numpy(np.array(tl.as_tensor()))
        return out.permute(0, 3, 1, 2).to(self.dtype)  # HWC storage = channels_last [B, 3, S, S]

    def _epoch(self, epoch: int, indices: np.ndarray, batches: range) -> Iterator[TwoViewBatch]:
        start, n_batches = batches.start, batches.stop
        if self._idle is not None:
            pipe, feed = self._idle
            self._idle = None
            feed.restart(epoch, indices, start)
            pipe.reset()
        else:
            feed = _EpochFeed(self, epoch, indices, start)
            pipe = self._build(feed)
        try:
            for b in batches:
                try:
                    v1, v2, labels, index = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI pipeline ended after {b} of {n_batches} batches in "
                                       f"epoch {epoch}") from None
                except DatasetError:
                    raise
                except Exception as e:  # DALI's decode error names no file: find it on the host
                    raise self._culprit(epoch, b, e) from None
                idx = np.array(index.as_tensor()).reshape(-1)
                label = torch.from_numpy(np.array(labels.as_tensor())).view(-1)
                yield TwoViewBatch(self._to_torch(v1, idx, 0, epoch),
                                   self._to_torch(v2, idx, 1, epoch),
                                   to_device(label, self.device),
                                   to_device(torch.from_numpy(idx), self.device))
            try:  # the feed is exhausted: this reaches the end of the epoch, so reset() may follow
                pipe.run()
            except StopIteration:
                self._idle = (pipe, feed)
            else:
                raise RuntimeError(f"DALI pipeline yielded more than {n_batches} batches in epoch "
                                   f"{epoch}")
        finally:
            del pipe
