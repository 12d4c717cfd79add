"""The one SimCLR augmentation spec that every loader backend is built from.

Defaults follow SimCLR (Chen et al., 2020, Appendix A): random resized crop with area
(0.08, 1) and aspect (3/4, 4/3), horizontal flip p=0.5, colour jitter of strength s
(brightness, contrast, saturation 0.8s, hue 0.2s) applied with p=0.8 in random order,
grayscale p=0.2, Gaussian blur p=0.5 with sigma in [0.1, 2.0] and a kernel about 10% of
the output side, then normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentSpec:
    size: int = 224  # output side in pixels (224 ImageNet, 32 CIFAR, 28 Fashion-MNIST)
    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # s: 1.0 ImageNet, 0.5 CIFAR
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # 0 disables blur (the paper's CIFAR runs)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel side as a fraction of the output side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        checks = [
            (self.size >= 8, f"size must be >= 8, got {self.size}"),
            (0 < self.crop_area[0] <= self.crop_area[1] <= 1,
             f"crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}"),
            (0 < self.crop_ratio[0] <= self.crop_ratio[1],
             f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}"),
            (0 <= self.jitter_strength <= 1.25,
             f"jitter_strength must be in [0, 1.25] (hue 0.2s <= 0.25), "
             f"got {self.jitter_strength}"),
            (0 < self.blur_sigma[0] <= self.blur_sigma[1],
             f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0,
             "mean and std need 3 values each, std > 0"),
        ]
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            checks.append((0 <= p <= 1, f"{name} must be a probability in [0, 1], got {p}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"augmentation spec: {msg}")

    @property
    def brightness(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def contrast(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def saturation(self) -> float:
        return 0.8 * self.jitter_strength

    @property
    def hue(self) -> float:
        return 0.2 * self.jitter_strength

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side, about `blur_kernel_frac` of the output side (23 at 224)."""
        k = int(round(self.blur_kernel_frac * self.size))
        return max(3, k + 1 - k % 2)


class TwoViewBatch(NamedTuple):
    """What every backend yields: two augmented views of the same B images.

    view1, view2: [B, 3, H, W] float (normalised, channels_last on the training device)
    label: [B] int64 (-1 for unlabelled data); index: [B] int64 position in the split.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
