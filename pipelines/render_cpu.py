"""The CPU renderer of a view's tail: flip, colour jitter in random order, grayscale, blur, then
the study's rotation, Sobel, noise and cutout (pipelines/spec.py defines them).

numba kernels on one uint8 HWC image, reading the packed parameters (`augment_params.P_*`) that
the one sampler drew. They follow torchvision's functional ops on uint8 tensors, the reference,
step by step and in float32 like torchvision:

* brightness: ``trunc(clamp(x * f))``;
* contrast: blend with the mean of the floored luma image (0.2989, 0.587, 0.114), truncated;
* saturation: blend with the pixel's floored luma, truncated;
* hue: to float (``x / 255``), HSV, hue shifted by ``f`` turns, back to RGB, ``trunc(y * 255.999)``;
* grayscale: ``trunc(luma)`` in all three channels;
* blur: Gaussian of odd window ``P_WINDOW`` (the sampler's +-4 sigma cut), reflect-101 borders,
  rounded half to even;
* rotation: ``P_ROTATE`` quarter turns counter-clockwise (torchvision's rotate by 90 k), exact;
* Sobel: ``min(255, floor(sqrt(gx^2 + gy^2) / 4))`` of the truncated luma, reflect-101 borders
  (integer gradients: the same bits in every backend);
* noise: ``rint(x + sigma * z)`` clipped, z of element (y, x, c) from the view's noise stream
  (`augment_params.noise_normal`), in float64;
* cutout: the square ``P_CUTOUT_BOX`` set to 0.

FFCV's compiled pipeline (`ffcv_ops.SimCLRTail`) calls `tail_batch`, which also draws each sample's
parameters; DALI runs `render_tail` per sample inside its CPU graph (`pipelines.dali_tail`);
`render_batch` serves host code. On a GPU the same maths runs as batched torch ops
(`pipelines.render_gpu`). Every kernel is cached on disk (numba's `cache=True`): compiled once
per machine, loaded by every later process.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic

from pipelines.augment_params import (
    N_P,
    P_BLUR,
    P_CUTOUT,
    P_CUTOUT_BOX,
    P_FACTOR,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    P_NOISE,
    P_NOISE_STD,
    P_ORDER,
    P_ROTATE,
    P_SIGMA,
    P_SOBEL,
    P_WINDOW,
    noise_normal,
    noise_stream,
    stream,
    tail_params,
)

_F32 = np.float32
# torchvision's luma weights and its float -> uint8 scale (to_dtype: x * (255 + 1 - 1e-3),
# truncated)
_LR, _LG, _LB = np.float32(0.2989), np.float32(0.587), np.float32(0.114)
_TO_U8 = np.float32(255.999)
_INV_255 = np.float32(1.0 / 255.0)


@intrinsic
def as_voidptr(typingctx, address):
    """An integer address as a void pointer in compiled code (for `numba.carray`): the operators
    built around these kernels (`ffcv_ops`, `dali_tail`) read memory they are handed by address."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return numba.types.voidptr(address), codegen


@numba.njit(inline="always")
def _trunc_u8(v):
    """torchvision's clamp(0, 255) then .to(uint8) (truncation)."""
    return np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))


@numba.njit(inline="always")
def _luma(r, g, b):
    """torchvision's r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114): fused
    multiply-adds."""
    lum = _F32(np.float64(_F32(_F32(r) * _LR)) + np.float64(g) * np.float64(_LG))
    return _F32(np.float64(lum) + np.float64(b) * np.float64(_LB))


@numba.njit(cache=True)
def _brightness(img, f):
    f = _F32(f)
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            for c in range(3):
                img[y, x, c] = _trunc_u8(_F32(img[y, x, c]) * f)


@numba.njit(cache=True)
def _blend(img, factor, mean, per_pixel):
    """img * f + gray * (1 - f), truncated; gray is the pixel's floored luma or `mean`."""
    f = _F32(factor)
    g1 = _F32(1.0 - factor)
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            gray = (math.floor(_luma(img[y, x, 0], img[y, x, 1], img[y, x, 2])) if per_pixel
                    else mean)
            gray = _F32(gray)
            for c in range(3):
                # torch's add_(other, alpha) is a fused multiply-add: the exact product in double
                scaled = _F32(_F32(img[y, x, c]) * f)
                img[y, x, c] = _trunc_u8(_F32(np.float64(scaled) + np.float64(gray) * g1))


@numba.njit(cache=True)
def _contrast(img, f):
    total = 0.0
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            total += math.floor(_luma(img[y, x, 0], img[y, x, 1], img[y, x, 2]))
    _blend(img, f, _F32(total / (h * w)), False)


@numba.njit(cache=True)
def _saturation(img, f):
    _blend(img, f, _F32(0.0), True)


@numba.njit(inline="always")
def _hue_pixel(r, g, b, shift):
    """torchvision's _rgb_to_hsv, hue + shift (mod 1), _hsv_to_rgb, in float32; floats in [0, 1]."""
    mx, mn = max(r, g, b), min(r, g, b)
    eqc = mx == mn
    cr = mx - mn
    s = cr / (_F32(1.0) if eqc else mx)
    div = _F32(1.0) if eqc else cr
    rc, gc, bc = (mx - r) / div, (mx - g) / div, (mx - b) / div
    if mx == r:
        h = bc - gc
    elif mx == g:
        h = _F32(2.0) + rc - bc
    else:
        h = _F32(4.0) + gc - rc
    h = _F32(h * _F32(1.0 / 6.0)) + _F32(1.0)  # in (0.8, 2): fmod(h, 1) is h - floor(h), exactly
    h = _F32(h - _F32(math.floor(h))) + _F32(shift)
    h = h - _F32(math.floor(h))  # torch.remainder(h, 1.0)
    h6 = _F32(h * _F32(6.0))
    i = math.floor(h6)
    fr = h6 - _F32(i)
    sxf = s * fr
    q = min(max((_F32(1.0) - sxf) * mx, _F32(0.0)), _F32(1.0))
    t = min(max((sxf + (_F32(1.0) - s)) * mx, _F32(0.0)), _F32(1.0))
    p = min(max((_F32(1.0) - s) * mx, _F32(0.0)), _F32(1.0))
    k = int(i) % 6
    if k == 0:
        return mx, t, p
    if k == 1:
        return q, mx, p
    if k == 2:
        return p, mx, t
    if k == 3:
        return p, q, mx
    if k == 4:
        return t, p, mx
    return mx, p, q


@numba.njit(cache=True)
def _hue(img, f):
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            r = _F32(img[y, x, 0]) * _INV_255
            g = _F32(img[y, x, 1]) * _INV_255
            b = _F32(img[y, x, 2]) * _INV_255
            r, g, b = _hue_pixel(r, g, b, f)
            img[y, x, 0] = np.uint8(_F32(r) * _TO_U8)
            img[y, x, 1] = np.uint8(_F32(g) * _TO_U8)
            img[y, x, 2] = np.uint8(_F32(b) * _TO_U8)


@numba.njit(cache=True)
def _grayscale(img):
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            v = _trunc_u8(_luma(img[y, x, 0], img[y, x, 1], img[y, x, 2]))
            img[y, x, 0], img[y, x, 1], img[y, x, 2] = v, v, v


@numba.njit(cache=True)
def gaussian_kernel(window, sigma):
    """torchvision's 1-D kernel (softmax of -(x / sigma)^2 on x = linspace(-lim, lim)), float32."""
    lim = (window - 1) / (2.0 * math.sqrt(2.0))
    k = np.empty(window, dtype=np.float32)
    for t in range(window):
        x = _F32(-lim + 2.0 * lim * t / (window - 1)) if window > 1 else _F32(0.0)
        k[t] = _F32(-(x / sigma) ** 2)
    k = np.exp(k - k.max())
    return k / k.sum()


@numba.njit(cache=True)
def _reflect(i, n):
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@numba.njit(cache=True)
def _blur(img, window, sigma):
    """Separable Gaussian, reflect-101 borders (torch's 'reflect'), rounded half to even.

    Each pass accumulates whole rows (contiguous, so the compiler vectorises the taps' loop)."""
    h, w = img.shape[0], img.shape[1]
    r = window // 2
    k = gaussian_kernel(window, sigma)
    row = np.empty((w + 2 * r) * 3, dtype=np.float32)  # one padded source row, interleaved RGB
    tmp = np.zeros((h, w * 3), dtype=np.float32)  # the horizontal pass
    for y in range(h):
        for x in range(-r, w + r):
            xx = _reflect(x, w)
            for c in range(3):
                row[(x + r) * 3 + c] = img[y, xx, c]
        out = tmp[y]
        for t in range(window):
            kt = k[t]
            src = row[t * 3:t * 3 + w * 3]
            for j in range(w * 3):
                out[j] += kt * src[j]
    acc = np.empty(w * 3, dtype=np.float32)
    for y in range(h):
        acc[:] = 0.0
        for t in range(window):
            kt = k[t]
            src = tmp[_reflect(y + t - r, h)]
            for j in range(w * 3):
                acc[j] += kt * src[j]
        for x in range(w):
            for c in range(3):
                v = np.rint(acc[x * 3 + c])
                img[y, x, c] = np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))


@numba.njit(cache=True)
def _flip(img):
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(3):
                a = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = a


@numba.njit(cache=True)
def _rotate(img, quarters):
    """`quarters` turns counter-clockwise of a square image (torch.rot90 over (H, W))."""
    n = img.shape[0]
    src = img.copy()
    for y in range(n):
        for x in range(n):
            if quarters == 1:
                sy, sx = x, n - 1 - y
            elif quarters == 2:
                sy, sx = n - 1 - y, n - 1 - x
            else:
                sy, sx = n - 1 - x, y
            for c in range(3):
                img[y, x, c] = src[sy, sx, c]


@numba.njit(cache=True)
def _sobel(img):
    """The Sobel gradient magnitude of the truncated luma, in all three channels."""
    h, w = img.shape[0], img.shape[1]
    gray = np.empty((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            gray[y, x] = np.int64(_trunc_u8(_luma(img[y, x, 0], img[y, x, 1], img[y, x, 2])))
    for y in range(h):
        ym, yp = _reflect(y - 1, h), _reflect(y + 1, h)
        for x in range(w):
            xm, xp = _reflect(x - 1, w), _reflect(x + 1, w)
            gx = (gray[ym, xp] + 2 * gray[y, xp] + gray[yp, xp]
                  - gray[ym, xm] - 2 * gray[y, xm] - gray[yp, xm])
            gy = (gray[yp, xm] + 2 * gray[yp, x] + gray[yp, xp]
                  - gray[ym, xm] - 2 * gray[ym, x] - gray[ym, xp])
            m = np.floor(math.sqrt(np.float64(gx * gx + gy * gy)) / 4.0)
            v = np.uint8(min(m, 255.0))
            img[y, x, 0], img[y, x, 1], img[y, x, 2] = v, v, v


@numba.njit(cache=True)
def _noise(img, sigma, s):
    """x + sigma * z, rounded half to even and clipped; z from stream s, element (y * W + x) * 3
    + c."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            for c in range(3):
                v = np.rint(np.float64(img[y, x, c]) + sigma * noise_normal(s, (y * w + x) * 3 + c))
                img[y, x, c] = np.uint8(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))


@numba.njit(cache=True)
def _cutout(img, top, left, side):
    img[top:top + side, left:left + side, :] = 0


@numba.njit(cache=True)
def adjust(img, op, factor):
    """One of torchvision's colour adjustments, in place: op 0 brightness, 1 contrast,
    2 saturation, 3 hue (factor in turns)."""
    if op == 0:
        _brightness(img, factor)
    elif op == 1:
        _contrast(img, factor)
    elif op == 2:
        _saturation(img, factor)
    else:
        _hue(img, factor)


@numba.njit(cache=True)
def render_tail(img, p):
    """The tail of one view on uint8 [H, W, 3], in place, from its packed parameters p [N_P]."""
    if p[P_FLIP] > 0.5:
        _flip(img)
    if p[P_JITTER] > 0.5:
        for slot in range(4):
            op = int(p[P_ORDER + slot])
            adjust(img, op, p[P_FACTOR + op])
    if p[P_GRAY] > 0.5:
        _grayscale(img)
    if p[P_BLUR] > 0.5:
        _blur(img, int(p[P_WINDOW]), _F32(p[P_SIGMA]))
    if p[P_ROTATE] > 0.5:
        _rotate(img, int(p[P_ROTATE]))
    if p[P_SOBEL] > 0.5:
        _sobel(img)
    if p[P_NOISE] > 0.5:
        _noise(img, p[P_NOISE_STD], noise_stream(p))
    if p[P_CUTOUT] > 0.5:
        _cutout(img, int(p[P_CUTOUT_BOX]), int(p[P_CUTOUT_BOX + 1]), int(p[P_CUTOUT_BOX + 2]))


@numba.njit(parallel=True, nogil=True, cache=True)
def render_batch(images, params):
    """`render_tail` of every image of uint8 [B, H, W, 3], in place, threads over samples."""
    for i in numba.prange(images.shape[0]):
        render_tail(images[i], params[i])


@numba.njit(parallel=True, nogil=True, cache=True)
def tail_batch(images, indices, key, flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi,
               kernel_size, study):
    """`render_batch` with each sample's parameters drawn here, from the one sampler under `key`:
    FFCV's compiled code calls it with the epoch's key (no host round trip). From Python: uint8
    [B, H, W, 3], int64 [B] indices and `spec_constants(spec.for_view(view))[4:]`."""
    for i in numba.prange(images.shape[0]):
        p = np.empty(N_P)
        tail_params(stream(key, indices[i]), flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo,
                    s_hi, kernel_size, study, p)
        render_tail(images[i], p)
