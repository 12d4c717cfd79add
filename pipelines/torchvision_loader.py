"""The reference two-view loader: torchvision's functional ops on CPU workers.

It is the baseline the fast backends are measured against and their pixel oracle, so it stays a
plain, readable rendering: every random parameter comes from the one sampler
(`pipelines.augment_params.sample_views`, the same draws as DALI and FFCV), and each operation is
torchvision's own functional op on the uint8 image, or plain torch where torchvision has none
(Sobel, Gaussian noise), written out as spec.py defines them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as tnf
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipelines.augment_params import (
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
    noise_uniforms,
    sample_views,
)
from pipelines.eval_view import load_image
from pipelines.loader_base import TwoViewLoader
from pipelines.sources import Split, one_line_worker_errors
from pipelines.spec import AugmentSpec, TwoViewBatch

# torchvision's four ColorJitter adjustments, in the sampler's numbering (P_ORDER)
ADJUST = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def render_view(img: torch.Tensor, box, params, spec: AugmentSpec) -> torch.Tensor:
    """One SimCLR view of uint8 [3, H, W] in the paper's order, from the sampler's crop box
    (top, left, height, width) and packed parameters [N_P]: uint8 [3, S, S], before normalising.
    `spec` is the view's own (`AugmentSpec.for_view`)."""
    top, left, h, w = (int(v) for v in box)
    x = F.resized_crop(img, top, left, h, w, [spec.size, spec.size], antialias=True)  # bilinear
    return reference_tail(x, params, spec)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel filtering of uint8 [3, H, W] (spec.py): the gradient magnitude of the truncated luma,
    reflect-101 borders, min(255, floor(sqrt(gx^2 + gy^2) / 4)) in all three channels."""
    gray = F.rgb_to_grayscale(x, num_output_channels=1).double().unsqueeze(0)  # [1, 1, H, W]
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    kernels = torch.stack([gx, gx.T]).unsqueeze(1)  # [2, 1, 3, 3]: Gx, Gy
    g = tnf.conv2d(tnf.pad(gray, (1, 1, 1, 1), mode="reflect"), kernels)[0]  # [2, H, W]
    magnitude = g.pow(2).sum(0).sqrt().div(4.0).floor().clamp(max=255.0)
    return magnitude.to(torch.uint8).expand(3, -1, -1)


def gaussian_noise(x: torch.Tensor, sigma: float, params) -> torch.Tensor:
    """x + sigma * z of uint8 [3, H, W], rounded half to even, clipped: z by Box-Muller from the
    view's noise field (`augment_params.noise_uniforms`), element (y * W + x) * 3 + c."""
    _, h, w = x.shape
    u = torch.from_numpy(noise_uniforms(params, h * w * 3))  # [H*W*3, 2]
    z = torch.sqrt(-2.0 * torch.log(1.0 - u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
    z = z.view(h, w, 3).permute(2, 0, 1)  # [3, H, W]
    return (x.double() + sigma * z).round().clamp(0, 255).to(torch.uint8)


def reference_tail(x: torch.Tensor, params, spec: AugmentSpec) -> torch.Tensor:
    """Flip, colour jitter in the drawn order, grayscale, blur, rotation, Sobel, noise and cutout of
    uint8 [3, H, W] (spec.py): torchvision's functional ops where it has them, the oracle of
    `pipelines.render_cpu` and `pipelines.render_gpu`. `spec` is the view's own."""
    if params[P_FLIP] > 0.5:
        x = F.horizontal_flip(x)
    if params[P_JITTER] > 0.5:  # ColorJitter: the four adjustments in the drawn order
        for slot in range(4):
            op = int(params[P_ORDER + slot])
            x = ADJUST[op](x, float(params[P_FACTOR + op]))
    if params[P_GRAY] > 0.5:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params[P_BLUR] > 0.5:  # GaussianBlur with the spec's full kernel
        sigma = float(params[P_SIGMA])
        x = F.gaussian_blur(x, [spec.blur_kernel, spec.blur_kernel], [sigma, sigma])
    if params[P_ROTATE] > 0.5:  # counter-clockwise
        x = F.rotate(x, 90.0 * int(params[P_ROTATE]))
    if params[P_SOBEL] > 0.5:
        x = sobel(x)
    if params[P_NOISE] > 0.5:
        x = gaussian_noise(x, float(params[P_NOISE_STD]), params)
    if params[P_CUTOUT] > 0.5:
        top, left, side = (int(v) for v in params[P_CUTOUT_BOX:P_CUTOUT_BOX + 3])
        x = F.erase(x, top, left, side, side, torch.zeros(1, 1, 1, dtype=torch.uint8))
    return x


class TwoViewDataset(Dataset):
    """Items are keyed by (epoch, index); each view's parameters come from the one sampler."""

    def __init__(self, split: Split, spec: AugmentSpec, seed: int):
        self.split, self.seed, self.spec = split, seed, spec
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(spec.mean, spec.std)])

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img = load_image(self.split, index)
        views = []
        for view in (0, 1):
            boxes, params = sample_views(self.spec, self.seed, epoch, [index], view,
                                         img.shape[1], img.shape[2])
            views.append(self.normalize(render_view(img, boxes[0], params[0],
                                                    self.spec.for_view(view))))
        return views[0], views[1], int(self.split.labels[index]), index


class _EpochBatches:
    """Batch sampler of the keys (epoch, index) of the batches the loader's current pass reads."""

    def __init__(self, batch_size: int):
        self.batch_size, self.epoch, self.batches = batch_size, 0, range(0)
        self.indices = np.empty(0, dtype=np.int64)

    def __iter__(self):
        bs = self.batch_size
        for b in self.batches:
            yield [(self.epoch, int(i)) for i in self.indices[b * bs:(b + 1) * bs]]

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_):
    torch.set_num_threads(1)  # workers are processes already; threads would oversubscribe


class TorchvisionTwoViewLoader(TwoViewLoader):
    def __init__(self, split: Split, spec: AugmentSpec, **settings):
        super().__init__(split, spec, **settings)
        self._sampler = _EpochBatches(self.batch_size)
        workers = self.num_workers
        self._dl = DataLoader(
            TwoViewDataset(split, spec, self.seed),
            batch_sampler=self._sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(dtype=self.dtype, memory_format=torch.channels_last)

    def _epoch(self, epoch: int, indices: np.ndarray, batches: range):
        self._sampler.epoch, self._sampler.indices, self._sampler.batches = epoch, indices, batches
        for v1, v2_, label, index in one_line_worker_errors(self._dl):
            yield TwoViewBatch(self._to_device(v1), self._to_device(v2_),
                               label.to(self.device, non_blocking=True),
                               index.to(self.device, non_blocking=True))
