"""The reference torchvision loader: augmentation statistics against the spec (binomial bounds),
the batch contract, sharding, determinism and exact resume."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.loader import build_loader
from pipelines.sharding import shard_indices
from pipelines.sources import Split
from pipelines.spec import AugmentSpec
from pipelines.torchvision_loader import TorchvisionTwoViewLoader, eval_transform, load_image

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
FULL_CROP = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0))


@pytest.fixture(autouse=True)
def _one_thread():
    """The images are tiny: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """k successes in n Bernoulli(p) trials lie within `sigmas` standard deviations of n*p."""
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def noise_split(n: int, side: int, channels: int = 3, seed: int = 0) -> Split:
    imgs = np.random.default_rng(seed).integers(0, 256, (n, side, side, channels), dtype=np.uint8)
    return Split(name="train", labels=(np.arange(n) % 10).astype(np.int64), images=imgs)


def coord_split(n: int, side: int) -> Split:
    """Channel 0 holds the row, channel 1 the column (side <= 256), channel 2 a constant."""
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    img = np.stack([ys, xs, np.full_like(xs, 77)], -1).astype(np.uint8)
    return Split(name="train", labels=np.zeros(n, dtype=np.int64), images=np.broadcast_to(img, (n, side, side, 3)).copy())


def loader(split: Split, spec: AugmentSpec, batch_size: int = 64, **kw) -> TorchvisionTwoViewLoader:
    kw.setdefault("num_workers", 0)
    kw.setdefault("drop_last", False)
    return TorchvisionTwoViewLoader(split, spec, batch_size=batch_size, **kw)


def shut_down(ld: TorchvisionTwoViewLoader) -> None:
    """Free the DataLoader (and its persistent workers) by reference count.

    Dropping the loader does this too (see the reference-count test below); doing it
    explicitly keeps each test's workers from outliving it.
    """
    del ld._dl


def epoch(ld) -> list:
    return [type(b)(*(t.clone() for t in b)) for b in ld]


def all_views(ld) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of every sample of one epoch, stacked: [2N, 3, S, S], and the matching indices [2N]."""
    batches = epoch(ld)
    views = torch.cat([b.view1 for b in batches] + [b.view2 for b in batches])
    index = torch.cat([b.index for b in batches] * 2)
    return views, index


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b, strict=True) for x, y in zip(ba, bb, strict=True))


# --- (a)-(e) augmentation statistics ----------------------------------------------------------


def test_crop_area_and_aspect_ratio_follow_the_spec():
    side, size = 200, 32
    spec = AugmentSpec(size=size, **PLAIN)
    views, _ = all_views(loader(coord_split(200, side), spec, batch_size=100))
    px = views * 255  # mean 0, std 1: back to pixel values, i.e. source coordinates
    assert torch.all(px[:, 2] == 77)  # nothing but geometry touched the image
    rows, cols = px[:, 0], px[:, 1]
    # the resize samples pixel centres, so the output's first-to-last extent covers (S-1)/S of the box
    h = (rows[:, -1, :].mean(1) - rows[:, 0, :].mean(1)) * size / (size - 1)
    w = (cols[:, :, -1].mean(1) - cols[:, :, 0].mean(1)) * size / (size - 1)
    top = rows[:, 0, :].mean(1) - 0.5 * h / size
    left = cols[:, :, 0].mean(1) - 0.5 * w / size
    area, ratio = (h * w / side**2).numpy(), (w / h).numpy()
    tol = 0.03  # integer crop sides and uint8 resampling
    lo, hi = spec.crop_area
    assert np.all(area >= lo * (1 - tol)) and np.all(area <= hi * (1 + tol)), (area.min(), area.max())
    rlo, rhi = spec.crop_ratio
    assert np.all(ratio >= rlo * (1 - tol)) and np.all(ratio <= rhi * (1 + tol)), (ratio.min(), ratio.max())
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
    spec = AugmentSpec(size=16, **{**PLAIN, "grayscale_p": 0.2, "flip_p": 0.5}, crop_area=(0.3, 1.0))
    views, _ = all_views(loader(noise_split(600, 24), spec, batch_size=200))
    gray = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 1] == views[:, 2]).flatten(1).all(1)
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
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25)}, **FULL_CROP)
    assert not _fired(spec, noise_split(40, 16)).any()


# --- (f) the batch contract --------------------------------------------------------------------


def test_batch_contract():
    n, bs, size = 20, 8, 16
    split = noise_split(n, 24)
    spec = AugmentSpec(size=size)
    batches = epoch(build_loader("torchvision", split, spec, batch_size=bs, num_workers=0, drop_last=False))
    assert [len(b.index) for b in batches] == [8, 8, 4]
    for b in batches:
        B = len(b.index)
        for v in (b.view1, b.view2):
            assert v.shape == (B, 3, size, size) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all()
        assert b.label.dtype == torch.int64 and b.index.dtype == torch.int64
        assert b.label.shape == b.index.shape == (B,)
        assert torch.equal(b.label, torch.from_numpy(split.labels[b.index.numpy()]))


def test_normalisation_without_resize():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    split = noise_split(12, 16)
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": mean, "std": std}, **FULL_CROP)
    for b in epoch(loader(split, spec, batch_size=6)):
        imgs = split.images[b.index.numpy()].astype(np.float64).transpose(0, 3, 1, 2)  # [B, 3, H, W]
        want = (imgs / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
        for v in (b.view1, b.view2):
            np.testing.assert_allclose(v.numpy(), want, rtol=0, atol=1e-5)


def test_normalisation_with_resize_matches_antialiased_bilinear():
    mean, std = (0.3, 0.5, 0.7), (0.5, 0.25, 0.4)
    split = noise_split(12, 40)
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": mean, "std": std}, **FULL_CROP)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for b in epoch(loader(split, spec, batch_size=6)):
        src = torch.from_numpy(split.images[b.index.numpy()]).permute(0, 3, 1, 2).double()
        resized = F.interpolate(src, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        want = (resized / 255 - m) / s
        for v in (b.view1, b.view2):
            err = ((v.double() - want) * s * 255).abs()  # in uint8 levels
            assert err.max() <= 1.01, err.max()  # the uint8 resize rounds


def test_grayscale_source_expands_to_three_channels():
    split = noise_split(10, 16, channels=1)
    spec = AugmentSpec(size=16, **{**PLAIN, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.6, 0.7)}, **FULL_CROP)
    m, s = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    assert load_image(split, 3).shape == (3, 16, 16)
    for b in epoch(loader(split, spec, batch_size=5)):
        assert b.view1.shape == (5, 3, 16, 16)
        px = (b.view1 * s + m) * 255  # [B, 3, S, S] pixel values
        src = torch.from_numpy(split.images[b.index.numpy()]).permute(0, 3, 1, 2).float()  # [B, 1, S, S]
        assert torch.allclose(px, src.expand(-1, 3, -1, -1), atol=1e-3)


def test_grayscale_source_runs_through_the_full_augmentation():
    b = next(iter(loader(noise_split(8, 24, channels=1), AugmentSpec(size=16), batch_size=8)))
    assert b.view1.shape == b.view2.shape == (8, 3, 16, 16) and torch.isfinite(b.view1).all()


# --- (g) randomness and determinism ------------------------------------------------------------


def _default_split_spec():
    return noise_split(24, 24), AugmentSpec(size=16)


def test_two_views_of_an_image_differ():
    split, spec = _default_split_spec()
    for b in epoch(loader(split, spec, batch_size=8)):
        assert (b.view1 != b.view2).flatten(1).any(1).all()


def test_same_seed_reproduces_an_epoch_and_another_seed_does_not():
    split, spec = _default_split_spec()
    first = epoch(loader(split, spec, batch_size=8, seed=3))
    again = epoch(loader(split, spec, batch_size=8, seed=3))
    other = epoch(loader(split, spec, batch_size=8, seed=4))
    assert same_batches(first, again)
    assert not any(torch.equal(a.view1, b.view1) for a, b in zip(first, other, strict=True))
    # the augmentation depends on (seed, epoch, index) only, not on the global RNG
    torch.manual_seed(12345)
    assert same_batches(first, epoch(loader(split, spec, batch_size=8, seed=3)))


def test_worker_count_does_not_change_the_batches():
    split, spec = _default_split_spec()
    single = epoch(loader(split, spec, batch_size=6, seed=1, num_workers=0))
    ld = loader(split, spec, batch_size=6, seed=1, num_workers=2)
    assert same_batches(single, epoch(ld))
    ld.set_epoch(1)  # persistent workers serve the next epoch too
    ref = loader(split, spec, batch_size=6, seed=1, num_workers=0)
    ref.set_epoch(1)
    assert same_batches(epoch(ref), epoch(ld))
    shut_down(ld)


# --- (h) sharding ------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_read_their_shards(drop_last):
    n, bs, world = 21, 4, 2
    split = noise_split(n, 16)
    spec = AugmentSpec(size=16, **PLAIN, **FULL_CROP)
    seen = []
    for rank in range(world):
        ld = loader(split, spec, batch_size=bs, rank=rank, world=world, seed=7, drop_last=drop_last)
        ld.set_epoch(2)
        want = shard_indices(n, rank, world, seed=7, epoch=2, batch_size=bs, drop_last=drop_last)
        batches = epoch(ld)
        assert len(ld) == len(batches) == (len(want) // bs if drop_last else math.ceil(len(want) / bs))
        got = torch.cat([b.index for b in batches]).numpy()
        assert np.array_equal(got, want)  # same samples, same order
        sizes = [len(b.index) for b in batches]
        assert all(s == bs for s in sizes[:-1])
        assert sizes[-1] == (bs if drop_last else len(want) - bs * (len(batches) - 1))
        seen.append(got)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    if drop_last:
        assert len(seen[0]) == len(seen[1]) == 8
    else:
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))
        assert [len(s) % bs for s in seen] == [3, 2]  # both ranks end on a short batch


# --- (i) resume and epochs ---------------------------------------------------------------------


@pytest.mark.parametrize("ep,k,num_workers", [(0, 3, 0), (1, 1, 0), (1, 0, 0), (1, 3, 2)])
def test_resume_yields_exactly_the_rest_of_the_epoch(ep, k, num_workers):
    split, spec = noise_split(40, 16), AugmentSpec(size=16)
    ref = loader(split, spec, batch_size=4, seed=2, drop_last=True)
    ref.set_epoch(ep)
    full = epoch(ref)
    assert len(full) == 10

    first = loader(split, spec, batch_size=4, seed=2, drop_last=True, num_workers=num_workers)
    first.set_epoch(ep)
    it = iter(first)
    consumed = [type(b)(*(t.clone() for t in b)) for b in (next(it) for _ in range(k))]
    assert same_batches(consumed, full[:k])
    state = first.state_dict()
    assert state == {"epoch": ep, "batch": k}  # prefetching workers do not advance it
    del it
    shut_down(first)

    resumed = loader(split, spec, batch_size=4, seed=2, drop_last=True)
    resumed.load_state_dict(state)
    rest = epoch(resumed)
    assert same_batches(rest, full[k:])
    # the next epoch is whole again
    resumed.set_epoch(ep + 1)
    ref.set_epoch(ep + 1)
    assert same_batches(epoch(resumed), epoch(ref))


def test_state_after_a_whole_epoch_resumes_to_nothing():
    split, spec = noise_split(16, 16), AugmentSpec(size=16)
    ld = loader(split, spec, batch_size=4, drop_last=True)
    epoch(ld)
    state = ld.state_dict()
    assert state == {"epoch": 0, "batch": 4}
    resumed = loader(split, spec, batch_size=4, drop_last=True)
    resumed.load_state_dict(state)
    assert epoch(resumed) == []


def test_set_epoch_changes_the_order_and_the_augmentation():
    split, spec = noise_split(32, 16), AugmentSpec(size=16)
    ld = loader(split, spec, batch_size=8)
    orders, views = [], []
    for e in range(3):
        ld.set_epoch(e)
        batches = epoch(ld)
        idx = torch.cat([b.index for b in batches]).numpy()
        assert np.array_equal(idx, shard_indices(32, 0, 1, epoch=e))
        orders.append(idx)
        v = torch.cat([b.view1 for b in batches])
        views.append(v[np.argsort(idx)])  # sorted by sample index
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not torch.equal(views[0], views[1])  # fresh augmentations every epoch
    ld.set_epoch(0)
    assert np.array_equal(torch.cat([b.index for b in ld]).numpy(), orders[0])


def test_build_loader_rejects_unknown_backend():
    split, spec = noise_split(8, 16), AugmentSpec(size=16)
    with pytest.raises(ValueError):
        build_loader("pillow", split, spec, batch_size=4)


def test_a_dropped_loader_is_freed_by_reference_count():
    ld = loader(noise_split(8, 16), AugmentSpec(size=16), batch_size=4)
    epoch(ld)
    ref = weakref.ref(ld)
    gc.disable()
    try:
        del ld
        assert ref() is None
    finally:
        gc.enable()
        gc.collect()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_batches_are_the_cpu_batches_on_the_device(dtype):
    """device="cuda" moves the same views (pinned memory, non-blocking copies) and nothing else."""
    split, spec = noise_split(40, 20), AugmentSpec(size=16, blur_p=0.5)
    cpu = list(loader(split, spec, batch_size=16, seed=2, num_workers=2))
    gpu = list(loader(split, spec, batch_size=16, seed=2, num_workers=2, device="cuda", dtype=dtype))
    assert len(cpu) == len(gpu) == 3
    for a, b in zip(cpu, gpu, strict=True):
        assert b.view1.is_cuda and b.index.is_cuda and b.view1.dtype == dtype
        assert b.view1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.label, b.label.cpu())
        for view in ("view1", "view2"):
            torch.testing.assert_close(getattr(b, view).cpu().float(), getattr(a, view).to(dtype).float())


def test_eval_view_is_the_official_centre_crop_above_32_pixels():
    """Above 32 px: the centred 0.875 of the short side (offsets rounded up, as the official
    `_compute_crop_shape` + crop), resized bicubically; at 32 px and below: the whole short side."""
    from pipelines.torchvision_loader import eval_resize

    ys, xs = torch.meshgrid(torch.arange(50.0), torch.arange(73.0), indexing="ij")
    img = torch.stack([xs * 3.4, ys * 5, (xs + ys) * 2]).round().to(torch.uint8)  # smooth: no clipping
    side = round(0.875 * 50)  # 44
    top, left = (50 - side + 1) // 2, (73 - side + 1) // 2  # 3, 15 (round-half-even would give 14)
    want = F.interpolate(img[None, :, top:top + side, left:left + side].float(), size=(64, 64), mode="bicubic",
                         align_corners=False).round().clamp(0, 255)[0]
    got = eval_resize(img, 64).float()
    assert (got - want).abs().max() <= 1  # torch's uint8 bicubic rounds like this float path, to a level
    small = eval_resize(img, 32)  # CIFAR-sized: no 0.875 crop
    assert small.shape == (3, 32, 32)
    assert torch.equal(small, tvf_center_crop(img))


def tvf_center_crop(img):
    from torchvision.transforms.v2 import functional as tvf

    return tvf.center_crop(tvf.resize(img, 32, antialias=True), [32, 32])
