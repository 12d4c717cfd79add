"""Per-sample SimCLR augmentation parameters and the DALI operation list built from `AugmentSpec`.

DALI's random operators draw from a per-pipeline generator, so their results depend on the
batch a sample lands in and on the thread that runs it. To make a view depend only on
(seed, epoch, index, view), as the loader contract asks, every random choice is drawn here,
on the host, from the counter-based streams of `pipelines.augment_params`, and handed to the
graph as per-sample argument inputs (crop window, flip, jitter factors and order, grayscale, blur sigma). The
graph itself is deterministic, so the same key gives the same view on CPU and GPU, for any
batch size, rank or thread count, and resuming needs nothing but the batch position.
"""

from __future__ import annotations

import numpy as np

from pipelines.augment_params import (
    CROP_TRIES,
    SALT_ALL,
    blur_windows,
    crop_boxes,
    jitter_ranges,
    uniform_table,
    view_key,
)
from pipelines.spec import AugmentSpec

# Column layout of the colour table: one row per jitter slot, (brightness, contrast, saturation, hue°).
JITTER_SLOTS = 4
# Draws of a view's single stream (salt 0), from draw 1 on: 40 for the crop box, then these.
_CROP_FIRST = 1
_FLIP, _JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA = 0, 1, 2, 6, 10, 11, 12
_N_REST = 13


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
    key = view_key(seed, epoch, view)
    box = crop_boxes(key, index, heights, widths, SALT_ALL, _CROP_FIRST, spec.crop_area, spec.crop_ratio)
    u = uniform_table(key, index, SALT_ALL, _CROP_FIRST + 4 * CROP_TRIES, _N_REST)  # [B, 13]
    flip = (u[:, _FLIP] < spec.flip_p).astype(np.int32)
    jitter = u[:, _JITTER] < spec.jitter_p
    order = np.argsort(u[:, _ORDER:_ORDER + 4], axis=1)  # a uniform random permutation per sample
    lo, hi = jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    factors = lo + (hi - lo) * u[:, _FACTORS:_FACTORS + 4]  # [B, 4]
    identity = np.array([1.0, 1.0, 1.0, 0.0])
    color = np.broadcast_to(identity, (b, JITTER_SLOTS, 4)).copy()
    rows = np.arange(b)
    for slot in range(JITTER_SLOTS):
        op = order[:, slot]
        value = factors[rows, op] * np.where(op == 3, 360.0, 1.0)  # DALI's hue is in degrees
        color[rows, slot, op] = np.where(jitter, value, identity[op])
    gray = u[:, _GRAY] < spec.grayscale_p
    blur = u[:, _BLUR] < spec.blur_p
    sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u[:, _SIGMA]
    return {"box": box, "flip": flip, "jitter": jitter, "order": order, "factors": factors.astype(np.float32),
            "color": color.astype(np.float32), "gray": gray, "blur": blur, "sigma": sigma.astype(np.float32)}


# ---- the DALI graph --------------------------------------------------------------------------
# Only imported when a pipeline is built, so the parameter sampler above needs no DALI.

def view_input_names(spec: AugmentSpec) -> tuple[str, ...]:
    """Names of one view's per-sample argument inputs, in feed order.

    Only what the graph consumes: an external source output that no operator reads makes DALI
    warn on every build, so the blur inputs are left out when the spec disables blur.
    """
    names = ("roi_start", "roi_end", "flip", "jitter", "color", "is_bc", "gray")
    return names + ("blur", "sigma", "window") if spec.blur_p > 0 else names


def view_inputs(params: dict[str, np.ndarray], names: tuple[str, ...], spec: AugmentSpec) -> tuple[np.ndarray, ...]:
    """The per-sample argument inputs of one view, in the order of `names` (see `view_input_names`)."""
    top, left, h, w = (params["box"][:, j].astype(np.float32) for j in range(4))
    arrays = {
        "roi_start": np.stack([top, left], axis=1),  # [B, 2] (y, x): DALI follows the tensor's axis order
        "roi_end": np.stack([top + h, left + w], axis=1),  # [B, 2]
        "flip": params["flip"],
        "jitter": params["jitter"],
        "color": params["color"],  # [B, 4 slots, (b, c, s, hue°)]
        "is_bc": params["order"] < 2,  # [B, 4 slots]: the slot adjusts brightness or contrast (else saturation or hue)
        "gray": params["gray"],
        "blur": params["blur"],
        "sigma": params["sigma"],
        "window": blur_windows(params["sigma"], spec.blur_kernel) if "window" in names else None,
    }
    return tuple(arrays[name] for name in names)


def simclr_view(image, inputs, spec: AugmentSpec, device: str, out_dtype):
    """One SimCLR view of decoded HWC uint8 images, top to bottom in the paper's order.

    `inputs` maps the names of `view_input_names(spec)` to external-source nodes. Runs inside a pipeline
    defined with enable_conditionals=True: per-sample `if`s route each sample through only the
    adjustments it drew.
    """
    from nvidia.dali import fn, types

    roi_start, roi_end, flip, color, is_bc, gray = (inputs[k] for k in ("roi_start", "roi_end", "flip", "color",
                                                                       "is_bc", "gray"))

    # 1. random resized crop: the box was drawn on the host; bilinear with antialiasing, as torchvision.
    x = fn.resize(image, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=[spec.size, spec.size],
                  interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)  # [S, S, 3] uint8
    # 2. colour jitter on the samples that drew it, each in its own random order: slot k applies
    #    the sample's k-th adjustment (the other three factors of the slot are identity); uint8
    #    between slots rounds and clamps like torchvision's uint8 path.
    if inputs["jitter"]:
        for slot in range(JITTER_SLOTS):
            bright, contrast, sat, hue = (color[slot, j] for j in range(4))
            if is_bc[slot]:
                x = _brightness_contrast(x, bright, contrast, device)
            else:  # uint8 output rounds to nearest and saturates
                x = fn.color_twist(x, saturation=sat, hue=hue, dtype=types.UINT8)
    # 3. random grayscale: luma (0.299, 0.587, 0.114) in all three channels, as torchvision.
    if gray:
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)  # [S, S, 1]
        x = fn.cat(luma, luma, luma, axis=2)
    # 4. Gaussian blur on the samples that drew it (per-sample sigma; odd window of +-4 sigma,
    #    at most the spec's kernel: see augment_params.BLUR_WINDOW_SIGMAS).
    if spec.blur_p > 0:
        if inputs["blur"]:
            x = fn.gaussian_blur(x, window_size=inputs["window"], sigma=inputs["sigma"])
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
