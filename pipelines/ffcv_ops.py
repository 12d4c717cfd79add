"""FFCV operations for SimCLR views, seeded per sample, and the .beton writer.

FFCV's own random operations draw from numba's per-thread global generator, so their output
depends on thread scheduling. The operations here draw every random number from the
counter-based streams of `pipelines.augment_params` (one per view key, sample index and
operation), so a view depends only on (seed, epoch, index, view) as the loader contract asks. The epoch key lives in a one-element
array that the compiled code reads through its address (`EpochKey`): the loader writes the
key before each epoch without recompiling anything.

FFCV 1.0.2 has no hue, grayscale or blur; they are written here (CPU, numba), together with
crop, flip and a colour jitter that applies its four adjustments in a random order per sample
(torchvision's ColorJitter semantics), each clamped and rounded to uint8 as torchvision's
uint8 path does. Jitter, grayscale and blur also exist as batched torch operations
(`colour_blur_tail`), which a CUDA loader runs after ToDevice with the same per-sample draws.
"""

from __future__ import annotations

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
    SALT_BLUR,
    SALT_CROP,
    SALT_FLIP,
    SALT_GRAY,
    SALT_JITTER,
    blur_sigma,
    blur_window,
    blur_windows,
    coin,
    crop_box_of,
    jitter_draw,
    jitter_ranges,
    stream,
    view_key,
)

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
                i, j, h, w = crop_box_of(key, np.int64(source_ix), SALT_CROP, 0, np.int64(height), np.int64(width),
                                         s_lo, s_hi, r_lo, r_hi)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# ---- per-sample augmentations on uint8 [B, S, S, 3] ----------------------------------------

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


# Batched kernels, compiled once per process rather than once per FFCV Loader (numba compiles
# FFCV's generated code anew for every Loader): the operations below are thin wrappers that
# pass them the epoch key. Also callable from Python on uint8 [B, H, W, 3] arrays with int64
# [B] indices. Not cached on disk: numba's cache would not notice edits to the inlined
# `pipelines.augment_params` functions.

@numba.njit(parallel=True, nogil=True)
def flip_batch(images, indices, key, p):
    for i in numba.prange(images.shape[0]):
        if coin(stream(key, indices[i], SALT_FLIP), p):
            images[i] = images[i][:, ::-1].copy()


@numba.njit(parallel=True, nogil=True)
def jitter_batch(images, indices, key, p, lo, hi):
    for i in numba.prange(images.shape[0]):
        applied, order, factors = jitter_draw(stream(key, indices[i], SALT_JITTER), p, lo, hi)
        if applied:
            for k in range(4):
                _jitter_one(images[i], order[k], factors[order[k]])


@numba.njit(parallel=True, nogil=True)
def gray_batch(images, indices, key, p):
    for i in numba.prange(images.shape[0]):
        if coin(stream(key, indices[i], SALT_GRAY), p):
            img = images[i]
            for y in range(img.shape[0]):
                for x in range(img.shape[1]):
                    v = _to_u8(0.299 * img[y, x, 0] + 0.587 * img[y, x, 1] + 0.114 * img[y, x, 2])
                    img[y, x, 0], img[y, x, 1], img[y, x, 2] = v, v, v


@numba.njit(parallel=True, nogil=True)
def blur_batch(images, indices, key, p, kernel_size, s_lo, s_hi):
    for i in numba.prange(images.shape[0]):
        s = stream(key, indices[i], SALT_BLUR)
        if coin(s, p):
            sigma = blur_sigma(s, s_lo, s_hi)
            _blur_one(images[i], blur_window(sigma, kernel_size), sigma)


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
        read_key, p = self.key.reader(), self.p

        def flip(images, _dst, indices):
            flip_batch(images, indices, read_key(), p)
            return images

        flip.with_indices = True
        return flip


class RandomOrderColorJitter(_SeededImageOp):
    """With probability p, brightness, contrast, saturation and hue (torchvision's ranges), in a
    random order drawn per sample."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float, key: EpochKey):
        super().__init__(key)
        self.lo, self.hi = jitter_ranges(brightness, contrast, saturation, hue)
        self.p = p

    def generate_code(self):
        read_key, p, lo, hi = self.key.reader(), self.p, self.lo, self.hi

        def jitter(images, _dst, indices):
            jitter_batch(images, indices, read_key(), p, lo, hi)
            return images

        jitter.with_indices = True
        return jitter


class SeededGrayscale(_SeededImageOp):
    """With probability p, luma (0.299, 0.587, 0.114) in all three channels."""

    def __init__(self, p: float, key: EpochKey):
        super().__init__(key)
        self.p = p

    def generate_code(self):
        read_key, p = self.key.reader(), self.p

        def gray(images, _dst, indices):
            gray_batch(images, indices, read_key(), p)
            return images

        gray.with_indices = True
        return gray


class SeededGaussianBlur(_SeededImageOp):
    """With probability p, a Gaussian blur of odd side `kernel_size`, sigma uniform in `sigma`."""

    def __init__(self, p: float, kernel_size: int, sigma: tuple[float, float], key: EpochKey):
        super().__init__(key)
        self.p, self.kernel_size, self.sigma = p, kernel_size, (float(sigma[0]), float(sigma[1]))

    def generate_code(self):
        read_key, p, ks = self.key.reader(), self.p, self.kernel_size
        s_lo, s_hi = self.sigma

        def blur(images, _dst, indices):
            blur_batch(images, indices, read_key(), p, ks, s_lo, s_hi)
            return images

        blur.with_indices = True
        return blur


# ---- the same jitter, grayscale and blur as batched torch ops (after ToDevice on a GPU) --------

_LUMA = (0.299, 0.587, 0.114)
# HSV sector k -> (r, g, b) as indices into the stack (v, q, p, t), as in `_rgb_hue_shift`.
_HSV_SECTORS = ((0, 3, 2), (1, 0, 2), (2, 0, 3), (2, 1, 0), (3, 2, 0), (0, 2, 1))


def _luma(x):
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]  # [B, 1, H, W]


def _round_u8(x):
    return x.round().clamp(0.0, 255.0)  # round half to even, as np.rint in `_to_u8`


def _hue_shift(x, shift):
    """`_rgb_hue_shift` on pixel values 0..255 [B, 3, H, W]; shift [B] in turns."""
    import torch

    rgb = x / 255.0
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]  # [B, H, W]
    mx, mn = rgb.amax(1), rgb.amin(1)
    c = mx - mn
    flat = c == 0.0
    c_safe = torch.where(flat, torch.ones_like(c), c)
    s = c / torch.where(flat, torch.ones_like(mx), mx)
    h = torch.where(mx == r, torch.remainder((g - b) / c_safe, 6.0),
                    torch.where(mx == g, (b - r) / c_safe + 2.0, (r - g) / c_safe + 4.0))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0)
    h6 = h * 6.0
    k = torch.remainder(torch.floor(h6), 6.0).long()
    f = h6 - torch.floor(h6)
    v = mx
    cand = torch.stack([v, v * (1.0 - s * f), v * (1.0 - s), v * (1.0 - s * (1.0 - f))], dim=1)  # (v, q, p, t)
    sectors = torch.tensor(_HSV_SECTORS, device=x.device)[k].permute(0, 3, 1, 2)  # [B, 3, H, W]
    out = cand.gather(1, sectors) * 255.0
    return torch.where(flat.unsqueeze(1), x, out)


def _adjust(x, op: int, factor):
    """One torchvision adjustment (op: 0 brightness, 1 contrast, 2 saturation, 3 hue) of pixel
    values [B, 3, H, W] with per-sample factors [B], rounded and clamped like `_jitter_one`."""
    f = factor.view(-1, 1, 1, 1)
    if op == 0:
        y = x * f
    elif op == 1:
        y = f * x + (1 - f) * _luma(x).mean((2, 3), keepdim=True)
    elif op == 2:
        y = f * x + (1 - f) * _luma(x)
    else:
        y = _hue_shift(x, factor)
    return _round_u8(y)


def _gaussian_kernels(sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """float64 [B, k]: `_blur_one`'s normalised 1-D kernels, each zero outside its sample's
    `blur_window`; k is the largest window of the batch."""
    windows = blur_windows(sigma, kernel_size)
    k_max = int(windows.max())
    d = np.arange(k_max, dtype=np.float64) - k_max // 2
    k = np.exp(-0.5 * d[None, :] ** 2 / (sigma[:, None] * sigma[:, None]))
    k[np.abs(d)[None, :] > (windows // 2)[:, None]] = 0.0
    return k / k.sum(axis=1, keepdims=True)


def _blur(x, sigma: np.ndarray, kernel_size: int):
    """`_blur_one` batched: separable Gaussian, reflect-101 borders, rounded once at the end."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    k = torch.as_tensor(_gaussian_kernels(sigma, kernel_size), dtype=x.dtype, device=x.device)
    kernel_size = k.shape[1]
    r = kernel_size // 2
    k = k.repeat_interleave(c, dim=0)  # [B*3, k]: one filter per (sample, channel)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, 0, 0), mode="reflect")  # torch's reflect is reflect-101
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return _round_u8(y.view(b, c, h, w))


def colour_blur_tail(images, params: dict[str, np.ndarray], kernel_size: int, dtype=None):
    """Colour jitter in random order, grayscale and blur of a batch, in torch, on the batch's device.

    images: uint8 [B, H, W, 3] (FFCV's layout); params: `augment_params.colour_blur_params` of
    the batch (drawn on the host from the same streams as `jitter_batch`, `gray_batch` and
    `blur_batch`, so the result matches those numba operations up to float rounding).
    Returns pixel values 0..255 as float [B, 3, H, W] (channels_last storage) in `dtype`
    (float32 by default; float64 reproduces the numba operations most closely). Samples are
    grouped by the adjustment they apply, on the host, so nothing waits on the device.
    """
    import torch

    dtype = dtype or torch.float32
    x = images.permute(0, 3, 1, 2).to(dtype)  # [B, 3, H, W]
    dev = x.device

    def rows(mask):
        sel = np.flatnonzero(mask)
        return sel, torch.as_tensor(sel, device=dev)

    jitter, order, factors = params["jitter"], params["order"], params["factors"]
    for slot in range(4):
        for op in range(4):
            sel, idx = rows(jitter & (order[:, slot] == op))
            if len(sel):
                x[idx] = _adjust(x[idx], op, torch.as_tensor(factors[sel, op], dtype=dtype, device=dev))
    sel, idx = rows(params["gray"])
    if len(sel):
        x[idx] = _round_u8(_luma(x[idx])).expand(-1, 3, -1, -1)
    sel, idx = rows(params["blur"])
    if len(sel):
        x[idx] = _blur(x[idx], params["sigma"][sel], kernel_size)
    return x


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
