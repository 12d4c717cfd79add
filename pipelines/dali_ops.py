"""The DALI graph of one SimCLR view, built from `AugmentSpec` and the one sampler's parameters.

DALI's random operators draw from a per-pipeline generator, so their results depend on the
batch a sample lands in and on the thread that runs it. So the graph draws nothing: the loader's
host feed hands it what the one sampler (`pipelines.augment_params.sample_views`) drew for each
sample's (seed, epoch, index, view): the crop box and the packed tail parameters. The same key
gives the same view on CPU and GPU, in DALI and in every other backend, for any batch size, rank
or thread count, and resuming needs nothing but the batch position.

DALI's own colour operators do not follow torchvision (its hue is a rotation in YIQ, not an HSV
shift), so the tail is rendered by the project's kernels: on the CPU inside the graph, by the
numba kernel of `pipelines.render_cpu` run per sample on DALI's threads; on a GPU after the
pipeline, by `pipelines.render_gpu`.
"""

from __future__ import annotations

import functools

import numpy as np

from pipelines.spec import AugmentSpec

# The feed's per-view inputs, in order: crop box corners and the packed tail parameters.
VIEW_INPUTS = ("roi_start", "roi_end", "params")


def view_inputs(boxes: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view's feed inputs from `sample_views`: roi_start, roi_end float32 [B, 2] (y, x: DALI
    follows the tensor's axis order) and params float64 [B, N_P]."""
    top, left, h, w = (boxes[:, j].astype(np.float32) for j in range(4))
    return (np.stack([top, left], axis=1), np.stack([top + h, left + w], axis=1),
            np.ascontiguousarray(params))


@functools.cache
def _cpu_tail():
    from pipelines.dali_tail import dali_tail

    return dali_tail()  # compiled once per process, used by every pipeline


def simclr_view(image, roi_start, roi_end, params, spec: AugmentSpec, device: str, out_dtype):
    """One SimCLR view of decoded HWC uint8 images, top to bottom in the paper's order.

    CPU: the normalised view (float HWC, i.e. channels_last). GPU: the cropped uint8 HWC image; the
    loader renders the tail (`pipelines.render_gpu`) and normalises it in torch.
    """
    from nvidia.dali import fn, types

    # 1. random resized crop: the box was drawn by the one sampler; bilinear with antialiasing,
    #    as torchvision.
    x = fn.resize(image, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                  size=[spec.size, spec.size], interp_type=types.INTERP_LINEAR, antialias=True,
                  dtype=types.UINT8)  # [S, S, 3] uint8
    if device == "gpu":
        return x
    # 2. the tail: flip, colour jitter in the sample's random order, grayscale, blur (+-4 sigma
    #    window), each as torchvision's functional op on uint8; one numba kernel per sample.
    x = _cpu_tail()(x, params)
    # 3. normalise, keep HWC = channels_last.
    return fn.crop_mirror_normalize(x, mean=[255.0 * m for m in spec.mean],
                                    std=[255.0 * s for s in spec.std],
                                    dtype=out_dtype, output_layout="HWC")
