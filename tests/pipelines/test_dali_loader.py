"""DALI two-view loader (CPU graph): the sampler's views rendered, pipeline reuse, JPEG files; the
GPU graph against the CPU graph. The contract it shares with the other backends is checked in
test_loader_contract.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines.dali_loader import DaliTwoViewLoader  # noqa: E402
from pipelines.formats import image_size  # noqa: E402
from pipelines.spec import AugmentSpec  # noqa: E402
from tests.pipelines.augment_stats import (  # noqa: E402
    area_ratio_stats,
    binomial_ok,
    coord_split,
    drawn,
    noise_split,
    recover_boxes,
    to_uint8,
)

pytestmark = pytest.mark.timeout(120)
IDENTITY = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                grayscale_p=0.0, blur_p=0.0)


def make(split, spec, **kw):
    kw = {"batch_size": 32, "seed": 3, "num_workers": 1, "drop_last": False, **kw}
    return DaliTwoViewLoader(split, spec, **kw)


def first_views(split, spec, batch_size: int) -> torch.Tensor:
    """view1 of every sample, unshuffled, in pixel values."""
    ld = make(split, spec, batch_size=batch_size, shuffle=False)
    return torch.cat([to_uint8(b.view1, spec.mean, spec.std) for b in ld])


@pytest.mark.parametrize("blur_p", [0.0, 0.5])
def test_build_and_run_emit_no_warning(blur_p):
    """Every external-source output is consumed (DALI warns about unused ones), with or without
    blur."""
    split = noise_split(16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(make(split, AugmentSpec(size=16, blur_p=blur_p), batch_size=8))
    assert len(batches) == 2
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_crop_box_follows_params_and_spec():
    h, w, n = 48, 64, 256
    split = coord_split(n, h, w)
    spec = AugmentSpec(size=24, flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    ld = make(split, spec, batch_size=128, shuffle=False)
    wh = np.concatenate([recover_boxes(to_uint8(b.view1, spec.mean, spec.std), h, w) for b in ld])
    params = drawn(spec, 3, 0, np.arange(n), 0, np.full(n, h), np.full(n, w))
    expect = params["box"][:, [3, 2]].astype(float)  # (w, h)
    assert np.median(np.abs(wh - expect) / expect) < 0.05  # the graph crops what the host drew
    area, ratio = area_ratio_stats(expect, h, w)
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    fitted = (ratio >= 0.75 - 0.05) & (ratio <= 4 / 3 + 0.05)
    assert fitted.mean() > 0.9  # the rest are torchvision's centre-crop fallback


def test_param_distributions_match_spec():
    n = 4000
    spec = AugmentSpec(size=32, jitter_strength=0.5)
    p = drawn(spec, 0, 0, np.arange(n), 0, np.full(n, 256), np.full(n, 256))
    for key, prob in (("flip", spec.flip_p), ("jitter", spec.jitter_p), ("gray", spec.grayscale_p),
                      ("blur", spec.blur_p)):
        assert binomial_ok(int(p[key].sum()), n, prob), key
    f = p["factors"]
    for j, lim in enumerate((spec.brightness, spec.contrast, spec.saturation)):
        assert 1 - lim <= f[:, j].min() and f[:, j].max() <= 1 + lim
        assert abs(f[:, j].mean() - 1) < 4 * lim / np.sqrt(3 * n)
    assert np.abs(f[:, 3]).max() <= spec.hue
    assert spec.blur_sigma[0] <= p["sigma"].min() and p["sigma"].max() <= spec.blur_sigma[1]
    area = p["box"][:, 2] * p["box"][:, 3] / 256**2
    # rejection of boxes that do not fit lowers the mean area: compare with torchvision's sampler
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.empty(1, 256, 256)
    ref = np.array([np.prod(RandomResizedCrop.get_params(img, list(spec.crop_area),
                                                         list(spec.crop_ratio))[2:]) / 256**2
                    for _ in range(n)])
    assert abs(area.mean() - ref.mean()) < 4 * ref.std() * np.sqrt(2 / n)
    # random order: every adjustment lands in every slot a quarter of the time
    for slot in range(4):
        counts = np.bincount(p["order"][:, slot], minlength=4)
        assert all(binomial_ok(int(c), n, 0.25) for c in counts)
    # views and epochs draw independently
    q = drawn(spec, 0, 0, np.arange(n), 1, np.full(n, 256), np.full(n, 256))
    assert (p["box"] != q["box"]).any(axis=1).mean() > 0.99


def test_pixel_frequencies_flip_gray_jitter():
    n = 512
    split = noise_split(n, 16)
    idx = np.arange(n)
    base = torch.from_numpy(split.images).permute(0, 3, 1, 2).float()
    for name, kw in (("flip", dict(flip_p=0.5)), ("gray", dict(grayscale_p=0.2)),
                     ("jitter", dict(jitter_p=0.8))):
        spec = AugmentSpec(size=16, **{**IDENTITY, **kw})
        px = first_views(split, spec, 256)
        if name == "flip":
            hit = (px - base.flip(-1)).abs().amax((1, 2, 3)) < 0.01
        elif name == "gray":
            hit = (px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 0.01
        else:
            hit = (px - base).abs().amax((1, 2, 3)) > 0.5
        p = drawn(spec, 3, 0, idx, 0, np.full(n, 16), np.full(n, 16))
        assert torch.equal(hit, torch.from_numpy(p[name].astype(bool))), name
        assert binomial_ok(int(hit.sum()), n, list(kw.values())[0]), name


def test_blur_matches_torchvision_full_kernel_and_frequency():
    """Blurred samples equal torchvision's gaussian_blur with the spec's full kernel to one uint8
    level (the window cut at 4 sigma drops nothing visible); the rest are untouched; the blurred
    share obeys binomial bounds around blur_p."""
    from torchvision.transforms.v2 import functional as tvf

    from pipelines.augment_params import blur_windows

    n, side = 96, 224
    split = noise_split(n, 64)
    # 224, smooth-ish
    split.images = np.repeat(np.repeat(split.images, 4, axis=1), 4, axis=2)[:, :side, :side].copy()
    spec = AugmentSpec(size=side, **{**IDENTITY, "blur_p": 0.5})
    assert spec.blur_kernel == 23
    px = first_views(split, spec, 32)
    p = drawn(spec, 3, 0, np.arange(n), 0, np.full(n, side), np.full(n, side))
    base = torch.from_numpy(split.images).permute(0, 3, 1, 2)
    # the cut is exercised
    assert (blur_windows(p["sigma"], spec.blur_kernel) < spec.blur_kernel).any()
    worst = 0.0
    for i in range(n):
        if p["blur"][i]:
            sigma = float(p["sigma"][i])
            want = tvf.gaussian_blur(base[i], [spec.blur_kernel] * 2, [sigma] * 2).float()
            worst = max(worst, (px[i] - want).abs().max().item())
        else:
            assert (px[i] - base[i].float()).abs().max() < 0.01
    assert worst <= 1.01
    assert binomial_ok(int(p["blur"].sum()), n, spec.blur_p)


def test_jitter_on_a_flat_image_is_torchvisions_in_the_drawn_order():
    """On a flat gray image brightness moves every pixel (contrast, saturation and hue by at most
    a level): each sample equals torchvision's four ops in its drawn order, and its mean follows the
    drawn brightness factor."""
    from torchvision.transforms.v2 import functional as tvf

    n = 256
    split = noise_split(n, 16)
    split.images[:] = 100
    spec = AugmentSpec(size=16, **{**IDENTITY, "jitter_p": 1.0}, jitter_strength=0.5)
    px = first_views(split, spec, 256)
    p = drawn(spec, 3, 0, np.arange(n), 0, 16, 16)
    ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)
    img = torch.from_numpy(split.images[0]).permute(2, 0, 1)
    for i in range(n):
        x = img
        for op in p["order"][i]:
            x = ops[op](x, float(p["factors"][i, op]))
        assert (px[i] - x.float()).abs().max() <= 1.01, i
    got = px.mean((1, 2, 3)).numpy() / 100
    # truncations pull each value down by < 1 level
    assert np.abs(got - p["factors"][:, 0]).max() < 0.04


def test_random_order_changes_output():
    """Brightness before contrast differs from contrast before brightness once values clip: each
    sample follows its own drawn order (torchvision's ops in that order as the oracle)."""
    from torchvision.transforms.v2 import functional as tvf

    n = 256
    split = noise_split(n, 16)
    split.images[:, :8] = 250
    split.images[:, 8:] = 20
    spec = AugmentSpec(size=16, **{**IDENTITY, "jitter_p": 1.0}, jitter_strength=1.0)
    px = first_views(split, spec, 256)
    p = drawn(spec, 3, 0, np.arange(n), 0, 16, 16)
    img = torch.from_numpy(split.images[0]).permute(2, 0, 1)
    ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue)

    def run(i, swap):
        order = list(p["order"][i])
        if swap:  # brightness and contrast trade places
            a, b = order.index(0), order.index(1)
            order[a], order[b] = 1, 0
        x = img
        for op in order:
            x = ops[op](x, float(p["factors"][i, op]))
        return x.float()

    right = np.array([(px[i] - run(i, False)).abs().max().item() for i in range(n)])
    swapped = np.array([(px[i] - run(i, True)).abs().max().item() for i in range(n)])
    differs = np.array([(run(i, False) - run(i, True)).abs().max().item() > 6 for i in range(n)])
    assert differs.sum() > 20
    assert (right <= 1.01).all() and (swapped[differs] > 6).all()


@pytest.mark.parametrize("drop_last", [False, True])
def test_pipeline_reused_across_epochs_gives_the_fresh_pipelines_batches(drop_last):
    """An epoch run to its end leaves its pipeline to the next pass (reset, not rebuilt); the
    batches equal those of a loader built fresh for each epoch, and an epoch left midway drops
    it."""
    split = noise_split(70, 16)
    spec = AugmentSpec(size=16, blur_p=0.5)
    ld = make(split, spec, batch_size=16, drop_last=drop_last)
    runs = []
    for epoch in (0, 1, 0):
        ld.set_epoch(epoch)
        runs.append(list(ld))
        assert ld._idle is not None
    pipe = ld._idle[0]
    ld.set_epoch(2)
    runs.append(list(ld))
    assert ld._idle[0] is pipe  # reused, not rebuilt
    for epoch, got in zip((0, 1, 0, 2), runs):
        fresh = make(split, spec, batch_size=16, drop_last=drop_last)
        fresh.set_epoch(epoch)
        want = list(fresh)
        assert len(got) == len(want) == len(fresh)
        for x, y in zip(got, want):
            assert torch.equal(x.index, y.index) and torch.equal(x.view1, y.view1)
            assert torch.equal(x.view2, y.view2)
    it = iter(ld)
    next(it)
    it.close()  # left midway
    assert ld._idle is None
    assert len(list(ld)) == len(ld)


def test_jpeg_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(40, 60), (64, 48), (33, 35)]):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
        assert image_size(p.read_bytes()) == (h, w)
        files.append(str(p))
    from pipelines.sources import Split

    split = Split("train", np.arange(3, dtype=np.int64), files=files)
    b = next(iter(make(split, AugmentSpec(size=24), batch_size=4)))
    assert b.view1.shape == (3, 3, 24, 24) and torch.isfinite(b.view1).all()


def test_matches_torchvision_reference_statistics():
    tv = pytest.importorskip("pipelines.torchvision_loader")
    h, w, n = 48, 64, 256
    split = coord_split(n, h, w)
    spec = AugmentSpec(size=24, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    ref = tv.TorchvisionTwoViewLoader(split, spec, batch_size=128, seed=3,
                                      device=torch.device("cpu"), num_workers=0, shuffle=False,
                                      drop_last=False)
    stats = []
    for ld in (ref, make(split, spec, batch_size=128, shuffle=False)):
        wh = np.concatenate([recover_boxes(to_uint8(b.view1, spec.mean, spec.std), h, w)
                             for b in ld])
        stats.append(area_ratio_stats(wh, h, w))
    (a_ref, r_ref), (a_dali, r_dali) = stats
    assert abs(a_ref.mean() - a_dali.mean()) < 0.06
    assert abs(np.log(r_ref).mean() - np.log(r_dali).mean()) < 0.06


# ---- the GPU graph against the CPU graph --------------------------------------------------------

def _uint8_diff(a, b, spec) -> torch.Tensor:
    a, b = (to_uint8(x.cpu().float(), spec.mean, spec.std) for x in (a, b))
    return (a - b).abs()


def _smooth_jpegs(folder, n: int) -> list[str]:
    """Photo-like JPEGs (smooth gradients, an edge, mild noise) of assorted sizes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    files = []
    for i in range(n):
        h, w = int(rng.integers(90, 200)), int(rng.integers(90, 200))
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 / w, y * 255 / h, ((x + y) % 64) * 4], axis=-1)
        img += rng.normal(0, 6, (h, w, 3))
        img[h // 3:h // 2] = [200, 40, 90]
        path = folder / f"{i}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)
        files.append(str(path))
    return files


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["arrays", "jpeg"])
def test_gpu_graph_matches_cpu_graph_on_the_same_keys(kind, tmp_path):
    """Same (seed, epoch, index, view) keys through the GPU graph (nvJPEG "mixed" decode, GPU
    operators) and the CPU graph: the same views up to rounding (arrays) and up to the two JPEG
    decoders' differences (files)."""
    from pipelines.sources import Split

    spec = AugmentSpec(size=32, blur_p=0.5, blur_kernel_frac=0.2)
    if kind == "arrays":
        split = noise_split(96, 40)
    else:
        files = _smooth_jpegs(tmp_path, 48)
        split = Split("train", np.arange(len(files), dtype=np.int64), files=files)
    batches = {}
    for device in ("cpu", "cuda"):
        batches[device] = list(make(split, spec, batch_size=16, device=device, seed=4))
    diffs = []
    for a, b in zip(batches["cpu"], batches["cuda"], strict=True):
        assert b.view1.is_cuda and b.view1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.label, b.label.cpu())
        diffs += [_uint8_diff(a.view1, b.view1, spec), _uint8_diff(a.view2, b.view2, spec)]
    d = torch.cat([x.flatten() for x in diffs])
    stats = (f"mean {d.mean():.3f}, p99 {d.quantile(0.99):.1f}, max {d.max():.0f} uint8 levels, "
             f"{(d > 1.01).float().mean():.2%} of values off by more than one")
    if kind == "arrays":  # the same operators on both devices: rounding only
        assert d.mean() <= 0.15 and d.max() <= 3.01, stats
    else:  # nvJPEG and libjpeg-turbo may differ by a few levels (IDCT, chroma upsampling)
        assert d.mean() <= 1.5 and d.quantile(0.99) <= 8.01, stats
