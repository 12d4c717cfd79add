"""Counter-based parameter streams shared by the DALI and FFCV loaders, against a plain-Python
SplitMix64 and torchvision's RandomResizedCrop.get_params written out from its source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.augment_params import (
    SALT_ALL,
    SALT_BLUR,
    SALT_CROP,
    SALT_GRAY,
    SALT_JITTER,
    colour_blur_params,
    crop_boxes,
    jitter_ranges,
    uniform_table,
    view_key,
)
from pipelines.spec import AugmentSpec
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
    # The reference generator seeded with 0 starts e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f.
    assert [py_mix(k * GOLDEN & MASK) for k in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                            0x06C45D188009454F]


@pytest.mark.parametrize("seed,epoch,view,salt,first", [(0, 0, 0, SALT_ALL, 1), (2**63 + 17, 5, 1, SALT_BLUR, 0)])
def test_uniform_table_matches_python_reference(seed, epoch, view, salt, first):
    index = np.array([0, 1, 7, 123456, 2**40 + 3])
    got = uniform_table(view_key(seed, epoch, view), index, salt, first, 6)
    want = [[py_uniform(seed, epoch, view, int(i), salt, first + k) for k in range(6)] for i in index]
    assert np.array_equal(got, np.array(want))


def test_streams_are_counter_based_and_independent():
    key = view_key(3, 1, 0)
    idx = np.arange(2000)
    table = uniform_table(key, idx, SALT_ALL, 1, 4)
    sub = np.array([1999, 5, 77])
    assert np.array_equal(uniform_table(key, sub, SALT_ALL, 1, 4), table[sub])  # any subset, any order
    assert table.min() >= 0 and table.max() < 1
    assert abs(table.mean() - 0.5) < 4 * math.sqrt(1 / 12 / table.size)
    for other in (uniform_table(view_key(3, 1, 1), idx, SALT_ALL, 1, 4), uniform_table(view_key(3, 2, 0), idx, SALT_ALL, 1, 4),
                  uniform_table(key, idx, SALT_CROP, 1, 4)):
        assert abs(np.corrcoef(table.ravel(), other.ravel())[0, 1]) < 4 / math.sqrt(table.size)


@pytest.mark.parametrize("height,width", [(256, 256), (48, 64), (10, 300), (300, 12)])
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0))])
def test_crop_boxes_are_torchvision_get_params(height, width, scale, ratio):
    seed, epoch, view = 9, 2, 1
    idx = np.arange(300)
    for salt, first in ((SALT_ALL, 1), (SALT_CROP, 0)):  # the DALI and FFCV layouts
        got = crop_boxes(view_key(seed, epoch, view), idx, height, width, salt, first, scale, ratio)
        want = [py_get_params(lambda k, i=int(i), salt=salt, first=first: py_uniform(seed, epoch, view, i, salt, first + k),
                              height, width, scale, ratio) for i in idx]
        assert np.array_equal(got, np.array(want))


def test_colour_blur_params_layout_and_frequencies():
    spec = AugmentSpec(jitter_strength=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    seed, epoch, view, n = 4, 3, 0, 4000
    idx = np.arange(n)
    p = colour_blur_params(spec, view_key(seed, epoch, view), idx)
    lo, hi = jitter_ranges(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    for i in (0, 1, 2, 999, n - 1):
        u = [py_uniform(seed, epoch, view, i, SALT_JITTER, k) for k in range(9)]
        assert p["jitter"][i] == (u[0] < spec.jitter_p)
        assert list(p["order"][i]) == sorted(range(4), key=lambda j: u[1 + j])
        assert np.array_equal(p["factors"][i], [lo[j] + (hi[j] - lo[j]) * u[5 + j] for j in range(4)])
        assert p["gray"][i] == (py_uniform(seed, epoch, view, i, SALT_GRAY, 0) < spec.grayscale_p)
        ub = [py_uniform(seed, epoch, view, i, SALT_BLUR, k) for k in range(2)]
        assert p["blur"][i] == (ub[0] < spec.blur_p)
        assert p["sigma"][i] == spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * ub[1]
    for key, prob in (("jitter", spec.jitter_p), ("gray", spec.grayscale_p), ("blur", spec.blur_p)):
        assert binomial_ok(int(p[key].sum()), n, prob), key
    for slot in range(4):  # a uniform random order: each adjustment in each slot a quarter of the time
        assert all(binomial_ok(int(c), n, 0.25) for c in np.bincount(p["order"][:, slot], minlength=4))
    f = p["factors"]
    assert (f >= lo).all() and (f <= hi).all()
    assert np.allclose(f.mean(0), (lo + hi) / 2, atol=4 * (hi - lo).max() / math.sqrt(12 * n))


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
        s = py_mix(key ^ py_mix(3 ^ (SALT_BLUR << 56)))
        want = [(py_mix((s + k * GOLDEN) & MASK) >> 11) / 2.0**53 for k in range(3)]
        for typed in ((key, np.int64(key), np.uint64(key)) if key < 2**63 else (np.uint64(key),)):
            assert [draw(typed, np.int64(3), SALT_BLUR, k) for k in range(3)] == want
