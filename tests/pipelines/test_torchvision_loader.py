"""The reference torchvision loader: augmentation statistics against the spec (binomial bounds),
resizing and the evaluation view. The contract it shares with the other backends is checked in
test_loader_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.eval_view import eval_transform, load_image
from pipelines.sources import Split
from pipelines.spec import AugmentSpec
from pipelines.torchvision_loader import TorchvisionTwoViewLoader
from tests.pipelines.augment_stats import binomial_ok, noise_split

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0),
             std=(1.0, 1.0, 1.0))
FULL_CROP = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def coord_split(n: int, side: int) -> Split:
    """Channel 0 holds the row, channel 1 the column (side <= 256), channel 2 a constant."""
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    img = np.stack([ys, xs, np.full_like(xs, 77)], -1).astype(np.uint8)
    imgs = np.broadcast_to(img, (n, side, side, 3)).copy()
    return Split(name="train", labels=np.zeros(n, dtype=np.int64), images=imgs)


def loader(split: Split, spec: AugmentSpec, batch_size: int = 64, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("drop_last", False)
    return TorchvisionTwoViewLoader(split, spec, batch_size=batch_size, **kw)


def epoch(ld) -> list:
    return [type(b)(*(t.clone() for t in b)) for b in ld]


def all_views(ld) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of every sample of one epoch, stacked: [2N, 3, S, S], and the matching indices
    [2N]."""
    batches = epoch(ld)
    views = torch.cat([b.view1 for b in batches] + [b.view2 for b in batches])
    index = torch.cat([b.index for b in batches] * 2)
    return views, index


# --- (a)-(e) augmentation statistics ----------------------------------------------------------


def test_crop_area_and_aspect_ratio_follow_the_spec():
    side, size = 200, 32
    spec = AugmentSpec(size=size, **PLAIN)
    views, _ = all_views(loader(coord_split(200, side), spec, batch_size=100))
    px = views * 255  # mean 0, std 1: back to pixel values, i.e. source coordinates
    assert torch.all(px[:, 2] == 77)  # nothing but geometry touched the image
    rows, cols = px[:, 0], px[:, 1]
    # the resize samples pixel centres, so the output's first-to-last extent covers (S-1)/S of
    # the box
    h = (rows[:, -1, :].mean(1) - rows[:, 0, :].mean(1)) * size / (size - 1)
    w = (cols[:, :, -1].mean(1) - cols[:, :, 0].mean(1)) * size / (size - 1)
    top = rows[:, 0, :].mean(1) - 0.5 * h / size
    left = cols[:, :, 0].mean(1) - 0.5 * w / size
    area, ratio = (h * w / side**2).numpy(), (w / h).numpy()
    tol = 0.03  # integer crop sides and uint8 resampling
    lo, hi = spec.crop_area
    assert np.all(area >= lo * (1 - tol)) and np.all(area <= hi * (1 + tol)), \
        (area.min(), area.max())
    rlo, rhi = spec.crop_ratio
    assert np.all(ratio >= rlo * (1 - tol)) and np.all(ratio <= rhi * (1 + tol)), \
        (ratio.min(), ratio.max())
    assert torch.all(top >= -2) and torch.all(left >= -2)  # the box lies inside the image
    assert torch.all(top + h <= side + 2) and torch.all(left + w <= side + 2)
    # the whole range is used: small and large crops, tall and wide ones
    assert (area < 0.2).sum() >= 10 and (area > 0.8).sum() >= 10
    assert (ratio < 0.85).sum() >= 10 and (ratio > 1.2).sum() >= 10


@pytest.mark.parametrize("flip_p", [0.0, 0.3, 1.0])
def test_flip_frequency(flip_p):
    spec = AugmentSpec(size=16, **{**PLAIN, "flip_p": flip_p})
    views, _ = all_views(loader(coord_split(300, 64), spec, batch_size=150))
    cols = views[:, 1]
    flipped = (cols[:, :, -1].mean(1) < cols[:, :, 0].mean(1))  # columns decrease left to right
    assert torch.all(cols[:, :, -1].mean(1) != cols[:, :, 0].mean(1))
    assert binomial_ok(int(flipped.sum()), len(flipped), flip_p), (int(flipped.sum()), len(flipped))


def test_grayscale_frequency():
    spec = AugmentSpec(size=16, **{**PLAIN, "grayscale_p": 0.2, "flip_p": 0.5},
                       crop_area=(0.3, 1.0))
    views, _ = all_views(loader(noise_split(600, 24), spec, batch_size=200))
    gray = ((views[:, 0] == views[:, 1]).flatten(1).all(1)
            & (views[:, 1] == views[:, 2]).flatten(1).all(1))
    assert binomial_ok(int(gray.sum()), len(gray), spec.grayscale_p), int(gray.sum())


def _fired(spec: AugmentSpec, split: Split) -> torch.Tensor:
    """Per view: does it differ from the deterministic eval view (same crop, nothing random)?"""
    views, index = all_views(loader(split, spec, batch_size=150))
    ref_tf = eval_transform(spec)
    ref = torch.stack([ref_tf(load_image(split, int(i))) for i in index])
    return (views != ref).flatten(1).any(1)


def test_jitter_frequency():
    spec = AugmentSpec(size=16, **{**PLAIN, "jitter_p": 0.8}, **FULL_CROP)
    fired = _fired(spec, noise_split(300, 16))
    assert binomial_ok(int(fired.sum()), len(fired), spec.jitter_p), int(fired.sum())


def test_blur_frequency():
    # sigma >= 1: a smaller sigma can leave a uint8 image unchanged, hiding that blur ran
    spec = AugmentSpec(size=16, **{**PLAIN, "blur_p": 0.5}, blur_sigma=(1.0, 2.0), **FULL_CROP)
    fired = _fired(spec, noise_split(300, 16))
    assert binomial_ok(int(fired.sum()), len(fired), spec.blur_p), int(fired.sum())


def test_all_random_ops_off_gives_the_eval_view():
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25)},
                       **FULL_CROP)
    assert not _fired(spec, noise_split(40, 16)).any()


def test_normalisation_with_resize_matches_antialiased_bilinear():
    mean, std = (0.3, 0.5, 0.7), (0.5, 0.25, 0.4)
    split = noise_split(12, 40)
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": mean, "std": std}, **FULL_CROP)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for b in epoch(loader(split, spec, batch_size=6)):
        src = torch.from_numpy(split.images[b.index.numpy()]).permute(0, 3, 1, 2).double()
        resized = F.interpolate(src, size=(16, 16), mode="bilinear", antialias=True,
                                align_corners=False)
        want = (resized / 255 - m) / s
        for v in (b.view1, b.view2):
            err = ((v.double() - want) * s * 255).abs()  # in uint8 levels
            assert err.max() <= 1.01, err.max()  # the uint8 resize rounds


def test_grayscale_source_loads_as_three_channels():
    assert load_image(noise_split(10, 16, channels=1), 3).shape == (3, 16, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_batches_are_the_cpu_batches_on_the_device(dtype):
    """device="cuda" moves the same views (pinned memory, non-blocking copies) and nothing else."""
    split, spec = noise_split(40, 20), AugmentSpec(size=16, blur_p=0.5)
    cpu = list(loader(split, spec, batch_size=16, seed=2, num_workers=2))
    gpu = list(loader(split, spec, batch_size=16, seed=2, num_workers=2, device="cuda",
                      dtype=dtype))
    assert len(cpu) == len(gpu) == 3
    for a, b in zip(cpu, gpu, strict=True):
        assert b.view1.is_cuda and b.index.is_cuda and b.view1.dtype == dtype
        assert b.view1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.label, b.label.cpu())
        for view in ("view1", "view2"):
            torch.testing.assert_close(getattr(b, view).cpu().float(),
                                       getattr(a, view).to(dtype).float())


def test_eval_view_is_the_official_centre_crop_above_32_pixels():
    """Above 32 px: the centred 0.875 of the short side (offsets rounded up, as the official
    `_compute_crop_shape` + crop), resized bicubically; at 32 px and below: the whole short side."""
    from pipelines.eval_view import eval_resize

    ys, xs = torch.meshgrid(torch.arange(50.0), torch.arange(73.0), indexing="ij")
    # smooth: no clipping
    img = torch.stack([xs * 3.4, ys * 5, (xs + ys) * 2]).round().to(torch.uint8)
    side = round(0.875 * 50)  # 44
    top, left = (50 - side + 1) // 2, (73 - side + 1) // 2  # 3, 15 (round-half-even would give 14)
    want = F.interpolate(img[None, :, top:top + side, left:left + side].float(), size=(64, 64),
                         mode="bicubic", align_corners=False).round().clamp(0, 255)[0]
    got = eval_resize(img, 64).float()
    # torch's uint8 bicubic rounds like this float path, to a level
    assert (got - want).abs().max() <= 1
    small = eval_resize(img, 32)  # CIFAR-sized: no 0.875 crop
    assert small.shape == (3, 32, 32)
    assert torch.equal(small, tvf_center_crop(img))


def tvf_center_crop(img):
    from torchvision.transforms.v2 import functional as tvf

    return tvf.center_crop(tvf.resize(img, 32, antialias=True), [32, 32])
