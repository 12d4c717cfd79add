"""The one SimCLR augmentation spec that every loader backend is built from.

Defaults follow SimCLR (Chen et al., 2020, Appendix A): random resized crop with area
(0.08, 1) and aspect (3/4, 4/3), horizontal flip p=0.5, colour jitter of strength s
(brightness, contrast, saturation 0.8s, hue 0.2s) applied with p=0.8 in random order,
grayscale p=0.2, Gaussian blur p=0.5 with sigma in [0.1, 2.0] and a kernel about 10% of
the output side, then normalisation.

The paper's augmentation study (Sec. 3, Fig. 4-5) adds four operations, each off by default (p = 0),
so a recipe without them draws and renders exactly what it did before they existed. A view is, in
this order: crop, flip, colour jitter, grayscale, blur, then

* rotation (`rotate_p`): by 90, 180 or 270 degrees counter-clockwise, one of the three uniformly
  (the paper's "rotate {90, 180, 270}"); an exact permutation of the square output;
* Sobel filtering (`sobel_p`): the gradient magnitude of the grayscale image. Luma as grayscale
  (torchvision's rgb_to_grayscale, truncated to uint8), the 3x3 kernels Gx = [[-1, 0, 1],
  [-2, 0, 2], [-1, 0, 1]] and Gy = Gx transposed, reflect-101 borders, then
  min(255, floor(sqrt(Gx^2 + Gy^2) / 4)) in all three channels (4 is the kernels' gain on a step,
  so a 0 -> 255 edge maps to 255);
* Gaussian noise (`noise_p`): x + N(0, sigma^2) per pixel and channel, sigma uniform in
  `noise_std` (a fraction of the 0..255 range), rounded half to even and clipped to 0..255;
* cutout (`cutout_p`): a square of side round(f * size), f uniform in `cutout_size`, at a uniform
  position inside the image, filled with 0 (black, before normalisation): DeVries & Taylor's
  cutout as the paper uses it ("randomly sample and mask out a square region").

Sobel follows the colour operations (it keeps only edges), noise follows Sobel (so Sobel does not
amplify it), and cutout comes last, so a masked square carries nothing, not even noise. The paper
applies each alone, or two in sequence, to one branch; `view1` and `view2` override any setting
but `size`, `mean` and `std` for one view (the study: base = crop only, view2 = the operations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The settings one view may override (`AugmentSpec.view1`, `view2`): all but the shared output
# size and normalisation.
SHARED = ("size", "mean", "std", "view1", "view2")


@dataclass(frozen=True)
class ViewOverrides:
    """Settings of one view that differ from the spec's; None keeps the spec's value. The fields
    are AugmentSpec's, less `SHARED` (a test keeps them so)."""

    crop_area: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] | None = None
    flip_p: float | None = None
    jitter_strength: float | None = None
    jitter_p: float | None = None
    grayscale_p: float | None = None
    blur_p: float | None = None
    blur_sigma: tuple[float, float] | None = None
    blur_kernel_frac: float | None = None
    rotate_p: float | None = None
    sobel_p: float | None = None
    noise_p: float | None = None
    noise_std: tuple[float, float] | None = None
    cutout_p: float | None = None
    cutout_size: tuple[float, float] | None = None

    def items(self) -> dict:
        """The overridden settings: {name: value} of the fields that are not None."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


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
    # the paper's study (Sec. 3, Fig. 4-5); 0 = off, the default
    rotate_p: float = 0.0  # rotation by 90, 180 or 270 degrees
    sobel_p: float = 0.0  # Sobel gradient magnitude
    noise_p: float = 0.0  # additive Gaussian noise
    noise_std: tuple[float, float] = (0.0, 0.1)  # its sigma, a fraction of 255, uniform in range
    cutout_p: float = 0.0  # a black square
    cutout_size: tuple[float, float] = (0.1, 0.5)  # its side, a fraction of `size`, uniform
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # per-view overrides, e.g. {jitter_p: 0} for view 2 only (the study's asymmetric views)
    view1: ViewOverrides = field(default_factory=ViewOverrides)
    view2: ViewOverrides = field(default_factory=ViewOverrides)

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
            (0 <= self.noise_std[0] <= self.noise_std[1] <= 1,
             f"noise_std must satisfy 0 <= lo <= hi <= 1, got {self.noise_std}"),
            (0 < self.cutout_size[0] <= self.cutout_size[1] <= 1,
             f"cutout_size must satisfy 0 < lo <= hi <= 1, got {self.cutout_size}"),
        ]
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "rotate_p", "sobel_p",
                     "noise_p", "cutout_p"):
            p = getattr(self, name)
            checks.append((0 <= p <= 1, f"{name} must be a probability in [0, 1], got {p}"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"augmentation spec: {msg}")
        for name in ("view1", "view2"):
            over = getattr(self, name)
            if isinstance(over, dict):  # AugmentSpec(view2={"jitter_p": 0.0}) from Python
                unknown = sorted(set(over) - {f.name for f in dataclasses.fields(ViewOverrides)})
                if unknown:
                    raise ValueError(f"augmentation spec: {name} cannot set {', '.join(unknown)} "
                                     f"(a view overrides any setting but {', '.join(SHARED)})")
                object.__setattr__(self, name, ViewOverrides(**over))
        views = []
        for name in ("view1", "view2"):
            if not self.view1.items() and not self.view2.items():
                views.append(self)  # symmetric views: the spec itself
                continue
            try:
                views.append(dataclasses.replace(self, view1=ViewOverrides(),
                                                 view2=ViewOverrides(),
                                                 **getattr(self, name).items()))
            except ValueError as e:
                raise ValueError(f"augmentation spec: {name}."
                                 f"{str(e).removeprefix('augmentation spec: ')}") from None
        object.__setattr__(self, "_views", tuple(views))

    def for_view(self, view: int) -> AugmentSpec:
        """The spec of view 0 or 1 (`view1`, `view2`): this one with that view's overrides, none
        left (what every backend samples and renders that view with)."""
        return self._views[view]

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
