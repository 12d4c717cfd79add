"""Writing a split as an FFCV file (`write_beton`), for `tools.convert --to ffcv`.

Fields image, label, index. Array splits are stored raw; file splits are decoded by
`pipelines.formats.decode_rgb` (the pixels every backend sees) and re-encoded as JPEG. FFCV's
own writer waits forever for a worker that raised or was killed; `GuardedWriter` watches its
workers and ends with one `BetonWriteError` line naming the image.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pathlib
from multiprocessing import Process, Queue, Value
from queue import Empty

import numpy as np
import torch
from tqdm import tqdm

from pipelines import formats
from pipelines.sources import BetonWriteError, DatasetError, show_path
from train.atomic import die_with_parent

# Importing ffcv calls torch.set_num_threads(1) process-wide; keep the caller's setting.
_TORCH_THREADS = torch.get_num_threads()
from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.memory_allocator import MemoryAllocator  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)


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
        return f"image '{show_path(self.split.files[i])}'"

    def __getitem__(self, i):
        self.current = i
        if self.split.images is not None:
            img = np.ascontiguousarray(self.split.images[i])
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
        else:
            img = formats.decode_rgb(self.split.file_bytes(i), name=self.split.files[i])
        return img, int(self.split.labels[i]), int(i)


def _guarded_worker(parent, errors, work_fn, *args):
    """A writer worker that dies with `parent` (a SIGKILLed conversion leaves no worker holding
    its memory) and reports its exception as one line on `errors`, then exits with 1."""
    die_with_parent(parent)
    dataset = args[-1]
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001  (anything: the parent must learn of it)
        text = " ".join(f"{type(e).__name__}: {e}".split())
        errors.put(f"{dataset.describe(dataset.current)}: {text}")
        errors.close()
        errors.join_thread()
        os._exit(1)  # no traceback; the parent stops the other workers


class GuardedWriter(DatasetWriter):
    """FFCV's DatasetWriter, with a parent that never waits for a worker that has failed.

    FFCV's own loop polls a shared counter until every sample is written, then reads one
    allocation list per worker: a worker that raises or is killed leaves it waiting forever.
    Here each worker reports its exception, and the parent watches every worker's exit code.
    """

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
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (errors, work_fn, workqueue, self.metadata_sm, self.metadata_type,
                       self.fields, allocator, done_number, allocations_queue,
                       *extra_worker_args)
        processes = [Process(target=_guarded_worker, args=(os.getpid(), *worker_args))
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
            try:
                h, w = np.array([formats.image_size(f) for f in split.files], dtype=np.float64).T
            except formats.FormatError as e:
                raise DatasetError(str(e)) from None
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
    path = pathlib.Path(path)
    if split.images is not None:
        field = RGBImageField(write_mode="raw")
    else:
        field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=90)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer = GuardedWriter(
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
