"""Counter-based random numbers and the SimCLR parameter samplers shared by the DALI and FFCV loaders.

The loader contract asks that a view depend only on (seed, epoch, index, view). Both fast
backends therefore draw every random number from a hash of that key instead of a stateful
generator: `view_key(seed, epoch, view)` fixes the epoch and view, `stream(key, index, salt)`
a sample's stream (one salt per operation), and `uniform(stream, k)` its k-th draw. Any
sample can be drawn alone, in any batch and on any thread, and gets the same numbers.

Everything here is compiled with numba, so the FFCV operations call it from their compiled
code and the DALI feed (and the FFCV device tail) call the batched versions from numpy.
"""

from __future__ import annotations

import math

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11, _S56 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11), np.uint64(56)
_TWO_POW_53 = 9007199254740992.0
_U64_MASK = 0xFFFFFFFFFFFFFFFF

# Stream salts. The DALI feed draws all of a view's numbers from salt 0; the FFCV operations
# draw one stream per operation.
SALT_ALL, SALT_CROP, SALT_FLIP, SALT_JITTER, SALT_GRAY, SALT_BLUR = 0, 1, 2, 3, 4, 5
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params; a box takes 4 draws per try


@numba.njit(inline="always")
def mix(x):
    """SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer on a uint64."""
    x = x + GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(cache=True)
def _view_key(seed, epoch, view):
    return mix(mix(mix(seed) ^ epoch) ^ (view + np.uint64(1)))


def view_key(seed: int, epoch: int, view: int) -> np.uint64:
    """The uint64 key of one view (0 or 1) of every sample in `epoch`."""
    # numba returns the uint64 as a Python int, which a later call would type as int64
    return np.uint64(_view_key(np.uint64(seed & _U64_MASK), np.uint64(epoch), np.uint64(view)))


@numba.njit(inline="always")
def stream(key, index, salt):
    """The stream of sample `index` for one operation (`salt`) under a view key."""
    # np.uint64(key): a key numba typed as int64 would mix in float64 arithmetic
    return mix(np.uint64(key) ^ mix(np.uint64(index) ^ (np.uint64(salt) << _S56)))


@numba.njit(inline="always")
def uniform(s, k):
    """float64 in [0, 1): draw k of stream s (53 random bits)."""
    return np.float64(mix(s + np.uint64(k) * GOLDEN) >> _S11) * (1.0 / _TWO_POW_53)


@numba.njit(cache=True)
def _uniform_table(key, index, salt, first, n):
    out = np.empty((index.shape[0], n))
    for i in range(index.shape[0]):
        s = stream(key, index[i], salt)
        for k in range(n):
            out[i, k] = uniform(s, first + k)
    return out


def uniform_table(key, index: np.ndarray, salt: int, first: int, n: int) -> np.ndarray:
    """float64 [B, n]: draws first .. first+n-1 of each sample's stream."""
    return _uniform_table(np.uint64(key), np.asarray(index, dtype=np.int64), np.uint64(salt), first, n)


# ---- random resized crop ---------------------------------------------------------------------

@numba.njit(inline="always")
def crop_box(s, first, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """torchvision's RandomResizedCrop.get_params for one sample: (top, left, h, w).

    Ten tries of (area, log-aspect); the first that fits wins, else the whole image or its
    centre clamped to the aspect range. Try t uses draws first+t (area), first+10+t (aspect),
    first+20+t (top) and first+30+t (left) of stream s.
    """
    area = np.float64(height) * np.float64(width)
    logr_lo, logr_hi = math.log(ratio_lo), math.log(ratio_hi)
    for t in range(CROP_TRIES):
        target = area * (scale_lo + (scale_hi - scale_lo) * uniform(s, first + t))
        aspect = math.exp(logr_lo + (logr_hi - logr_lo) * uniform(s, first + 10 + t))
        w = np.int64(np.rint(math.sqrt(target * aspect)))
        h = np.int64(np.rint(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(math.floor(uniform(s, first + 20 + t) * (height - h + 1)))
            left = np.int64(math.floor(uniform(s, first + 30 + t) * (width - w + 1)))
            return top, left, h, w
    in_ratio = np.float64(width) / np.float64(height)
    if in_ratio < ratio_lo:
        w = np.int64(width)
        h = np.int64(np.rint(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = np.int64(height)
        w = np.int64(np.rint(h * ratio_hi))
    else:
        w, h = np.int64(width), np.int64(height)
    return (np.int64(height) - h) // 2, (np.int64(width) - w) // 2, h, w


@numba.njit(cache=True)
def crop_box_of(key, index, salt, first, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """`crop_box` of sample `index`'s stream under `key`, compiled once (not inlined into callers)."""
    return crop_box(stream(key, index, salt), first, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi)


@numba.njit(cache=True)
def _crop_boxes(key, index, heights, widths, salt, first, scale_lo, scale_hi, ratio_lo, ratio_hi):
    out = np.empty((index.shape[0], 4), dtype=np.int64)
    for i in range(index.shape[0]):
        top, left, h, w = crop_box(stream(key, index[i], salt), first, np.int64(heights[i]), np.int64(widths[i]),
                                   scale_lo, scale_hi, ratio_lo, ratio_hi)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = top, left, h, w
    return out


def crop_boxes(key, index: np.ndarray, heights: np.ndarray, widths: np.ndarray, salt: int, first: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """int64 [B, 4] crop boxes (top, left, h, w), `crop_box` per sample."""
    index = np.asarray(index, dtype=np.int64)
    return _crop_boxes(np.uint64(key), index, np.broadcast_to(np.asarray(heights, dtype=np.int64), index.shape),
                       np.broadcast_to(np.asarray(widths, dtype=np.int64), index.shape), np.uint64(salt), first,
                       float(scale[0]), float(scale[1]), float(ratio[0]), float(ratio[1]))


# ---- colour jitter, grayscale, blur (the FFCV streams) ------------------------------------------

def jitter_ranges(brightness: float, contrast: float, saturation: float, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision ColorJitter's factor ranges: float64 [4] lo, hi for (brightness, contrast,
    saturation, hue in turns)."""
    lo = np.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
    hi = np.array([1 + brightness, 1 + contrast, 1 + saturation, hue])
    return lo, hi


@numba.njit(inline="always")
def jitter_draw(s, p, lo, hi):
    """(applied, order[4], factors[4]) of torchvision's RandomApply(ColorJitter) for one sample:
    order is a uniform random permutation of (brightness, contrast, saturation, hue)."""
    applied = uniform(s, 0) < p
    keys = np.empty(4)
    factors = np.empty(4)
    for j in range(4):
        keys[j] = uniform(s, 1 + j)
        factors[j] = lo[j] + (hi[j] - lo[j]) * uniform(s, 5 + j)
    return applied, np.argsort(keys), factors


@numba.njit(inline="always")
def coin(s, p):
    """Draw 0 of stream s is below p (flip, grayscale, blur)."""
    return uniform(s, 0) < p


@numba.njit(inline="always")
def blur_sigma(s, lo, hi):
    """The blur's sigma, uniform in [lo, hi] (draw 1 of the blur stream)."""
    return lo + (hi - lo) * uniform(s, 1)


# A blur's window is cut at this many sigmas on each side, capped at the spec's kernel: the taps
# dropped weigh under 1e-4 of the kernel together (below uint8 rounding), and a sigma-1 blur
# runs 11 taps instead of 23 at 224 pixels. Every backend blurs with this window.
BLUR_WINDOW_SIGMAS = 4.0


@numba.njit(inline="always")
def blur_window(sigma, kernel_size):
    """Odd window side of one sample's blur: +-BLUR_WINDOW_SIGMAS sigma, within [3, kernel_size]."""
    half = int(math.ceil(BLUR_WINDOW_SIGMAS * sigma))
    return max(3, min(kernel_size, 2 * half + 1))


def blur_windows(sigma: np.ndarray, kernel_size: int) -> np.ndarray:
    """`blur_window` of every sample: int32 [B]."""
    half = np.ceil(BLUR_WINDOW_SIGMAS * np.asarray(sigma, dtype=np.float64)).astype(np.int64)
    return np.clip(2 * half + 1, 3, kernel_size).astype(np.int32)


@numba.njit(cache=True)
def _tail_params(key, index, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi):
    b = index.shape[0]
    jitter = np.empty(b, dtype=np.bool_)
    order = np.empty((b, 4), dtype=np.int64)
    factors = np.empty((b, 4))
    gray = np.empty(b, dtype=np.bool_)
    blur = np.empty(b, dtype=np.bool_)
    sigma = np.empty(b)
    for i in range(b):
        applied, perm, f = jitter_draw(stream(key, index[i], SALT_JITTER), jitter_p, lo, hi)
        jitter[i] = applied
        order[i, :] = perm
        factors[i, :] = f
        gray[i] = coin(stream(key, index[i], SALT_GRAY), gray_p)
        s = stream(key, index[i], SALT_BLUR)
        blur[i] = coin(s, blur_p)
        sigma[i] = blur_sigma(s, s_lo, s_hi)
    return jitter, order, factors, gray, blur, sigma


def colour_blur_params(spec, key, index: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample jitter, grayscale and blur parameters of one view, from the FFCV streams.

    The same draws as the numba operations in `pipelines.ffcv_ops`, batched: `jitter` bool [B],
    `order` int64 [B, 4], `factors` float64 [B, 4] (hue in turns), `gray` bool [B], `blur` bool [B],
    `sigma` float64 [B]. `spec` is an `AugmentSpec`.
    """
    lo, hi = jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    jitter, order, factors, gray, blur, sigma = _tail_params(
        np.uint64(key), np.asarray(index, dtype=np.int64), float(spec.jitter_p), lo, hi, float(spec.grayscale_p),
        float(spec.blur_p), float(spec.blur_sigma[0]), float(spec.blur_sigma[1]))
    return {"jitter": jitter, "order": order, "factors": factors, "gray": gray, "blur": blur, "sigma": sigma}
