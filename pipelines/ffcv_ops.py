"""FFCV operations for SimCLR views, drawn by the one sampler, and the .beton writer.

FFCV's own random operations draw from numba's per-thread global generator, so their output
depends on thread scheduling. The operations here take every random number from the one
sampler (`pipelines.augment_params`), keyed by (seed, epoch, index, view), so FFCV draws the same
views as every other backend. The epoch key lives in a one-element array that the compiled code
reads through its address (`EpochKey`): the loader writes the key before each epoch without
recompiling anything.

Two operations: the decoder's random resized crop (`SeededRandomResizedCrop`) and, on the CPU,
the tail (`SimCLRTail`: flip, colour jitter in random order, grayscale, blur), rendered by the
numba kernel of `pipelines.render_cpu`. A CUDA loader stops after the crop and renders the tail
on the GPU (`pipelines.render_gpu`).
"""

from __future__ import annotations

import gc
import os
import pathlib
from dataclasses import replace

import numba
import numpy as np
import torch
from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

from pipelines.augment_params import (
    DRAW_CROP,
    N_P,
    SALT_VIEW,
    crop_box_of,
    spec_constants,
    stream,
    tail_params,
    view_key,
)
from pipelines.render_cpu import render_tail
from pipelines.sources import BetonWriteError

# Importing ffcv calls torch.set_num_threads(1) process-wide, which halves a 2-core training
# step; keep the caller's setting.
_TORCH_THREADS = torch.get_num_threads()
from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)


@intrinsic
def _as_voidptr(typingctx, src):
    def codegen(cgctx, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return nbt.voidptr(src), codegen


class EpochKey:
    """A uint64 shared by compiled operations and Python: `set(seed, epoch)` before an epoch."""

    def __init__(self):
        self.array = np.zeros(1, dtype=np.uint64)
        self.address = self.array.ctypes.data

    def set(self, seed: int, epoch: int, view: int) -> None:
        self.array[0] = view_key(seed, epoch, view)

    @property
    def value(self) -> np.uint64:
        return self.array[0]

    def reader(self):
        address = self.address

        @numba.njit(inline="always")
        def read():
            return numba.carray(_as_voidptr(address), 1, np.uint64)[0]
        return read


# ---- decoder: random resized crop -----------------------------------------------------------

class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """Decode (JPEG or raw) and random-resized-crop to `size`, the crop keyed by (epoch key, index)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], key: EpochKey):
        super().__init__((size, size))
        self.scale, self.ratio, self.key = scale, ratio, key

    @property
    def get_crop_generator(self):  # required by the base class; generate_code below replaces it
        return None

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        read_key = self.key.reader()
        s_lo, s_hi = float(self.scale[0]), float(self.scale[1])
        r_lo, r_hi = float(self.ratio[0]), float(self.ratio[1])

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = read_key()
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field['data_ptr'], storage_state)
                height = np.uint32(field['height'])
                width = np.uint32(field['width'])
                if field['mode'] == 0:  # jpg
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = crop_box_of(key, np.int64(source_ix), SALT_VIEW, DRAW_CROP, np.int64(height),
                                         np.int64(width), s_lo, s_hi, r_lo, r_hi)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---- the tail: flip, colour jitter, grayscale, blur (one numba kernel, `pipelines.render_cpu`) ---

@numba.njit(parallel=True, nogil=True)
def tail_batch(images, indices, key, flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size):
    """Draw each sample's tail parameters from the one sampler and render them, in place.
    Compiled once per process; FFCV's generated code calls it with the epoch's key. Also callable
    from Python on uint8 [B, H, W, 3] with int64 [B] indices and `spec_constants(spec)[4:]`."""
    for i in numba.prange(images.shape[0]):
        p = np.empty(N_P)
        tail_params(stream(key, indices[i]), flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size, p)
        render_tail(images[i], p)


class SimCLRTail(Operation):
    """Flip, colour jitter in random order, grayscale and blur of uint8 NHWC batches (CPU), keyed by
    (epoch key, sample index) through the one sampler."""

    def __init__(self, spec, key: EpochKey):
        super().__init__()
        self.key = key
        # the sampler's constants after the crop's (see augment_params.spec_constants)
        self.consts = spec_constants(spec)[4:]

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None

    def generate_code(self):
        read_key = self.key.reader()
        flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size = self.consts

        def tail(images, _dst, indices):
            tail_batch(images, indices, read_key(), flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi,
                       kernel_size)
            return images

        tail.with_indices = True
        return tail


# ---- writer ---------------------------------------------------------------------------------

class _SplitItems:
    """(image, label, index) of a split for FFCV's writer; file images through `decode_rgb`, the
    pixels every backend sees. `current` is the item being written (for a worker's error)."""

    def __init__(self, split):
        self.split = split
        self.current = None

    def __len__(self):
        return len(self.split)

    def describe(self, i) -> str:
        if i is None:
            return "before the first image"
        if self.split.images is not None:
            return f"image {i} of '{self.split.root}/{self.split.name}_images.npy'"
        from pipelines.sources import show_path

        return f"image '{show_path(self.split.files[i])}'"

    def __getitem__(self, i):
        self.current = i
        if self.split.images is not None:
            img = np.ascontiguousarray(self.split.images[i])
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
        else:
            from pipelines.formats import decode_rgb

            img = decode_rgb(self.split.file_bytes(i), name=self.split.files[i])
        return img, int(self.split.labels[i]), int(i)


def _guarded_worker(errors, work_fn, *args):
    """A writer worker that reports its exception as one line on `errors`, then exits with 1."""
    dataset = args[-1]
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001  (anything: the parent must learn of it)
        text = " ".join(f"{type(e).__name__}: {e}".split())
        errors.put(f"{dataset.describe(dataset.current)}: {text}")
        errors.close()
        errors.join_thread()
        os._exit(1)  # no traceback; the parent stops the other workers


def _guarded_writer_class():
    """FFCV's DatasetWriter, with a parent that never waits for a worker that has failed.

    FFCV's own loop polls a shared counter until every sample is written, then reads one
    allocation list per worker: a worker that raises or is killed leaves it waiting forever.
    Here each worker reports its exception, and the parent watches every worker's exit code.
    """
    import ctypes
    from multiprocessing import Process, Queue, Value
    from queue import Empty

    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class GuardedWriter(DatasetWriter):
        def _fail(self, processes, errors, message: str):
            for p in processes:
                if p.is_alive():
                    p.kill()
            for p in processes:
                p.join(5)
            try:
                message = errors.get(timeout=1)
            except Empty:
                pass
            raise BetonWriteError(message)  # _write_common frees the shared memory

        def _check(self, processes, errors):
            for p in processes:
                if p.exitcode is not None and p.exitcode != 0:
                    how = (f"was killed by signal {-p.exitcode} (out of memory?)" if p.exitcode < 0
                           else f"exited with status {p.exitcode}")
                    self._fail(processes, errors, f"a writer process {how}")

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            workqueue, allocations_queue, errors = Queue(), Queue(), Queue()
            for todo in queue_content:
                workqueue.put(todo)
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            from ffcv.memory_allocator import MemoryAllocator

            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (errors, work_fn, workqueue, self.metadata_sm, self.metadata_type,
                           self.fields, allocator, done_number, allocations_queue,
                           *extra_worker_args)
            processes = [Process(target=_guarded_worker, args=worker_args)
                         for _ in range(self.num_workers)]
            for p in processes:
                p.start()
            try:
                allocation_list = self._collect(processes, errors, allocations_queue, done_number)
            except BaseException:  # Ctrl-C, or a failure above: stop every worker, free the memory
                for p in processes:
                    if p.is_alive():
                        p.kill()
                    p.join(5)
                if self.metadata_sm is not None:
                    try:
                        self.metadata_sm.close()
                        self.metadata_sm.unlink()
                    except FileNotFoundError:
                        pass
                raise
            self.finalize(allocation_list)
            self.metadata_sm.close()
            self.metadata_sm.unlink()

        def _collect(self, processes, errors, allocations_queue, done_number) -> list:
            num_samples = self.num_samples
            allocation_list, reported = [], 0
            with tqdm(total=num_samples, unit="img", disable=None, leave=False) as progress:
                while reported < len(processes):
                    progress.update(done_number.value - progress.n)
                    try:
                        allocation_list.extend(allocations_queue.get(timeout=0.1))
                        reported += 1
                        continue
                    except Empty:
                        pass
                    self._check(processes, errors)
                    if reported < len(processes) and all(p.exitcode == 0 for p in processes):
                        try:  # every worker exited cleanly: its list is in the queue by now
                            allocation_list.extend(allocations_queue.get(timeout=5))
                            reported += 1
                        except Empty:
                            self._fail(processes, errors, "a writer process ended without "
                                                          "reporting its pages")
            for p in processes:  # each has reported its pages and is exiting
                p.join(60)
                if p.is_alive():
                    self._fail(processes, errors, "a writer process did not exit after its work")
            if done_number.value != num_samples:
                self._fail(processes, errors, f"{done_number.value} of {num_samples} images "
                                              f"were written")
            return allocation_list

    return GuardedWriter


def _header_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header (PIL decodes nothing until asked)."""
    from PIL import Image

    from pipelines.sources import DatasetError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError...
        raise DatasetError(f"cannot read image '{path}' ({type(e).__name__}: {e})".splitlines()[0]
                           + ": re-run tools.convert to drop unreadable files") from None


def _page_size(split, max_resolution: int | None) -> int:
    """A power-of-two FFCV page that holds the largest sample of `split` (FFCV refuses a sample
    larger than a page): raw arrays exactly; JPEGs by their pixel count (FFCV's quality-90 JPEG
    of an image is smaller than its raw RGB bytes, which is the bound used)."""
    if split.images is not None:
        sample = int(np.prod(split.images.shape[1:3])) * 3
        wanted = sample * 4  # small pages for small samples (the default 8 MiB pads tiny sets)
    else:
        if not len(split):
            h, w = np.ones(1), np.ones(1)
        elif split.sizes is not None:  # recorded by tools.convert
            h, w = split.sizes[:, 0], split.sizes[:, 1]
        else:  # a Split built by hand (benchmarks, tests): read each file's header
            h, w = np.array([_header_size(f) for f in split.files], dtype=np.float64).T
        longest = np.maximum(h, w).astype(np.float64)
        scale = np.minimum(1.0, (max_resolution or np.inf) / longest)
        pixels = np.ceil(h * scale + 1) * np.ceil(w * scale + 1)
        wanted = int(pixels.max()) * 3 + (1 << 16)  # + JPEG headers
    page = 1 << max(21, int(np.ceil(np.log2(max(wanted, 1)))))
    if page >= 1 << 32:  # FFCV's limit (uint32 offsets)
        raise BetonWriteError(f"the largest image needs {wanted} bytes, more than an FFCV page "
                              f"can hold (4 GiB)")
    return page


def write_beton(split, path: pathlib.Path, *, max_resolution: int | None = None) -> None:
    """Write `split` as an FFCV file with fields image, label, index.

    Array splits are stored raw (no re-encoding); file splits are decoded by
    `pipelines.formats.decode_rgb` and re-encoded at quality 90, the longer side capped at
    `max_resolution`. Pages are sized from the largest image. Written to a temporary name, then
    renamed; any worker failure raises `BetonWriteError` (one line naming the image) and leaves
    no file behind.
    """
    from ffcv.fields import IntField, RGBImageField

    path = pathlib.Path(path)
    if split.images is not None:
        field = RGBImageField(write_mode="raw")
    else:
        field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=90)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer = _guarded_writer_class()(
            str(tmp), {"image": field, "label": IntField(), "index": IntField()},
            page_size=_page_size(split, max_resolution),
            num_workers=max(1, min(4, os.cpu_count() or 1)))
        # The writer forks its workers. An object left for the garbage collector (a DALI pipeline
        # in a reference cycle, say) must not be destroyed in a child: DALI's destructor hangs
        # there. So collect now and freeze what remains out of the children's collections.
        gc.collect()
        gc.freeze()
        try:
            writer.from_indexed_dataset(_SplitItems(split), chunksize=256)
        finally:
            gc.unfreeze()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
