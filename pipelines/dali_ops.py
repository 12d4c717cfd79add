"""Per-sample SimCLR augmentation parameters and the DALI operation list built from `AugmentSpec`.

DALI's random operators draw from a per-pipeline generator, so their results depend on the
batch a sample lands in and on the thread that runs it. To make a view depend only on
(seed, epoch, index, view), as the loader contract asks, every random choice is drawn here,
in numpy, from a counter-based hash of that key, and handed to the graph as per-sample
argument inputs (crop window, flip, jitter factors and order, grayscale, blur sigma). The
graph itself is deterministic, so the same key gives the same view on CPU and GPU, for any
batch size, rank or thread count, and resuming needs nothing but the batch position.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.spec import AugmentSpec

# Column layout of the colour table: one row per jitter slot, (brightness, contrast, saturation, hue°).
JITTER_SLOTS = 4
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer, vectorised."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, index: np.ndarray, view: int, n: int) -> np.ndarray:
    """float64 [B, n] in [0, 1): stream `view` of sample `index` in `epoch`; counter-based, so
    any subset of samples can be drawn in any order and gets the same numbers."""
    key = splitmix64(splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ np.uint64(epoch))
    key = splitmix64(key ^ np.uint64(view + 1))
    base = splitmix64(key ^ splitmix64(np.asarray(index, dtype=np.int64).astype(np.uint64)))  # [B]
    counters = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = splitmix64(base[:, None] + counters[None, :] * _GOLDEN)  # [B, n]
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                              scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """int64 [B, 4] crop boxes (top, left, h, w), torchvision's RandomResizedCrop.get_params
    vectorised: 10 tries of (area, log-aspect), the first that fits wins, else a centre crop
    clamped to the aspect range. `u` holds 40 uniforms per sample (4 per try)."""
    h_img = heights.astype(np.float64)[:, None]
    w_img = widths.astype(np.float64)[:, None]
    area = h_img * w_img
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 10:20])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)  # [B, 10]
    top = np.floor(u[:, 20:30] * (h_img - h + 1))
    left = np.floor(u[:, 30:40] * (w_img - w + 1))
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    box = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], axis=1)
    # Fallback (no try fits): the whole image, or its centre clamped to the aspect range.
    hh, ww = heights.astype(np.float64), widths.astype(np.float64)
    in_ratio = ww / hh
    fw = np.where(in_ratio < ratio[0], ww, np.where(in_ratio > ratio[1], np.rint(hh * ratio[1]), ww))
    fh = np.where(in_ratio < ratio[0], np.rint(ww / ratio[0]), hh)
    fallback = np.stack([np.floor((hh - fh) / 2), np.floor((ww - fw) / 2), fh, fw], axis=1)
    return np.where(fits.any(axis=1)[:, None], box, fallback).astype(np.int64)


def sample_view_params(spec: AugmentSpec, seed: int, epoch: int, index: np.ndarray, view: int,
                       heights: np.ndarray, widths: np.ndarray) -> dict[str, np.ndarray]:
    """Every random choice of one SimCLR view for a batch of samples, drawn from (seed, epoch, index, view).

    Returns per-sample arrays: `box` int64 [B, 4] (top, left, h, w); `flip` int32 [B];
    `jitter` bool [B]; `order` int64 [B, 4] (a permutation of brightness, contrast,
    saturation, hue, as torchvision's ColorJitter draws); `factors` float32 [B, 4]
    (brightness, contrast, saturation factors and hue as a fraction of a turn);
    `color` float32 [B, 4, 4]: per slot, (brightness, contrast, saturation, hue in degrees)
    with only the slot's own adjustment away from identity (all identity when no jitter);
    `gray` bool [B]; `blur` bool [B]; `sigma` float32 [B].
    """
    index = np.asarray(index, dtype=np.int64)
    b = len(index)
    u = uniforms(seed, epoch, index, view, 40 + 1 + 1 + 4 + 4 + 1 + 1 + 1)
    box = random_resized_crop_boxes(u[:, :40], np.asarray(heights), np.asarray(widths), spec.crop_area, spec.crop_ratio)
    flip = (u[:, 40] < spec.flip_p).astype(np.int32)
    jitter = u[:, 41] < spec.jitter_p
    order = np.argsort(u[:, 42:46], axis=1)  # a uniform random permutation per sample
    lo_hi = [(max(0.0, 1 - spec.brightness), 1 + spec.brightness), (max(0.0, 1 - spec.contrast), 1 + spec.contrast),
             (max(0.0, 1 - spec.saturation), 1 + spec.saturation), (-spec.hue, spec.hue)]
    factors = np.stack([lo + (hi - lo) * u[:, 46 + j] for j, (lo, hi) in enumerate(lo_hi)], axis=1)
    identity = np.array([1.0, 1.0, 1.0, 0.0])
    color = np.broadcast_to(identity, (b, JITTER_SLOTS, 4)).copy()
    rows = np.arange(b)
    for slot in range(JITTER_SLOTS):
        op = order[:, slot]
        value = factors[rows, op] * np.where(op == 3, 360.0, 1.0)  # DALI's hue is in degrees
        color[rows, slot, op] = np.where(jitter, value, identity[op])
    gray = u[:, 50] < spec.grayscale_p
    blur = u[:, 51] < spec.blur_p
    sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[:, 52]
    return {"box": box, "flip": flip, "jitter": jitter, "order": order, "factors": factors.astype(np.float32),
            "color": color.astype(np.float32), "gray": gray, "blur": blur, "sigma": sigma.astype(np.float32)}


# ---- the DALI graph --------------------------------------------------------------------------
# Only imported when a pipeline is built, so the parameter sampler above needs no DALI.

VIEW_INPUTS = ("roi_start", "roi_end", "flip", "color", "is_bc", "gray", "blur", "sigma")


def view_inputs(params: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The per-sample argument inputs of one view, in `VIEW_INPUTS` order."""
    top, left, h, w = (params["box"][:, j].astype(np.float32) for j in range(4))
    op = params["order"]
    return (
        np.stack([top, left], axis=1),  # roi_start [B, 2] (y, x): DALI follows the tensor's axis order
        np.stack([top + h, left + w], axis=1),  # roi_end [B, 2]
        params["flip"],
        params["color"],  # [B, 4 slots, (b, c, s, hue°)]
        op < 2,  # is_bc [B, 4 slots]: the slot adjusts brightness or contrast (else saturation or hue)
        params["gray"],
        params["blur"],
        params["sigma"],
    )


def simclr_view(image, inputs, spec: AugmentSpec, device: str, out_dtype):
    """One SimCLR view of decoded HWC uint8 images, top to bottom in the paper's order.

    `inputs` are the external-source nodes named by VIEW_INPUTS. Runs inside a pipeline
    defined with enable_conditionals=True: per-sample `if`s route each sample through only the
    adjustments it drew.
    """
    from nvidia.dali import fn, types

    roi_start, roi_end, flip, color, is_bc, gray, blur, sigma = inputs

    # 1. random resized crop: the box was drawn on the host; bilinear with antialiasing, as torchvision.
    x = fn.resize(image, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=[spec.size, spec.size],
                  interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)  # [S, S, 3] uint8
    # 2. colour jitter, each sample in its own random order: slot k applies the sample's k-th
    #    adjustment (the other three factors of the slot are identity); uint8 between slots
    #    rounds and clamps like torchvision's uint8 path. No jitter = four identity slots.
    for slot in range(JITTER_SLOTS):
        bright, contrast, sat, hue = (color[slot, j] for j in range(4))
        if is_bc[slot]:
            x = _brightness_contrast(x, bright, contrast, device)
        else:
            x = fn.cast(fn.color_twist(x, saturation=sat, hue=hue, dtype=types.FLOAT), dtype=types.UINT8)
    # 3. random grayscale: luma (0.299, 0.587, 0.114) in all three channels, as torchvision.
    if gray:
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)  # [S, S, 1]
        x = fn.cat(luma, luma, luma, axis=2)
    # 4. Gaussian blur on the samples that drew it (per-sample sigma, fixed odd window).
    if spec.blur_p > 0:
        if blur:
            x = fn.gaussian_blur(x, window_size=spec.blur_kernel, sigma=sigma)
    # 5. flip (commutes with the colour ops and the symmetric blur), normalise, keep HWC = channels_last.
    return fn.crop_mirror_normalize(
        x, mirror=flip, mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
        dtype=out_dtype, output_layout="HWC")


def _brightness_contrast(x, bright, contrast, device: str):
    """torchvision's adjust_brightness / adjust_contrast (blend with the mean luma), clamped to uint8."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    gray_mean = fn.reductions.mean(fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY),
                                   dtype=types.FLOAT)  # [] per sample
    if device == "gpu":
        # Argument inputs must live on the host, so the GPU blends with arithmetic instead.
        c = contrast.gpu()
        y = (fn.cast(x, dtype=types.FLOAT) * c + gray_mean * (1.0 - c)) * bright.gpu()
        return fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)
    return fn.brightness_contrast(x, brightness=bright, contrast=contrast, contrast_center=gray_mean,
                                  dtype=types.UINT8)
