"""Pixel fidelity: every renderer of a view against torchvision's functional ops, one operation at a
time and the whole chain, and every backend's views against the torchvision reference loader for
the same (seed, epoch, index, view) keys.

Bounds are in uint8 levels. An operation alone must match torchvision to float rounding (`EXACT`:
mean <= 0.02, no value off by more than one level); `wrong operators` shows that bound failing on
plausible mistakes (DALI's YIQ hue, rounding instead of truncating, another luma, another sigma).
Whole views also carry the backends' own decoders and resizers, measured and bounded separately.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as tvf

from pipelines import render_cpu, render_gpu
from pipelines.augment_params import (
    DRAW_CROP,
    N_P,
    P_BLUR,
    P_CUTOUT,
    P_CUTOUT_BOX,
    P_FACTOR,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    P_NOISE,
    P_NOISE_STD,
    P_NOISE_STREAM,
    P_ORDER,
    P_ROTATE,
    P_SIGMA,
    P_SOBEL,
    P_WINDOW,
    SALT_VIEW,
    blur_window,
    crop_boxes,
    sample_views,
    spec_constants,
    view_key,
)
from pipelines.sources import Split, beton_file
from pipelines.spec import AugmentSpec
from pipelines.torchvision_loader import (
    ADJUST,
    TorchvisionTwoViewLoader,
    gaussian_noise,
    reference_tail,
    render_view,
    sobel,
)
from tests.marks import backends
from tests.pipelines.augment_stats import to_uint8

# (mean, max) |difference| in uint8 levels for one operation against torchvision
EXACT = (0.02, 1.0)


def assert_close_levels(got: torch.Tensor, want: torch.Tensor, mean: float, worst: float,
                        what: str = ""):
    d = (got.float() - want.float()).abs()
    stats = f"{what}: mean {d.mean():.4f}, max {d.max():.0f} levels"
    assert d.mean() <= mean and d.max() <= worst + 1e-6, stats


def photo_like(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, h, w, 3]: gradients, a saturated band, a gray patch and mild noise, so every colour
    operation has flat, gray, saturated and textured pixels to act on."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.3, 1.2, 3)
        img = np.stack([xs * 255 / w * a, ys * 255 / h * b, (xs + ys) * 128 / (h + w) * c + 60], -1)
        img += rng.normal(0, 8, img.shape)
        y0 = int(rng.integers(0, h // 2))
        img[y0:y0 + h // 6] = rng.uniform(0, 255, 3)  # a band of one saturated colour
        img[: h // 5, : w // 5] = rng.integers(0, 256)  # a gray patch: hue and saturation leave it
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _imagenet_sample() -> Path:
    from tools.benchmark import default_images

    return default_images()


def real_photos(n: int = 16, size: tuple[int, int] = (112, 96)) -> np.ndarray | None:
    files = sorted(p for p in _imagenet_sample().glob("*")
                   if p.suffix.lower() in (".jpeg", ".jpg"))[:n]
    if not files:
        return None
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size)) for f in files])


@pytest.fixture(scope="module", params=["synthetic", "imagenet"])
def images(request) -> np.ndarray:
    if request.param == "synthetic":
        return photo_like(16, 80, 96)
    real = real_photos()
    if real is None:
        pytest.skip(f"no ImageNet sample JPEGs in '{_imagenet_sample()}' "
                    "(set SIMCLR_IMAGENET_SAMPLE)")
    return real


# ---- one operation at a time ---------------------------------------------------------------------

# the study's operations alone: a fixed noise stream (its two 32-bit halves) and cutout position
NOISE_STREAM = (0x9E3779B9, 0x7F4A7C15)
CUTOUT_AT = (9, 4)  # top, left


def _params(op: str, factor: float, n: int) -> np.ndarray:
    """Packed parameters that apply `op` alone with `factor` (sigma for blur and noise, quarter
    turns for rotate, the side for cutout)."""
    p = np.zeros((n, N_P))
    p[:, P_ORDER:P_ORDER + 4] = [0, 1, 2, 3]
    p[:, P_FACTOR:P_FACTOR + 3] = 1.0  # identity brightness, contrast, saturation; hue 0
    p[:, P_NOISE_STREAM:P_NOISE_STREAM + 2] = NOISE_STREAM
    if op == "flip":
        p[:, P_FLIP] = 1
    elif op == "grayscale":
        p[:, P_GRAY] = 1
    elif op == "blur":
        p[:, P_BLUR], p[:, P_SIGMA], p[:, P_WINDOW] = 1, factor, blur_window(factor, 23)
    elif op == "rotate":
        p[:, P_ROTATE] = factor
    elif op == "sobel":
        p[:, P_SOBEL] = 1
    elif op == "noise":
        p[:, P_NOISE], p[:, P_NOISE_STD] = 1, factor
    elif op == "cutout":
        p[:, P_CUTOUT] = 1
        p[:, P_CUTOUT_BOX:P_CUTOUT_BOX + 3] = (*CUTOUT_AT, factor)
    else:
        j = ("brightness", "contrast", "saturation", "hue").index(op)
        p[:, P_JITTER] = 1
        p[:, P_FACTOR + j] = factor
    return p


def _torchvision_op(op: str, factor: float):
    if op == "flip":
        return tvf.horizontal_flip
    if op == "grayscale":
        return lambda x: tvf.rgb_to_grayscale(x, num_output_channels=3)
    if op == "blur":
        k = blur_window(factor, 23)
        return lambda x: tvf.gaussian_blur(x, [k, k], [factor, factor])
    if op == "rotate":
        return lambda x: tvf.rotate(x, 90.0 * factor)
    if op == "sobel":
        return sobel
    if op == "noise":
        return lambda x: gaussian_noise(x, factor, _params("noise", factor, 1)[0])
    if op == "cutout":
        side = int(factor)
        return lambda x: tvf.erase(x, *CUTOUT_AT, side, side, torch.zeros(1, 1, 1, dtype=x.dtype))
    adjust = ADJUST[("brightness", "contrast", "saturation", "hue").index(op)]
    return lambda x: adjust(x, factor)


def render_numba(images: np.ndarray, params: np.ndarray) -> torch.Tensor:
    out = images.copy()
    render_cpu.render_batch(out, params)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def render_torch(images: np.ndarray, params: np.ndarray) -> torch.Tensor:
    return render_gpu.render_batch(torch.from_numpy(images), params)


RENDERERS = {"numba": render_numba, "torch": render_torch}
OPS = [("flip", 0.0), ("brightness", 0.6), ("brightness", 1.37),
       ("contrast", 0.55), ("contrast", 1.42),
       ("saturation", 0.0), ("saturation", 0.61), ("saturation", 1.5),
       ("hue", -0.2), ("hue", 0.047), ("hue", 0.5),
       ("grayscale", 0.0), ("blur", 0.4), ("blur", 1.3), ("blur", 2.0),
       ("rotate", 1), ("rotate", 2), ("rotate", 3), ("sobel", 0.0), ("noise", 3.0),
       ("noise", 25.5), ("cutout", 1), ("cutout", 20)]
STUDY = ("rotate", "sobel", "noise", "cutout")


def square(images: np.ndarray) -> np.ndarray:
    """The top-left square of each image: views are square, and rotation keeps them so."""
    m = min(images.shape[1:3])
    return np.ascontiguousarray(images[:, :m, :m])


@pytest.mark.parametrize("renderer", list(RENDERERS))
@pytest.mark.parametrize("op,factor", OPS)
def test_each_operation_is_torchvisions(op, factor, renderer, images):
    if op in STUDY:
        images = square(images)
    want = torch.stack([_torchvision_op(op, factor)(torch.from_numpy(im).permute(2, 0, 1))
                        for im in images])
    got = RENDERERS[renderer](images, _params(op, factor, len(images)))
    assert_close_levels(got, want, *EXACT, what=f"{renderer} {op}({factor})")
    if op != "flip" and not (op == "saturation" and factor == 0.0):
        # the op acted
        assert (want.float() != torch.from_numpy(images).permute(0, 3, 1, 2).float()).any()


def _yiq_hue(x: torch.Tensor, turns: float) -> torch.Tensor:
    """A hue 'shift' as a rotation of the chroma plane in YIQ
    (what DALI's color_twist and hsv do)."""
    m = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                     dtype=torch.float64)
    a = 2 * np.pi * turns
    rot = torch.tensor([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]],
                       dtype=torch.float64)
    t = torch.linalg.inv(m) @ rot @ m
    y = torch.einsum("ij,jhw->ihw", t, x.double())
    return y.round().clamp(0, 255).to(torch.uint8)


WRONG = {
    "hue as a YIQ rotation": ("hue", 0.1, lambda x: _yiq_hue(x, 0.1)),
    "brightness rounded, not truncated":
        ("brightness", 1.3, lambda x: (x.double() * 1.3).round().clamp(0, 255)),
    "grayscale as the channel mean":
        ("grayscale", 0.0, lambda x: x.double().mean(0, keepdim=True).floor().expand(3, -1, -1)),
    "contrast about mid-gray":
        ("contrast", 1.4, lambda x: ((x.double() - 127.5) * 1.4 + 127.5).clamp(0, 255).floor()),
    "blur with 1.2x the sigma": ("blur", 1.0, lambda x: tvf.gaussian_blur(x, [9, 9], [1.2, 1.2])),
    "rotation clockwise": ("rotate", 1, lambda x: torch.rot90(x, -1, dims=(1, 2))),
    "Sobel without the square root (|gx| + |gy|)": ("sobel", 0.0, lambda x: _sobel_l1(x)),
    "noise with 1.2x the sigma":
        ("noise", 10.0, lambda x: gaussian_noise(x, 12.0, _params("noise", 10.0, 1)[0])),
    "cutout one pixel lower": ("cutout", 20, lambda x: tvf.erase(
        x, CUTOUT_AT[0] + 1, CUTOUT_AT[1], 20, 20, torch.zeros(1, 1, 1, dtype=x.dtype))),
}


def _sobel_l1(x: torch.Tensor) -> torch.Tensor:
    """The Sobel magnitude as |gx| + |gy|, the same scaling and clipping."""
    gray = tvf.rgb_to_grayscale(x).double().unsqueeze(0)
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    g = torch.nn.functional.conv2d(torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="reflect"),
                                   torch.stack([gx, gx.T]).unsqueeze(1))[0]
    return g.abs().sum(0).div(4).floor().clamp(max=255).expand(3, -1, -1)


@pytest.mark.parametrize("name", list(WRONG))
def test_the_bound_rejects_wrong_operators(name, images):
    """The per-operation bound is tight enough to fail on each of these plausible mistakes."""
    op, factor, wrong = WRONG[name]
    if op in STUDY:
        images = square(images)
    want = torch.stack([_torchvision_op(op, factor)(torch.from_numpy(im).permute(2, 0, 1))
                        for im in images])
    got = torch.stack([wrong(torch.from_numpy(im).permute(2, 0, 1)) for im in images])
    with pytest.raises(AssertionError):
        assert_close_levels(got, want, *EXACT, what=name)


def test_dalis_own_hue_operator_fails_the_bound(images):
    """DALI's color_twist hue, which the DALI graph used before it rendered with our kernel."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True)
        return fn.color_twist(x, hue=0.1 * 360.0, dtype=types.UINT8)

    p = pipe()
    p.build()
    got = torch.from_numpy(np.array(p.run()[0].as_tensor())).permute(0, 3, 1, 2)
    want = torch.stack([tvf.adjust_hue(torch.from_numpy(im).permute(2, 0, 1), 0.1)
                        for im in images])
    with pytest.raises(AssertionError):
        assert_close_levels(got, want, *EXACT, what="DALI color_twist hue")


# ---- the whole tail, with drawn parameters -------------------------------------------------------

@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_whole_tail_is_torchvisions_chain(renderer, images):
    """Flip, jitter in the drawn order, grayscale and blur as drawn by the sampler, against
    torchvision's ops applied in that order (the blur with the spec's full kernel)."""
    spec = AugmentSpec(size=images.shape[1], jitter_strength=1.0, blur_p=0.5, grayscale_p=0.3)
    n = len(images)
    got, want = [], []
    for epoch in range(4):
        _, params = sample_views(spec, 5, epoch, np.arange(n), 0, images.shape[1], images.shape[2])
        got.append(RENDERERS[renderer](images, params))
        for i in range(n):
            want.append(reference_tail(torch.from_numpy(images[i]).permute(2, 0, 1),
                                       params[i], spec))
    got, want = torch.cat(got), torch.stack(want)
    assert_close_levels(got, want, 0.02, 1.0, what=f"{renderer} chain")


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_whole_tail_with_the_study_operations_is_the_references_chain(renderer, images):
    """Every operation at once as drawn (rotation, Sobel, noise and cutout after the colour tail),
    against the reference's chain."""
    images = square(images)
    side = images.shape[1]
    spec = AugmentSpec(size=side, blur_p=0.5, grayscale_p=0.3, rotate_p=0.5, sobel_p=0.3,
                       noise_p=0.5, cutout_p=0.5)
    n = len(images)
    got, want = [], []
    for epoch in range(3):
        _, params = sample_views(spec, 5, epoch, np.arange(n), 1, side, side)
        got.append(RENDERERS[renderer](images, params))
        want += [reference_tail(torch.from_numpy(images[i]).permute(2, 0, 1), params[i], spec)
                 for i in range(n)]
    got, want = torch.cat(got), torch.stack(want)
    assert_close_levels(got, want, *EXACT, what=f"{renderer} chain with the study's operations")


@pytest.mark.parametrize("study", [False, True])
def test_ffcv_compiled_tail_draws_and_renders_what_the_sampler_drew(study):
    """FFCV's operation draws each sample's parameters inside numba: the same as `sample_views`,
    so its output is the numba renderer's on the sampler's parameters, bit for bit."""
    pytest.importorskip("ffcv")
    spec = AugmentSpec(size=48, blur_p=0.5, **(dict(rotate_p=0.5, sobel_p=0.3, noise_p=0.5,
                                                    cutout_p=0.5) if study else {}))
    images = photo_like(40, 48, 48, seed=3)
    idx = np.arange(40, dtype=np.int64) * 3 + 1
    out = images.copy()
    render_cpu.tail_batch(out, idx, view_key(9, 2, 1), *spec_constants(spec)[4:])
    _, params = sample_views(spec, 9, 2, idx, 1, 48, 48)
    assert torch.equal(torch.from_numpy(out).permute(0, 3, 1, 2), render_numba(images, params))
    # and the decoder's crop box is the sampler's
    boxes = crop_boxes(view_key(9, 2, 1), idx, 300, 200, SALT_VIEW, DRAW_CROP,
                       spec.crop_area, spec.crop_ratio)
    assert np.array_equal(boxes, sample_views(spec, 9, 2, idx, 1, 300, 200)[0])


# ---- every backend against the torchvision reference loader --------------------------------------

def _batches(backend: str, split: Split, spec: AugmentSpec, seed: int = 7) -> list:
    from pipelines.loader import build_loader

    if backend == "ffcv":
        from pipelines.ffcv_writer import write_beton

        write_beton(split, beton_file(split.root, split.name))
    ld = build_loader(backend, split, spec, batch_size=32, seed=seed, num_workers=2, shuffle=True,
                      drop_last=False)
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        yield from ld


def _compare(backend: str, split: Split, spec: AugmentSpec):
    """uint8-level differences of every view against the torchvision reference loader."""
    ref = TorchvisionTwoViewLoader(split, spec, batch_size=32, seed=7, num_workers=0, shuffle=True,
                                   drop_last=False)
    want = []
    for epoch in (0, 1):
        ref.set_epoch(epoch)
        want += list(ref)
    diffs = []
    for a, b in zip(want, _batches(backend, split, spec), strict=True):
        assert torch.equal(a.index, b.index.cpu())
        for view in ("view1", "view2"):
            diffs.append((to_uint8(getattr(a, view), spec.mean, spec.std) -
                          to_uint8(getattr(b, view), spec.mean, spec.std)).abs().flatten())
    return torch.cat(diffs)


def _stats(d: torch.Tensor) -> str:
    return f"mean {d.mean():.3f}, p99 {d.quantile(0.99):.1f}, max {d.max():.0f} levels"


IDENTITY_CROP = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0))
# Each backend's own resampling (DALI: its bilinear antialiased resize; FFCV: OpenCV's) against
# torchvision's, on the crop alone; measured on these images, bounds set about 2x above.
CROP_TOLERANCE = {"dali": (0.5, 4.0), "ffcv": (2.0, 12.0)}


@pytest.mark.parametrize("backend", backends(["dali", "ffcv"]))
@pytest.mark.parametrize("op", ["flip", "jitter", "grayscale", "blur"])
def test_backend_renders_each_operation_as_the_reference(backend, op, tmp_path):
    """Identity crop, one operation always on: a backend's view is the reference loader's."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    off = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    on = {"flip": dict(flip_p=1.0), "jitter": dict(jitter_p=1.0),
          "grayscale": dict(grayscale_p=1.0), "blur": dict(blur_p=1.0)}[op]
    spec = AugmentSpec(size=48, jitter_strength=1.0, **IDENTITY_CROP, **{**off, **on})
    split = Split("train", np.arange(64) % 10, images=photo_like(64, 48, 48, seed=4), root=tmp_path)
    d = _compare(backend, split, spec)
    # views: float round trip
    assert d.mean() <= 0.02 and d.max() <= 1.01, f"{backend} {op}: {_stats(d)}"


@pytest.mark.parametrize("backend", backends(["dali", "ffcv"]))
def test_backend_renders_the_study_operations_as_the_reference_on_real_images(backend, tmp_path):
    """Rotation, Sobel, noise and cutout (each at p = 0.5, so alone and combined) on ImageNet
    photos, identity crop: a backend's views are the reference loader's for the same keys."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    images = real_photos(64, size=(48, 48))
    if images is None:
        images = photo_like(64, 48, 48, seed=4)
    spec = AugmentSpec(size=48, **IDENTITY_CROP, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                       blur_p=0.0, rotate_p=0.5, sobel_p=0.5, noise_p=0.5, cutout_p=0.5)
    for col in (P_ROTATE, P_SOBEL, P_NOISE, P_CUTOUT):  # each operation acts on some views
        assert sample_views(spec, 7, 0, np.arange(64), 1, 48, 48)[1][:, col].sum() >= 16
    d = _compare(backend, Split("train", np.arange(64) % 10, images=images, root=tmp_path), spec)
    assert d.mean() <= 0.02 and d.max() <= 1.01, f"{backend} study operations: {_stats(d)}"


# The study's protocol (Sec. 3): crop alone on one branch, the targeted operations on the other;
# and view1's overrides too (a flip).
ASYMMETRIC = dict(size=32, **IDENTITY_CROP, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
VIEW1 = dict(flip_p=1.0)
VIEW2 = dict(jitter_p=1.0, rotate_p=1.0, cutout_p=1.0)


@pytest.mark.parametrize("backend,settings", [
    pytest.param("torchvision", {}, id="torchvision"), pytest.param("dali", {}, id="dali"),
    *[pytest.param("ffcv", kw, marks=backends(["ffcv"])[0].marks, id=f"ffcv-{name}")
      for name, kw in (("cpu", {}), ("torch-renderer", {"colour_on_device": True}))]])
def test_each_view_is_rendered_with_its_own_overrides(backend, settings, tmp_path):
    """With view1/view2 overrides, view 1 is the reference rendered with the base spec plus view1's
    settings and view 2 with view2's, in every backend (FFCV also through the torch renderer)."""
    pytest.importorskip({"torchvision": "torchvision", "dali": "nvidia.dali",
                         "ffcv": "ffcv"}[backend])
    from pipelines.loader import build_loader

    spec = AugmentSpec(**ASYMMETRIC, view1=VIEW1, view2=VIEW2)
    views = (AugmentSpec(**{**ASYMMETRIC, **VIEW1}), AugmentSpec(**{**ASYMMETRIC, **VIEW2}))
    images = photo_like(48, 32, 32, seed=5)
    split = Split("train", np.arange(48) % 10, images=images, root=tmp_path)
    if backend == "ffcv":
        from pipelines.ffcv_writer import write_beton

        write_beton(split, beton_file(split.root, split.name))
    ld = build_loader(backend, split, spec, batch_size=16, seed=7, num_workers=1, shuffle=True,
                      drop_last=False, **settings)
    ld.set_epoch(1)
    n = 0
    for batch in ld:
        idx = batch.index.cpu().numpy()
        for v, name in enumerate(("view1", "view2")):
            boxes, params = sample_views(views[v], 7, 1, idx, v, 32, 32)
            want = torch.stack([render_view(torch.from_numpy(images[i]).permute(2, 0, 1), boxes[j],
                                            params[j], views[v]) for j, i in enumerate(idx)])
            got = to_uint8(getattr(batch, name), spec.mean, spec.std)
            d = (got - want.float()).abs()
            assert d.mean() <= 0.02 and d.max() <= 1.01, f"{backend} {name}: {_stats(d)}"
        n += len(idx)
    assert n == 48


@pytest.mark.parametrize("backend", backends(["dali", "ffcv"]))
def test_backend_whole_views_match_the_reference_on_arrays(backend, tmp_path):
    """Real crops and every operation at the spec's rates: the same views up to the backend's
    resampling (its crop-only difference, measured in the same test, with a margin for the colour
    operations that follow it)."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    images = photo_like(64, 72, 88, seed=6)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    crop = _compare(backend, Split("train", np.arange(64) % 10, images=images, root=tmp_path / "a"),
                    AugmentSpec(size=40, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0))
    mean, p99 = CROP_TOLERANCE[backend]
    assert crop.mean() <= mean and crop.quantile(0.99) <= p99, (
        f"{backend} crop alone: {_stats(crop)}")
    full = _compare(backend, Split("train", np.arange(64) % 10, images=images, root=tmp_path / "b"),
                    AugmentSpec(size=40, blur_p=0.5, blur_kernel_frac=0.2))
    assert full.mean() <= 1.5 * mean and full.quantile(0.99) <= 1.5 * p99, (
        f"{backend} whole view: {_stats(full)}")


# On the same JPEG files: DALI decodes them itself; FFCV decodes its own re-encoding (quality 90)
# and resizes with OpenCV. Measured on 64 ImageNet JPEGs at 64 px: DALI mean 0.16 / p99 2 levels,
# FFCV mean 2.6 / p99 14 (crop alone); bounds about 1.5x above.
JPEG_TOLERANCE = {"dali": (0.75, 6.0), "ffcv": (4.0, 21.0)}


@pytest.mark.parametrize("backend", backends(["dali", "ffcv"]))
def test_whole_views_match_the_reference_on_real_jpegs(backend, tmp_path):
    """The same JPEG files through a backend and through torchvision (libjpeg-turbo via
    torchvision.io): crop, flip, jitter, grayscale and blur as drawn, within decode/resize
    tolerance."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    real = sorted(p for p in _imagenet_sample().glob("*")
                  if p.suffix.lower() in (".jpeg", ".jpg"))[:64]
    if not real:
        files = []
        from PIL import Image

        for i, im in enumerate(photo_like(48, 120, 160, seed=8)):
            Image.fromarray(im).save(tmp_path / f"{i}.jpg", quality=92)
            files.append(str(tmp_path / f"{i}.jpg"))
    else:
        files = [str(p) for p in real]
    split = Split("train", np.zeros(len(files), dtype=np.int64), files=files, root=tmp_path)
    d = _compare(backend, split, AugmentSpec(size=64))
    mean, p99 = JPEG_TOLERANCE[backend]
    assert d.mean() <= mean and d.quantile(0.99) <= p99, f"{backend} JPEG views: {_stats(d)}"


@pytest.mark.gpu
def test_gpu_renderer_on_cuda_matches_cpu_and_never_waits_for_the_device():
    """On a GPU the torch renderer equals its CPU run (to a level, where CUDA fuses differently) and
    enqueues its work without one host synchronisation (the training step before it keeps
    running)."""
    spec = AugmentSpec(size=64, jitter_strength=1.0, blur_p=0.5, grayscale_p=0.3)
    images = photo_like(48, 64, 64, seed=9)
    _, params = sample_views(spec, 2, 0, np.arange(48), 0, 64, 64)
    want = render_torch(images, params)
    x = torch.from_numpy(images).cuda()
    render_gpu.render_batch(x, params)  # warm-up: kernels, pinned blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = render_gpu.render_batch(x, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.is_cuda and got.is_contiguous(memory_format=torch.channels_last)
    assert_close_levels(got.cpu(), want, 0.02, 1.0, what="cuda vs cpu torch renderer")
