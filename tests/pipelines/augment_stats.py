"""Shared helpers for the loaders' statistical tests: synthetic inputs and binomial bounds."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.augment_params import (
    P_BLUR,
    P_FACTOR,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    P_ORDER,
    P_SIGMA,
    sample_views,
)
from pipelines.sources import Split


def binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """k successes in n trials are within `sigmas` standard deviations of n*p."""
    sd = math.sqrt(max(n * p * (1 - p), 1e-12))
    return abs(k - n * p) <= sigmas * sd + 1e-9


def noise_split(n: int, side: int, root=None, seed: int = 0, channels: int = 3) -> Split:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    return Split("train", (np.arange(n) % 10).astype(np.int64), images=imgs, root=root)


def coord_split(n: int, height: int, width: int, root=None) -> Split:
    """Images whose R encodes the column and G the row (scaled to 0..255), B constant."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img = np.stack([np.rint(xs * 255 / (width - 1)), np.rint(ys * 255 / (height - 1)),
                    np.full_like(xs, 128)], -1)
    imgs = np.broadcast_to(img.astype(np.uint8), (n, height, width, 3)).copy()
    return Split("train", np.zeros(n, dtype=np.int64), images=imgs, root=root)


def to_uint8(view: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo normalisation: float [B, 3, S, S] -> float pixel values 0..255."""
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    return view.float().cpu() * s + m


def recover_boxes(pixels: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(x0, y0, x1, y1) in source pixels per sample from views of `coord_split` images.

    Horizontal flips are undone by taking the min/max column. The resize maps output pixel
    centres into the box, so the extent of the output (S pixels) spans (S-1)/S of the box.
    """
    s = pixels.shape[-1]
    xs = pixels[:, 0] * (width - 1) / 255  # [B, S, S]
    ys = pixels[:, 1] * (height - 1) / 255
    xl = torch.minimum(xs[:, :, 0], xs[:, :, -1]).mean(1)
    xr = torch.maximum(xs[:, :, 0], xs[:, :, -1]).mean(1)
    yt, yb = ys[:, 0, :].mean(1), ys[:, -1, :].mean(1)
    w = (xr - xl) * s / (s - 1)
    h = (yb - yt) * s / (s - 1)
    return torch.stack([w, h], 1).numpy()


def area_ratio_stats(wh: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    area = wh[:, 0] * wh[:, 1] / (height * width)
    return area, wh[:, 0] / wh[:, 1]


def two_sample_ok(k1: int, n1: int, k2: int, n2: int, sigmas: float = 4.0) -> bool:
    """Two binomial proportions agree within `sigmas` standard errors of their difference."""
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p) * (1 / n1 + 1 / n2), 1e-12))
    return abs(k1 / n1 - k2 / n2) <= sigmas * se + 1e-9


def roughness(pixels: torch.Tensor) -> torch.Tensor:
    """[B]: variance of horizontal neighbour differences over the pixel variance, averaged over
    channels. About 2 for spatially independent noise (whatever per-pixel colour changes it went
    through), well below 1 once a Gaussian blur of sigma >= 1 correlates neighbours."""
    x = pixels.float()
    diff = (x[..., 1:] - x[..., :-1]).flatten(2).var(2)  # [B, C]
    var = x.flatten(2).var(2).clamp_min(1e-6)
    return (diff / var).mean(1)


def drawn(spec, seed: int, epoch: int, index, view: int, height, width) -> dict[str, np.ndarray]:
    """The one sampler's draws for a batch, by name: box int64 [B, 4] (top, left, h, w), flip,
    jitter, gray, blur bool [B], order int64 [B, 4], factors float64 [B, 4] (hue in turns),
    sigma."""
    boxes, p = sample_views(spec, seed, epoch, np.asarray(index), view, height, width)
    return {"box": boxes, "flip": p[:, P_FLIP] > 0.5, "jitter": p[:, P_JITTER] > 0.5,
            "order": p[:, P_ORDER:P_ORDER + 4].astype(np.int64),
            "factors": p[:, P_FACTOR:P_FACTOR + 4],
            "gray": p[:, P_GRAY] > 0.5, "blur": p[:, P_BLUR] > 0.5, "sigma": p[:, P_SIGMA]}
