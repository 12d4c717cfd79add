"""FFCV operations for SimCLR views, every random number drawn by the one sampler.

FFCV's own random operations draw from numba's per-thread global generator, so their output
depends on thread scheduling. The operations here take every random number from the one
sampler (`pipelines.augment_params`), keyed by (seed, epoch, index, view), so FFCV draws the same
views as every other backend. The epoch key lives in a one-element array that the compiled code
reads through its address (`EpochKey`): the loader writes the key before each epoch without
recompiling anything.

Two operations: the decoder's random resized crop (`SeededRandomResizedCrop`) and, on the CPU,
the tail (`SimCLRTail`: flip, colour jitter in random order, grayscale, blur and the study's
rotation, Sobel, noise and cutout), drawn and rendered
by `pipelines.render_cpu.tail_batch`. A CUDA loader stops after the crop and renders the tail on
the GPU (`pipelines.render_gpu`). Writing .beton files is `pipelines.ffcv_writer`.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import torch

from pipelines.augment_params import DRAW_CROP, SALT_VIEW, crop_box_of, spec_constants, view_key
from pipelines.render_cpu import as_voidptr, tail_batch

# Importing ffcv calls torch.set_num_threads(1) process-wide, which halves a 2-core training
# step; keep the caller's setting.
_TORCH_THREADS = torch.get_num_threads()
from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402

torch.set_num_threads(_TORCH_THREADS)


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
            return numba.carray(as_voidptr(address), 1, np.uint64)[0]
        return read


# ---- decoder: random resized crop -----------------------------------------------------------

class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """Decode (JPEG or raw) and random-resized-crop to `size`, the crop keyed by (epoch key,
    index)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 key: EpochKey):
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
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    pixels = temp_buffer.reshape(-1)[:3 * height * width]
                    temp_buffer = pixels.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = crop_box_of(key, np.int64(source_ix), SALT_VIEW, DRAW_CROP,
                                         np.int64(height), np.int64(width), s_lo, s_hi, r_lo, r_hi)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---- the tail: flip, colour jitter, grayscale, blur (`pipelines.render_cpu.tail_batch`) ------

class SimCLRTail(Operation):
    """Flip, colour jitter in random order, grayscale, blur, rotation, Sobel, noise and cutout of
    uint8 NHWC batches (CPU), keyed by (epoch key, sample index) through the one sampler. `spec`
    is the view's own (`AugmentSpec.for_view`)."""

    def __init__(self, spec, key: EpochKey):
        super().__init__()
        self.key = key
        # the sampler's constants after the crop's (see augment_params.spec_constants)
        self.consts = spec_constants(spec)[4:]

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None

    def generate_code(self):
        read_key = self.key.reader()
        flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size, study = self.consts

        def tail(images, _dst, indices):
            tail_batch(images, indices, read_key(), flip_p, jitter_p, lo, hi, gray_p, blur_p,
                       s_lo, s_hi, kernel_size, study)
            return images

        tail.with_indices = True
        return tail
