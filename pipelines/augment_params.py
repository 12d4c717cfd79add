"""The one sampler: every random parameter of a SimCLR view, drawn from (seed, epoch, index, view).

The loader contract asks that a view depend only on (seed, epoch, index, view), and that every
backend draw the same view for the same key. So no backend owns a random generator: every
random number comes from a hash of the key. `view_key(seed, epoch, view)` fixes the epoch and
view, `stream(key, index)` a sample's stream, and `uniform(stream, k)` its k-th draw. Any sample
can be drawn alone, in any batch and on any thread, and gets the same numbers.

A view's draws are laid out once (`DRAW_*`): 40 for the crop box (torchvision's ten tries), then
flip, jitter, the jitter order, the four jitter factors, grayscale, blur, and the blur's sigma;
after them the paper's study operations (rotation, Sobel, noise, cutout), so adding them moved no
earlier draw; the Gaussian noise field draws from the same stream, from `NOISE_FIRST` on.
`view_params` turns them into the packed per-sample vector (`P_*`) that every renderer reads:
torchvision's functional ops (the reference), the numba kernels (CPU: FFCV, DALI) and the batched
torch ops (GPU). `sample_views` is the batched form for host code. Everything here is compiled with
numba, so FFCV's compiled operations call the same functions per sample.
"""

from __future__ import annotations

import math

import numba
import numpy as np

import pipelines.kernel_cache  # noqa: F401  before the kernels: their cache covers every file they use

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11, _S56 = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11),
                                np.uint64(56))
_TWO_POW_53 = 9007199254740992.0
_U64_MASK = 0xFFFFFFFFFFFFFFFF

CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params; a box takes 4 draws per try
SALT_VIEW = 0  # the stream of a view's parameters (other salts are free for future operations)

# Draw k of a sample's view stream -> what it decides.
DRAW_CROP = 1  # 4 * CROP_TRIES draws: area, log-aspect, top, left of each try
DRAW_FLIP = DRAW_CROP + 4 * CROP_TRIES  # 41
DRAW_JITTER = DRAW_FLIP + 1  # whether colour jitter applies
DRAW_ORDER = DRAW_JITTER + 1  # 4 keys whose argsort is the jitter order
DRAW_FACTORS = DRAW_ORDER + 4  # brightness, contrast, saturation, hue
DRAW_GRAY = DRAW_FACTORS + 4
DRAW_BLUR = DRAW_GRAY + 1
DRAW_SIGMA = DRAW_BLUR + 1  # 53
# the study's operations (spec.py), after every earlier draw
DRAW_ROTATE = DRAW_SIGMA + 1  # whether to rotate
DRAW_QUARTERS = DRAW_ROTATE + 1  # 1, 2 or 3 quarter turns
DRAW_SOBEL = DRAW_QUARTERS + 1
DRAW_NOISE = DRAW_SOBEL + 1
DRAW_NOISE_STD = DRAW_NOISE + 1
DRAW_CUTOUT = DRAW_NOISE_STD + 1
DRAW_CUTOUT_BOX = DRAW_CUTOUT + 1  # 3 draws: side, top, left; 62 is the last
# The noise of element e = (y * W + x) * 3 + c (HWC order) takes draws NOISE_FIRST + 2e and + 2e + 1
# (Box-Muller), far past the layout above.
NOISE_FIRST = 1 << 32

# The packed parameters of one view's colour/blur tail, float64 [N_P]: what every renderer reads.
P_FLIP = 0  # 1.0: mirror horizontally
P_JITTER = 1  # 1.0: apply the four adjustments in the order below
P_ORDER = 2  # 4 slots: the adjustment of each slot, 0 brightness, 1 contrast, 2 saturation, 3 hue
P_FACTOR = 6  # 4 factors: brightness, contrast, saturation, hue (in turns, [-0.5, 0.5])
P_GRAY = 10  # 1.0: luma to all three channels
P_BLUR = 11  # 1.0: Gaussian blur
P_SIGMA = 12  # the blur's sigma
P_WINDOW = 13  # the blur's odd window side (`blur_window`)
P_ROTATE = 14  # quarter turns counter-clockwise: 0 (no rotation), 1, 2 or 3
P_SOBEL = 15  # 1.0: Sobel gradient magnitude
P_NOISE = 16  # 1.0: additive Gaussian noise
P_NOISE_STD = 17  # its sigma in levels (0..255 scale)
P_NOISE_STREAM = 18  # 2 slots: the view stream's high and low 32 bits, which key the noise field
P_CUTOUT = 20  # 1.0: a black square
P_CUTOUT_BOX = 21  # 3 slots: its top, left and side in pixels
N_P = 24

# The study's constants from the spec (`study_constants`), float64 [N_STUDY], in this order.
S_ROTATE_P, S_SOBEL_P, S_NOISE_P, S_NOISE_LO, S_NOISE_HI, S_CUTOUT_P, S_CUTOUT_LO, S_CUTOUT_HI, \
    S_SIZE = range(9)
N_STUDY = 9


@numba.njit(inline="always")
def mix(x):
    """SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer on a uint64."""
    x = x + GOLDEN
    x = (x ^ (x >> _S30)) * MIX_M1
    x = (x ^ (x >> _S27)) * MIX_M2
    return x ^ (x >> _S31)


@numba.njit(cache=True)
def _view_key(seed, epoch, view):
    return mix(mix(mix(seed) ^ epoch) ^ (view + np.uint64(1)))


def view_key(seed: int, epoch: int, view: int) -> np.uint64:
    """The uint64 key of one view (0 or 1) of every sample in `epoch`."""
    # numba returns the uint64 as a Python int, which a later call would type as int64
    return np.uint64(_view_key(np.uint64(seed & _U64_MASK), np.uint64(epoch), np.uint64(view)))


@numba.njit(inline="always")
def stream(key, index, salt=SALT_VIEW):
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
    return _uniform_table(np.uint64(key), np.asarray(index, dtype=np.int64), np.uint64(salt),
                          first, n)


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
    """`crop_box` of sample `index`'s stream under `key`, compiled once (not inlined into
    callers)."""
    return crop_box(stream(key, index, salt), first, height, width, scale_lo, scale_hi,
                    ratio_lo, ratio_hi)


@numba.njit(cache=True)
def _crop_boxes(key, index, heights, widths, salt, first, scale_lo, scale_hi, ratio_lo, ratio_hi):
    out = np.empty((index.shape[0], 4), dtype=np.int64)
    for i in range(index.shape[0]):
        top, left, h, w = crop_box(stream(key, index[i], salt), first,
                                   np.int64(heights[i]), np.int64(widths[i]),
                                   scale_lo, scale_hi, ratio_lo, ratio_hi)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = top, left, h, w
    return out


def crop_boxes(key, index: np.ndarray, heights: np.ndarray, widths: np.ndarray, salt: int,
               first: int, scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """int64 [B, 4] crop boxes (top, left, h, w), `crop_box` per sample."""
    index = np.asarray(index, dtype=np.int64)
    return _crop_boxes(np.uint64(key), index,
                       np.broadcast_to(np.asarray(heights, dtype=np.int64), index.shape),
                       np.broadcast_to(np.asarray(widths, dtype=np.int64), index.shape),
                       np.uint64(salt), first,
                       float(scale[0]), float(scale[1]), float(ratio[0]), float(ratio[1]))


# ---- the rest of a view: flip, colour jitter, grayscale, blur ----------------------------------

def jitter_ranges(brightness: float, contrast: float, saturation: float,
                  hue: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision ColorJitter's factor ranges: float64 [4] lo, hi for (brightness, contrast,
    saturation, hue in turns)."""
    lo = np.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation),
                   -hue])
    hi = np.array([1 + brightness, 1 + contrast, 1 + saturation, hue])
    return lo, hi


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


@numba.njit(inline="always")
def tail_params(s, flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size, study, out):
    """The packed tail parameters (`P_*`) of one view from its stream s, written to out [N_P].

    torchvision's semantics: RandomHorizontalFlip(flip_p), RandomApply(ColorJitter) with p =
    jitter_p (factors uniform in [lo, hi], a uniform random order of the four adjustments),
    RandomGrayscale(gray_p), RandomApply(GaussianBlur) with p = blur_p (sigma uniform in
    [s_lo, s_hi]); then the study's operations with the constants `study` [N_STUDY] (spec.py).
    """
    out[P_FLIP] = 1.0 if uniform(s, DRAW_FLIP) < flip_p else 0.0
    out[P_JITTER] = 1.0 if uniform(s, DRAW_JITTER) < jitter_p else 0.0
    keys = np.empty(4)
    for j in range(4):
        keys[j] = uniform(s, DRAW_ORDER + j)
        out[P_FACTOR + j] = lo[j] + (hi[j] - lo[j]) * uniform(s, DRAW_FACTORS + j)
    order = np.argsort(keys)
    for j in range(4):
        out[P_ORDER + j] = order[j]
    out[P_GRAY] = 1.0 if uniform(s, DRAW_GRAY) < gray_p else 0.0
    out[P_BLUR] = 1.0 if uniform(s, DRAW_BLUR) < blur_p else 0.0
    sigma = s_lo + (s_hi - s_lo) * uniform(s, DRAW_SIGMA)
    out[P_SIGMA] = sigma
    out[P_WINDOW] = blur_window(sigma, kernel_size)
    study_params(s, study, out)


@numba.njit(inline="always")
def study_params(s, study, out):
    """Rotation, Sobel, noise and cutout parameters of one view (`P_ROTATE` on) into out."""
    rotate = uniform(s, DRAW_ROTATE) < study[S_ROTATE_P]
    out[P_ROTATE] = 1.0 + math.floor(3.0 * uniform(s, DRAW_QUARTERS)) if rotate else 0.0
    out[P_SOBEL] = 1.0 if uniform(s, DRAW_SOBEL) < study[S_SOBEL_P] else 0.0
    out[P_NOISE] = 1.0 if uniform(s, DRAW_NOISE) < study[S_NOISE_P] else 0.0
    n_lo, n_hi = study[S_NOISE_LO], study[S_NOISE_HI]
    out[P_NOISE_STD] = 255.0 * (n_lo + (n_hi - n_lo) * uniform(s, DRAW_NOISE_STD))
    out[P_NOISE_STREAM] = np.float64(np.uint64(s) >> np.uint64(32))
    out[P_NOISE_STREAM + 1] = np.float64(np.uint64(s) & np.uint64(0xFFFFFFFF))
    out[P_CUTOUT] = 1.0 if uniform(s, DRAW_CUTOUT) < study[S_CUTOUT_P] else 0.0
    size = np.int64(study[S_SIZE])
    c_lo, c_hi = study[S_CUTOUT_LO], study[S_CUTOUT_HI]
    frac = c_lo + (c_hi - c_lo) * uniform(s, DRAW_CUTOUT_BOX)
    side = min(size, max(np.int64(1), np.int64(np.rint(frac * size))))
    out[P_CUTOUT_BOX] = math.floor(uniform(s, DRAW_CUTOUT_BOX + 1) * (size - side + 1))
    out[P_CUTOUT_BOX + 1] = math.floor(uniform(s, DRAW_CUTOUT_BOX + 2) * (size - side + 1))
    out[P_CUTOUT_BOX + 2] = side


@numba.njit(inline="always")
def noise_stream(p):
    """The stream that keys a view's noise field, from its packed parameters p [N_P]."""
    return ((np.uint64(p[P_NOISE_STREAM]) << np.uint64(32))
            | np.uint64(p[P_NOISE_STREAM + 1]))


@numba.njit(inline="always")
def noise_normal(s, e):
    """The standard normal of element e of the noise field of stream s (Box-Muller, float64)."""
    u1 = uniform(s, NOISE_FIRST + 2 * e)
    u2 = uniform(s, NOISE_FIRST + 2 * e + 1)
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


@numba.njit(cache=True)
def _noise_uniforms(p, n):
    s = noise_stream(p)
    out = np.empty((n, 2))
    for e in range(n):
        out[e, 0] = uniform(s, NOISE_FIRST + 2 * e)
        out[e, 1] = uniform(s, NOISE_FIRST + 2 * e + 1)
    return out


def noise_uniforms(params: np.ndarray, n: int) -> np.ndarray:
    """float64 [n, 2]: the two uniforms of each of the first n elements of the noise field of one
    view's packed parameters (what `noise_normal` turns into a normal)."""
    return _noise_uniforms(np.ascontiguousarray(params, dtype=np.float64), n)


@numba.njit(cache=True)
def _sample(key, index, heights, widths, c_lo, c_hi, r_lo, r_hi, flip_p, jitter_p, lo, hi,
            gray_p, blur_p, s_lo, s_hi, kernel_size, study):
    b = index.shape[0]
    boxes = np.empty((b, 4), dtype=np.int64)
    params = np.empty((b, N_P))
    for i in range(b):
        s = stream(key, index[i])
        top, left, h, w = crop_box(s, DRAW_CROP, np.int64(heights[i]), np.int64(widths[i]),
                                   c_lo, c_hi, r_lo, r_hi)
        boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = top, left, h, w
        tail_params(s, flip_p, jitter_p, lo, hi, gray_p, blur_p, s_lo, s_hi, kernel_size, study,
                    params[i])
    return boxes, params


def study_constants(spec) -> np.ndarray:
    """The study operations' constants of an `AugmentSpec`: float64 [N_STUDY] (`S_*`)."""
    return np.array([spec.rotate_p, spec.sobel_p, spec.noise_p, spec.noise_std[0],
                     spec.noise_std[1], spec.cutout_p, spec.cutout_size[0], spec.cutout_size[1],
                     spec.size], dtype=np.float64)


def spec_constants(spec) -> tuple:
    """The sampler's arguments that come from an `AugmentSpec` (one view's: `spec.for_view`), in
    `_sample`'s order after the sizes."""
    lo, hi = jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    return (float(spec.crop_area[0]), float(spec.crop_area[1]),
            float(spec.crop_ratio[0]), float(spec.crop_ratio[1]),
            float(spec.flip_p), float(spec.jitter_p), lo, hi,
            float(spec.grayscale_p), float(spec.blur_p),
            float(spec.blur_sigma[0]), float(spec.blur_sigma[1]), int(spec.blur_kernel),
            study_constants(spec))


def sample_views(spec, seed: int, epoch: int, index: np.ndarray, view: int, heights, widths
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every random parameter of one view (0 or 1) of each sample in `index`.

    Returns (boxes, params): boxes int64 [B, 4] (top, left, height, width) of the random resized
    crop in each image of `heights` x `widths`; params float64 [B, N_P], the packed flip, jitter,
    grayscale, blur, rotation, Sobel, noise and cutout parameters (`P_*`). The view's own spec
    (`spec.for_view(view)`: its `view1`/`view2` overrides) decides them. The same numbers for the
    same (seed, epoch, index, view), whatever the batch, in every backend.
    """
    index = np.asarray(index, dtype=np.int64)
    shape = index.shape
    return _sample(view_key(seed, epoch, view), index,
                   np.broadcast_to(np.asarray(heights, dtype=np.int64), shape),
                   np.broadcast_to(np.asarray(widths, dtype=np.int64), shape),
                   *spec_constants(spec.for_view(view)))
