"""The one sampler: counter-based streams against a plain-Python SplitMix64, the crop box against
torchvision's RandomResizedCrop.get_params written out from its source, and the packed view
parameters against the draw layout and the spec's probabilities."""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest

from pipelines.augment_params import (
    DRAW_BLUR,
    DRAW_CROP,
    DRAW_CUTOUT,
    DRAW_CUTOUT_BOX,
    DRAW_FACTORS,
    DRAW_FLIP,
    DRAW_GRAY,
    DRAW_JITTER,
    DRAW_NOISE,
    DRAW_NOISE_STD,
    DRAW_ORDER,
    DRAW_QUARTERS,
    DRAW_ROTATE,
    DRAW_SIGMA,
    DRAW_SOBEL,
    N_P,
    NOISE_FIRST,
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
    P_WINDOW,
    SALT_VIEW,
    blur_windows,
    crop_boxes,
    jitter_ranges,
    noise_uniforms,
    sample_views,
    uniform_table,
    view_key,
)
from pipelines.spec import SHARED, AugmentSpec, ViewOverrides
from tests.pipelines.augment_stats import binomial_ok

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def py_mix(x: int) -> int:
    """SplitMix64's output function with the state advanced once (Steele et al., 2014)."""
    z = (x + GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def py_uniform(seed: int, epoch: int, view: int, index: int, salt: int, k: int) -> float:
    key = py_mix(py_mix(py_mix(seed & MASK) ^ epoch) ^ (view + 1))
    s = py_mix(key ^ py_mix((index & MASK) ^ (salt << 56)))
    return (py_mix((s + k * GOLDEN) & MASK) >> 11) / 2.0**53


def py_get_params(u, height: int, width: int, scale, ratio):
    """torchvision.transforms.RandomResizedCrop.get_params with its random draws replaced by
    u(k): area u(t), log-aspect u(10+t), top u(20+t), left u(30+t) in try t."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u(t))
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u(10 + t))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u(20 + t) * (height - h + 1))
            j = int(u(30 + t) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_mix_is_splitmix64():
    # The reference generator seeded with 0 starts e220a8397b1dcdaf, 6e789e6aa1b965f4,
    # 06c45d188009454f.
    assert [py_mix(k * GOLDEN & MASK) for k in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                            0x06C45D188009454F]


@pytest.mark.parametrize("seed,epoch,view,salt,first",
                         [(0, 0, 0, SALT_VIEW, 1), (2**63 + 17, 5, 1, 5, 0)])
def test_uniform_table_matches_python_reference(seed, epoch, view, salt, first):
    index = np.array([0, 1, 7, 123456, 2**40 + 3])
    got = uniform_table(view_key(seed, epoch, view), index, salt, first, 6)
    want = [[py_uniform(seed, epoch, view, int(i), salt, first + k) for k in range(6)]
            for i in index]
    assert np.array_equal(got, np.array(want))


def test_streams_are_counter_based_and_independent():
    key = view_key(3, 1, 0)
    idx = np.arange(2000)
    table = uniform_table(key, idx, SALT_VIEW, 1, 4)
    sub = np.array([1999, 5, 77])
    # any subset, any order
    assert np.array_equal(uniform_table(key, sub, SALT_VIEW, 1, 4), table[sub])
    assert table.min() >= 0 and table.max() < 1
    assert abs(table.mean() - 0.5) < 4 * math.sqrt(1 / 12 / table.size)
    for other in (uniform_table(view_key(3, 1, 1), idx, SALT_VIEW, 1, 4),
                  uniform_table(view_key(3, 2, 0), idx, SALT_VIEW, 1, 4),
                  uniform_table(key, idx, 1, 1, 4)):
        assert abs(np.corrcoef(table.ravel(), other.ravel())[0, 1]) < 4 / math.sqrt(table.size)


@pytest.mark.parametrize("height,width", [(256, 256), (48, 64), (10, 300), (300, 12)])
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0))])
def test_crop_boxes_are_torchvision_get_params(height, width, scale, ratio):
    seed, epoch, view = 9, 2, 1
    idx = np.arange(300)
    want = [py_get_params(lambda k, i=int(i): py_uniform(seed, epoch, view, i, SALT_VIEW,
                                                         DRAW_CROP + k),
                          height, width, scale, ratio) for i in idx]
    spec = AugmentSpec(crop_area=scale, crop_ratio=ratio)
    boxes, _ = sample_views(spec, seed, epoch, idx, view, height, width)
    assert np.array_equal(boxes, np.array(want))
    got = crop_boxes(view_key(seed, epoch, view), idx, height, width, SALT_VIEW, DRAW_CROP,
                     scale, ratio)
    assert np.array_equal(got, boxes)


def test_view_params_follow_the_draw_layout_and_the_spec():
    spec = AugmentSpec(jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    seed, epoch, view, n = 4, 3, 0, 4000
    idx = np.arange(n)
    _, p = sample_views(spec, seed, epoch, idx, view, 64, 64)
    lo, hi = jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    for i in (0, 1, 2, 999, n - 1):
        u = lambda k, i=i: py_uniform(seed, epoch, view, i, SALT_VIEW, k)  # noqa: E731
        assert p[i, P_FLIP] == (u(DRAW_FLIP) < spec.flip_p)
        assert p[i, P_JITTER] == (u(DRAW_JITTER) < spec.jitter_p)
        assert list(p[i, P_ORDER:P_ORDER + 4]) == sorted(range(4), key=lambda j: u(DRAW_ORDER + j))
        assert np.array_equal(p[i, P_FACTOR:P_FACTOR + 4],
                              [lo[j] + (hi[j] - lo[j]) * u(DRAW_FACTORS + j) for j in range(4)])
        assert p[i, P_GRAY] == (u(DRAW_GRAY) < spec.grayscale_p)
        assert p[i, P_BLUR] == (u(DRAW_BLUR) < spec.blur_p)
        assert p[i, P_SIGMA] == (spec.blur_sigma[0]
                                 + (spec.blur_sigma[1] - spec.blur_sigma[0]) * u(DRAW_SIGMA))
    assert np.array_equal(p[:, P_WINDOW], blur_windows(p[:, P_SIGMA], spec.blur_kernel))
    for col, prob in ((P_FLIP, spec.flip_p), (P_JITTER, spec.jitter_p), (P_GRAY, spec.grayscale_p),
                      (P_BLUR, spec.blur_p)):
        assert binomial_ok(int(p[:, col].sum()), n, prob), col
    order = p[:, P_ORDER:P_ORDER + 4].astype(np.int64)
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # a permutation in every sample
    # a uniform random order: each adjustment in each slot a quarter of the time
    for slot in range(4):
        assert all(binomial_ok(int(c), n, 0.25) for c in np.bincount(order[:, slot], minlength=4))
    f = p[:, P_FACTOR:P_FACTOR + 4]
    assert (f >= lo).all() and (f <= hi).all()
    assert np.allclose(f.mean(0), (lo + hi) / 2, atol=4 * (hi - lo).max() / math.sqrt(12 * n))


def test_a_sample_draws_the_same_view_in_any_batch_and_the_two_views_differ():
    spec = AugmentSpec()
    idx = np.arange(500)
    boxes, params = sample_views(spec, 7, 2, idx, 0, 300, 200)
    sub = np.array([499, 3, 250])
    b2, p2 = sample_views(spec, 7, 2, sub, 0, 300, 200)
    assert np.array_equal(b2, boxes[sub]) and np.array_equal(p2, params[sub])
    b1, p1 = sample_views(spec, 7, 2, idx, 1, 300, 200)
    assert ((b1 != boxes).any(axis=1).mean() > 0.95
            and (p1[:, P_FACTOR] != params[:, P_FACTOR]).all())
    b3, _ = sample_views(spec, 7, 3, idx, 0, 300, 200)
    assert (b3 != boxes).any(axis=1).mean() > 0.95  # another epoch, other views


def test_key_type_does_not_change_the_streams():
    """A Python int key below 2**63 reaches numba as int64; it must draw exactly what the same
    key as uint64 draws (int64 ^ uint64 would otherwise mix in float64)."""
    import numba

    from pipelines.augment_params import stream, uniform

    @numba.njit
    def draw(key, index, salt, k):
        return uniform(stream(key, index, salt), k)

    assert isinstance(view_key(0, 0, 0), np.uint64)
    for key in (5, 2**63 + 5):
        s = py_mix(key ^ py_mix(3 ^ (5 << 56)))
        want = [(py_mix((s + k * GOLDEN) & MASK) >> 11) / 2.0**53 for k in range(3)]
        for typed in ((key, np.int64(key), np.uint64(key)) if key < 2**63 else (np.uint64(key),)):
            assert [draw(typed, np.int64(3), 5, k) for k in range(3)] == want


# ---- the study's operations and per-view overrides -----------------------------------------------

def test_study_params_follow_the_draw_layout_and_the_spec():
    """Rotation, Sobel, noise and cutout: drawn after every earlier draw, at the spec's rates."""
    spec = AugmentSpec(size=64, rotate_p=0.4, sobel_p=0.3, noise_p=0.6, noise_std=(0.02, 0.2),
                       cutout_p=0.5, cutout_size=(0.1, 0.5))
    seed, epoch, view, n = 4, 3, 1, 4000
    idx = np.arange(n)
    _, p = sample_views(spec, seed, epoch, idx, view, 100, 80)
    assert DRAW_ROTATE == DRAW_SIGMA + 1 and DRAW_CUTOUT_BOX + 2 < NOISE_FIRST
    assert P_ROTATE == P_WINDOW + 1 and N_P == P_CUTOUT_BOX + 3
    for i in (0, 1, 2, 999, n - 1):
        u = lambda k, i=i: py_uniform(seed, epoch, view, i, SALT_VIEW, k)  # noqa: E731
        rotate = u(DRAW_ROTATE) < spec.rotate_p
        assert p[i, P_ROTATE] == (1 + int(3 * u(DRAW_QUARTERS)) if rotate else 0)
        assert p[i, P_SOBEL] == (u(DRAW_SOBEL) < spec.sobel_p)
        assert p[i, P_NOISE] == (u(DRAW_NOISE) < spec.noise_p)
        lo, hi = spec.noise_std
        assert p[i, P_NOISE_STD] == 255.0 * (lo + (hi - lo) * u(DRAW_NOISE_STD))
        assert p[i, P_CUTOUT] == (u(DRAW_CUTOUT) < spec.cutout_p)
        lo, hi = spec.cutout_size
        side = max(1, round(64 * (lo + (hi - lo) * u(DRAW_CUTOUT_BOX))))
        assert list(p[i, P_CUTOUT_BOX:P_CUTOUT_BOX + 3]) == [
            int(u(DRAW_CUTOUT_BOX + 1) * (65 - side)), int(u(DRAW_CUTOUT_BOX + 2) * (65 - side)),
            side]
        # the noise field is keyed by the view's stream
        e = [0, 1, 7, 5000]
        table = noise_uniforms(p[i], 5001)[e]
        assert np.array_equal(table, [[u(NOISE_FIRST + 2 * k), u(NOISE_FIRST + 2 * k + 1)]
                                      for k in e])
    for col, prob in ((P_SOBEL, spec.sobel_p), (P_NOISE, spec.noise_p), (P_CUTOUT, spec.cutout_p)):
        assert binomial_ok(int(p[:, col].sum()), n, prob), col
    quarters = np.bincount(p[:, P_ROTATE].astype(np.int64), minlength=4)
    assert binomial_ok(int(quarters[1:].sum()), n, spec.rotate_p)
    assert all(binomial_ok(int(q), int(quarters[1:].sum()), 1 / 3) for q in quarters[1:])
    box = p[:, P_CUTOUT_BOX:P_CUTOUT_BOX + 3]
    assert (box[:, :2] >= 0).all() and (box[:, :2] + box[:, 2:] <= 64).all()
    assert box[:, 2].min() == round(0.1 * 64) and box[:, 2].max() == round(0.5 * 64)


def test_the_study_operations_are_off_by_default_and_move_no_earlier_draw():
    base = AugmentSpec()
    assert (base.rotate_p, base.sobel_p, base.noise_p, base.cutout_p) == (0, 0, 0, 0)
    idx = np.arange(300)
    boxes, p = sample_views(base, 1, 0, idx, 0, 90, 70)
    assert not p[:, [P_ROTATE, P_SOBEL, P_NOISE, P_CUTOUT]].any()
    b2, p2 = sample_views(AugmentSpec(rotate_p=1, sobel_p=1, noise_p=1, cutout_p=1), 1, 0, idx, 0,
                          90, 70)
    assert np.array_equal(b2, boxes) and np.array_equal(p2[:, :P_ROTATE], p[:, :P_ROTATE])


def test_view_overrides_are_the_spec_less_its_shared_settings():
    hints, over = typing.get_type_hints(AugmentSpec), typing.get_type_hints(ViewOverrides)
    assert list(over) == [f.name for f in dataclasses.fields(AugmentSpec) if f.name not in SHARED]
    for name, tp in over.items():
        assert tp == hints[name] | None, name
        assert getattr(ViewOverrides(), name) is None


def test_each_view_is_drawn_with_its_own_spec():
    """view2's overrides decide view 2's draws, view1's view 1's; the rest stays the base spec's."""
    base = dict(size=32, crop_area=(0.3, 1.0), jitter_p=0.8, blur_p=0.5)
    spec = AugmentSpec(**base, view2={"jitter_p": 0.0, "cutout_p": 1.0, "crop_area": (0.9, 1.0)})
    idx = np.arange(200)
    for view, want in ((0, AugmentSpec(**base)),
                       (1, AugmentSpec(**{**base, "crop_area": (0.9, 1.0), "jitter_p": 0.0},
                                       cutout_p=1.0))):
        assert spec.for_view(view) == want
        got = sample_views(spec, 3, 1, idx, view, 50, 60)
        ref = sample_views(want, 3, 1, idx, view, 50, 60)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), view
    _, p2 = sample_views(spec, 3, 1, idx, 1, 50, 60)
    assert not p2[:, P_JITTER].any() and p2[:, P_CUTOUT].all()
    one = AugmentSpec(view1=ViewOverrides(flip_p=0.0))
    assert one.for_view(0) == AugmentSpec(flip_p=0.0) and one.for_view(1) == AugmentSpec()
    assert AugmentSpec().for_view(1) is not None and AugmentSpec().for_view(0) == AugmentSpec()


@pytest.mark.parametrize("kw,msg", [
    (dict(rotate_p=1.5), "rotate_p must be a probability"),
    (dict(noise_std=(0.2, 0.1)), "noise_std"),
    (dict(cutout_size=(0.0, 0.5)), "cutout_size"),
    (dict(view2={"cutout_p": -1.0}), "view2.cutout_p must be a probability"),
    (dict(view1={"size": 8}), "view1 cannot set size"),
])
def test_invalid_study_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        AugmentSpec(**kw)
