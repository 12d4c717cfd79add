"""FFCV operations for SimCLR views, seeded per sample, and the .beton writer.

FFCV's own random operations draw from numba's per-thread global generator, so their output
depends on thread scheduling. The operations here draw every random number from a
counter-based hash of (epoch key, sample index, view, operation), so a view depends only on
(seed, epoch, index, view) as the loader contract asks. The epoch key lives in a one-element
array that the compiled code reads through its address (`EpochKey`): the loader writes the
key before each epoch without recompiling anything.

FFCV 1.0.2 has no hue, grayscale or blur; they are written here (CPU, numba), together with
crop, flip and a colour jitter that applies its four adjustments in a random order per sample
(torchvision's ColorJitter semantics), each clamped and rounded to uint8 as torchvision's
uint8 path does.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import replace

import numba
import numpy as np
from numba import types as nbt
from numba.core import cgutils
from numba.extending import intrinsic

from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
# Stream salts: one independent stream per (view, operation).
SALT_CROP, SALT_FLIP, SALT_JITTER, SALT_GRAY, SALT_BLUR = 1, 2, 3, 4, 5


@numba.njit(inline="always")
def _mix(x):
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(inline="always")
def _stream(key, index, salt):
    return _mix(key ^ _mix(np.uint64(index) ^ (np.uint64(salt) << np.uint64(56))))


@numba.njit(inline="always")
def _uniform(stream, k):
    """float64 in [0, 1): draw k of a stream."""
    return np.float64(_mix(stream + np.uint64(k) * _GOLDEN) >> _S11) * (1.0 / 9007199254740992.0)


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
        k = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
        with np.errstate(over="ignore"):
            self.array[0] = _mix(_mix(_mix(k[0]) ^ np.uint64(epoch)) ^ np.uint64(view + 1))

    def reader(self):
        address = self.address

        @numba.njit(inline="always")
        def read():
            return numba.carray(_as_voidptr(address), 1, np.uint64)[0]
        return read


# ---- decoder: random resized crop -----------------------------------------------------------

@numba.njit(inline="always")
def _rrc_box(stream, height, width, scale_lo, scale_hi, logr_lo, logr_hi, r_lo, r_hi):
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w)."""
    area = np.float64(height) * np.float64(width)
    for t in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * _uniform(stream, t))
        aspect = np.exp(logr_lo + (logr_hi - logr_lo) * _uniform(stream, 10 + t))
        w = np.int64(np.rint(np.sqrt(target * aspect)))
        h = np.int64(np.rint(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(np.floor(_uniform(stream, 20 + t) * (height - h + 1)))
            left = np.int64(np.floor(_uniform(stream, 30 + t) * (width - w + 1)))
            return top, left, h, w
    in_ratio = np.float64(width) / np.float64(height)
    if in_ratio < r_lo:
        w = np.int64(width)
        h = np.int64(np.rint(w / r_lo))
    elif in_ratio > r_hi:
        h = np.int64(height)
        w = np.int64(np.rint(h * r_hi))
    else:
        w, h = np.int64(width), np.int64(height)
    return (np.int64(height) - h) // 2, (np.int64(width) - w) // 2, h, w


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
        lr_lo, lr_hi = float(np.log(r_lo)), float(np.log(r_hi))

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
                stream = _stream(key, source_ix, SALT_CROP)
                i, j, h, w = _rrc_box(stream, np.int64(height), np.int64(width), s_lo, s_hi, lr_lo, lr_hi, r_lo, r_hi)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---- per-sample augmentations on uint8 [B, S, S, 3] ----------------------------------------

class _SeededImageOp(Operation):
    """In-place operation on uint8 NHWC batches that receives the sample indices."""

    def __init__(self, key: EpochKey):
        super().__init__()
        self.key = key

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None


class SeededFlip(_SeededImageOp):
    def __init__(self, p: float, key: EpochKey):
        super().__init__(key)
        self.p = p

    def generate_code(self):
        my_range, read_key, p = Compiler.get_iterator(), self.key.reader(), self.p

        def flip(images, _dst, indices):
            key = read_key()
            for i in my_range(images.shape[0]):
                if _uniform(_stream(key, indices[i], SALT_FLIP), 0) < p:
                    images[i] = images[i][:, ::-1].copy()
            return images

        flip.is_parallel = True
        flip.with_indices = True
        return flip


@numba.njit(inline="always")
def _to_u8(v):
    v = np.rint(v)
    return np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))


@numba.njit
def _rgb_hue_shift(r, g, b, shift):
    """torchvision's adjust_hue for one pixel (floats in [0, 1]): rotate the HSV hue by `shift` turns."""
    mx, mn = max(r, g, b), min(r, g, b)
    v, c = mx, mx - mn
    if c == 0.0:
        return r, g, b
    s = c / mx
    if mx == r:
        h = ((g - b) / c) % 6.0
    elif mx == g:
        h = (b - r) / c + 2.0
    else:
        h = (r - g) / c + 4.0
    h = (h / 6.0 + shift) % 1.0
    h6 = h * 6.0
    k = np.int64(np.floor(h6)) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    if k == 0:
        return v, t, p
    if k == 1:
        return q, v, p
    if k == 2:
        return p, v, t
    if k == 3:
        return p, q, v
    if k == 4:
        return t, p, v
    return v, p, q


@numba.njit
def _jitter_one(img, op, factor):
    """One torchvision adjustment on a uint8 [H, W, 3] image, in place. op: 0 brightness,
    1 contrast, 2 saturation, 3 hue (factor in turns)."""
    h, w = img.shape[0], img.shape[1]
    if op == 1:
        mean = 0.0
        for y in range(h):
            for x in range(w):
                mean += 0.299 * img[y, x, 0] + 0.587 * img[y, x, 1] + 0.114 * img[y, x, 2]
        mean /= h * w
    for y in range(h):
        for x in range(w):
            r, g, b = np.float64(img[y, x, 0]), np.float64(img[y, x, 1]), np.float64(img[y, x, 2])
            if op == 0:
                r, g, b = r * factor, g * factor, b * factor
            elif op == 1:
                r, g, b = factor * r + (1 - factor) * mean, factor * g + (1 - factor) * mean, factor * b + (1 - factor) * mean
            elif op == 2:
                gray = 0.299 * r + 0.587 * g + 0.114 * b
                r, g, b = factor * r + (1 - factor) * gray, factor * g + (1 - factor) * gray, factor * b + (1 - factor) * gray
            else:
                r, g, b = _rgb_hue_shift(r / 255.0, g / 255.0, b / 255.0, factor)
                r, g, b = r * 255.0, g * 255.0, b * 255.0
            img[y, x, 0], img[y, x, 1], img[y, x, 2] = _to_u8(r), _to_u8(g), _to_u8(b)


@numba.njit(inline="always")
def jitter_params(stream, p, lo, hi):
    """(applied, order[4], factors[4]) of torchvision's RandomApply(ColorJitter) for one sample."""
    applied = _uniform(stream, 0) < p
    keys = np.empty(4)
    factors = np.empty(4)
    for j in range(4):
        keys[j] = _uniform(stream, 1 + j)
        factors[j] = lo[j] + (hi[j] - lo[j]) * _uniform(stream, 5 + j)
    return applied, np.argsort(keys), factors


class RandomOrderColorJitter(_SeededImageOp):
    """With probability p, brightness, contrast, saturation and hue (torchvision's ranges), in a
    random order drawn per sample."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float, key: EpochKey):
        super().__init__(key)
        self.lo = np.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
        self.hi = np.array([1 + brightness, 1 + contrast, 1 + saturation, hue])
        self.p = p

    def generate_code(self):
        my_range, read_key, p, lo, hi = Compiler.get_iterator(), self.key.reader(), self.p, self.lo, self.hi

        def jitter(images, _dst, indices):
            key = read_key()
            for i in my_range(images.shape[0]):
                applied, order, factors = jitter_params(_stream(key, indices[i], SALT_JITTER), p, lo, hi)
                if applied:
                    for k in range(4):
                        _jitter_one(images[i], order[k], factors[order[k]])
            return images

        jitter.is_parallel = True
        jitter.with_indices = True
        return jitter


class SeededGrayscale(_SeededImageOp):
    """With probability p, luma (0.299, 0.587, 0.114) in all three channels."""

    def __init__(self, p: float, key: EpochKey):
        super().__init__(key)
        self.p = p

    def generate_code(self):
        my_range, read_key, p = Compiler.get_iterator(), self.key.reader(), self.p

        def gray(images, _dst, indices):
            key = read_key()
            for i in my_range(images.shape[0]):
                if _uniform(_stream(key, indices[i], SALT_GRAY), 0) < p:
                    img = images[i]
                    for y in range(img.shape[0]):
                        for x in range(img.shape[1]):
                            v = _to_u8(0.299 * img[y, x, 0] + 0.587 * img[y, x, 1] + 0.114 * img[y, x, 2])
                            img[y, x, 0], img[y, x, 1], img[y, x, 2] = v, v, v
            return images

        gray.is_parallel = True
        gray.with_indices = True
        return gray


@numba.njit
def _blur_one(img, kernel_size, sigma):
    """Separable Gaussian blur in place, reflect-101 borders (torchvision's gaussian_blur)."""
    h, w = img.shape[0], img.shape[1]
    r = kernel_size // 2
    k = np.empty(kernel_size)
    for t in range(kernel_size):
        d = np.float64(t - r)
        k[t] = np.exp(-0.5 * d * d / (sigma * sigma))
    k /= k.sum()
    tmp = np.empty((h, w, 3))
    for y in range(h):
        for x in range(w):
            for c in range(3):
                acc = 0.0
                for t in range(kernel_size):
                    xx = x + t - r
                    xx = -xx if xx < 0 else (2 * (w - 1) - xx if xx >= w else xx)
                    acc += k[t] * img[y, xx, c]
                tmp[y, x, c] = acc
    for y in range(h):
        for x in range(w):
            for c in range(3):
                acc = 0.0
                for t in range(kernel_size):
                    yy = y + t - r
                    yy = -yy if yy < 0 else (2 * (h - 1) - yy if yy >= h else yy)
                    acc += k[t] * tmp[yy, x, c]
                img[y, x, c] = _to_u8(acc)


class SeededGaussianBlur(_SeededImageOp):
    """With probability p, a Gaussian blur of odd side `kernel_size`, sigma uniform in `sigma`."""

    def __init__(self, p: float, kernel_size: int, sigma: tuple[float, float], key: EpochKey):
        super().__init__(key)
        self.p, self.kernel_size, self.sigma = p, kernel_size, (float(sigma[0]), float(sigma[1]))

    def generate_code(self):
        my_range, read_key, p, ks = Compiler.get_iterator(), self.key.reader(), self.p, self.kernel_size
        s_lo, s_hi = self.sigma

        def blur(images, _dst, indices):
            key = read_key()
            for i in my_range(images.shape[0]):
                stream = _stream(key, indices[i], SALT_BLUR)
                if _uniform(stream, 0) < p:
                    _blur_one(images[i], ks, s_lo + (s_hi - s_lo) * _uniform(stream, 1))
            return images

        blur.is_parallel = True
        blur.with_indices = True
        return blur


# ---- writer ---------------------------------------------------------------------------------

class _SplitItems:
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        if self.split.images is not None:
            img = np.ascontiguousarray(self.split.images[i])
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
        else:
            from PIL import Image

            with Image.open(self.split.files[i]) as im:
                img = np.asarray(im.convert("RGB"))
        return img, int(self.split.labels[i]), int(i)


def write_beton(split, path: pathlib.Path, *, max_resolution: int | None = None) -> None:
    """Write `split` as an FFCV file with fields image, label, index.

    Array splits are stored raw (no re-encoding); JPEG splits are re-encoded at quality 90,
    the longer side capped at `max_resolution`. Written to a temporary name, then renamed.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = pathlib.Path(path)
    if split.images is not None:
        field = RGBImageField(write_mode="raw")
        sample_bytes = int(np.prod(split.images.shape[1:3])) * 3
    else:
        field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=90)
        sample_bytes = 1 << 20
    # Small pages for small samples (the default 8 MiB pads tiny sets); a page must hold a sample.
    page_size = 1 << max(21, int(np.ceil(np.log2(max(sample_bytes, 1) * 4))))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField(), "index": IntField()},
                               page_size=page_size, num_workers=max(1, min(4, os.cpu_count() or 1)))
        writer.from_indexed_dataset(_SplitItems(split), chunksize=256)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
