"""The evaluation view: the deterministic, un-augmented view of an image that every evaluation
sees (kNN monitor, linear evaluation, fine-tuning accuracy, embeddings, export's record).

    load_image(split, index)   uint8 [3, H, W] of a dataset sample (also the reference loader's)
    eval_resize(img, size)     the centre crop and resize, by `eval_resize_steps(size)`
    eval_transform(spec)       eval_resize, then scale to [0, 1] and normalise
    describe_eval_view(spec)   eval_transform(spec) in words, written from its steps
    FolderViews(files, spec, skip_bad)
                               the evaluation views of image files (a folder, not a dataset)

It depends on no loader backend, so evaluating a model trained with any of them loads none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipelines.formats import FormatError, decode_rgb
from pipelines.sources import DatasetError, Split, show_path
from pipelines.spec import AugmentSpec

# The official evaluation view crops the central 87.5% of the short side (above 32 px, i.e. not
# for CIFAR-sized images) and resizes it bicubically (google-research/simclr data_util).
EVAL_CROP_PROPORTION = 0.875
FULL_SIDE_MAX = 32  # at this size and below the whole short side is kept
# What `load_image` (dataset samples) and `decode_rgb` (image files) hand to the view: a
# converted dataset stores EXIF-rotated images as upright PNGs (pipelines.formats.decode_rgb).
DECODED = "decode to 8-bit RGB (grayscale repeated to 3 channels, EXIF orientation applied)"
ADVERBS = {v2.InterpolationMode.BICUBIC: "bicubically", v2.InterpolationMode.BILINEAR: "bilinearly"}


@dataclass(frozen=True)
class ResizeSteps:
    """How `eval_resize` makes its size x size view: crop the centred square of
    `crop_proportion` of the short side, then resize it (`crop_first`); or resize the short side,
    then crop the centred square."""

    size: int
    crop_first: bool
    crop_proportion: float
    interpolation: v2.InterpolationMode
    antialias: bool

    def words(self) -> str:
        mode = self.interpolation
        how = (f"{ADVERBS.get(mode, f'with {mode.value} interpolation')} "
               f"({'antialiased' if self.antialias else 'no antialiasing'})")
        if self.crop_first:
            return (f"crop the centred square of {self.crop_proportion} of the short side "
                    f"(offsets rounded up), resize it {how} to {self.size}x{self.size}")
        return (f"resize the short side {how} to {self.size}, crop the centred "
                f"{self.size}x{self.size}")


def eval_resize_steps(size: int) -> ResizeSteps:
    """Above FULL_SIDE_MAX, as the official evaluation: a centred square of EVAL_CROP_PROPORTION
    of the short side, resized bicubically without antialiasing. At FULL_SIDE_MAX and below, the
    whole short side, resized bilinearly (antialiased), then centre-cropped."""
    if size > FULL_SIDE_MAX:
        return ResizeSteps(size, True, EVAL_CROP_PROPORTION, v2.InterpolationMode.BICUBIC, False)
    return ResizeSteps(size, False, 1.0, v2.InterpolationMode.BILINEAR, True)


def eval_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """The deterministic evaluation view of uint8 [..., 3, H, W] at `size` x `size`, by
    `eval_resize_steps(size)` (offsets of the first crop rounded up)."""
    steps = eval_resize_steps(size)
    h, w = img.shape[-2:]
    if steps.crop_first:
        side = int(np.rint(steps.crop_proportion * min(h, w)))
        x = F.crop(img, (h - side + 1) // 2, (w - side + 1) // 2, side, side)
        return F.resize(x, [size, size], interpolation=steps.interpolation,
                        antialias=steps.antialias)
    x = F.resize(img, size, interpolation=steps.interpolation, antialias=steps.antialias)
    return F.center_crop(x, [size, size])


class _EvalResize(torch.nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eval_resize(x, self.size)


def eval_transform(spec: AugmentSpec) -> v2.Compose:
    """Deterministic view for evaluation: `eval_resize`, then normalise."""
    return v2.Compose([
        _EvalResize(spec.size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])


def describe_eval_view(spec: AugmentSpec) -> str:
    """The evaluation view in words: the decoding, then each step of `eval_transform(spec)`, read
    from the transform itself (a step without words here is an error, not a silent omission)."""
    words = [DECODED]
    for step in eval_transform(spec).transforms:
        if isinstance(step, _EvalResize):
            words.append(eval_resize_steps(step.size).words())
        elif isinstance(step, v2.ToDtype) and step.scale:
            words.append("scale to [0, 1]")
        elif isinstance(step, v2.Normalize):
            words.append("subtract mean and divide by std per channel")
        else:
            raise TypeError(f"no words for the evaluation step {step!r}")
    return ", ".join(words)


def load_image(split: Split, index: int) -> torch.Tensor:
    """uint8 [3, H, W] for sample `index` of the split (grayscale expanded to 3 channels)."""
    if split.images is not None:
        img = torch.from_numpy(np.array(split.images[index])).permute(2, 0, 1)  # [C, H, W]
        return img.expand(3, -1, -1) if img.shape[0] == 1 else img
    data = split.file_bytes(index)  # DatasetError naming the file if it is gone or changed
    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = decode_image(raw, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"cannot decode image '{show_path(split.files[index])}' "
                           f"({' '.join(str(e).split())}): re-run tools.convert") from None
    if img.dtype != torch.uint8:  # 16-bit PNG: convert stores these as 8-bit PNGs, but be safe
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def decode_view(path: Path, transform, fix: str = "remove it or pass --skip-bad") -> torch.Tensor:
    """The evaluation view of one image file (`transform`: `eval_transform`), or a one-line
    DatasetError naming it that ends with `fix`."""
    try:
        img = decode_rgb(path)
    except FormatError as e:
        raise DatasetError(f"{e.problem}: {fix}") from None
    img = np.require(img, requirements="W")  # PIL's arrays are read-only; torch wants writable
    return transform(torch.from_numpy(img).permute(2, 0, 1))  # uint8 [3, H, W]


class FolderViews(Dataset):
    """(view, decoded) of each image file; with skip_bad a corrupt file is (zeros, False)."""

    def __init__(self, files: list[Path], spec: AugmentSpec, skip_bad: bool):
        self.files, self.spec, self.skip_bad = files, spec, skip_bad
        self.transform = eval_transform(spec)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return decode_view(self.files[i], self.transform), True
        except DatasetError:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.spec.size, self.spec.size), False
