"""FFCV two-view loader: contract, frequencies, order/sharding, resume. One compiled loader per module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from pipelines.ffcv_loader import FfcvTwoViewLoader  # noqa: E402
from pipelines.ffcv_ops import write_beton  # noqa: E402
from pipelines.sharding import shard_indices  # noqa: E402
from pipelines.spec import AugmentSpec  # noqa: E402
from tests.pipelines.augment_stats import binomial_ok, noise_split, to_uint8  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::Warning")]
N = 300
SPEC = AugmentSpec(size=16, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_strength=0.5, blur_p=0.5)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    s = noise_split(N, 16, root=root)
    write_beton(s, root / "train.beton")
    return s


@pytest.fixture(scope="module")
def loader(split):
    ld = FfcvTwoViewLoader(split, SPEC, batch_size=64, seed=5, num_workers=2, drop_last=False)
    list(ld)  # compile once
    return ld


def run(ld, epoch=0, rank=0, world=1, drop_last=False):
    ld.rank, ld.world, ld.drop_last = rank, world, drop_last
    ld.set_epoch(epoch)
    try:
        return list(ld)
    finally:
        ld.rank, ld.world, ld.drop_last = 0, 1, False


def test_contract(loader):
    b = run(loader)[0]
    assert b.view1.shape == (64, 3, 16, 16) and b.view1.dtype == torch.float32
    assert b.view1.is_contiguous(memory_format=torch.channels_last)
    assert b.label.dtype == torch.int64 and torch.equal(b.label, b.index % 10)
    px = to_uint8(b.view1, SPEC.mean, SPEC.std)
    assert px.min() > -0.01 and px.max() < 255.01
    assert not torch.allclose(b.view1, b.view2)


def test_reproducible_and_epochs_differ(loader):
    a, b, c = run(loader), run(loader), run(loader, epoch=1)
    assert all(torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2) for x, y in zip(a, b))
    assert not torch.equal(a[0].index, c[0].index)


def test_frequencies(loader, split):
    batches = run(loader)
    px = torch.cat([to_uint8(b.view1, SPEC.mean, SPEC.std) for b in batches])
    base = torch.from_numpy(split.images[torch.cat([b.index for b in batches]).numpy()]).permute(0, 3, 1, 2).float()
    gray = (px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 0.01
    assert binomial_ok(int(gray.sum()), N, SPEC.grayscale_p)
    unchanged = (px - base).abs().amax((1, 2, 3)) < 0.01
    flipped = (px - base.flip(-1)).abs().amax((1, 2, 3)) < 0.01
    # untouched = no flip, no jitter, no gray, no blur
    p_same = (1 - SPEC.flip_p) * (1 - SPEC.jitter_p) * (1 - SPEC.grayscale_p) * (1 - SPEC.blur_p)
    assert binomial_ok(int(unchanged.sum()), N, p_same)
    assert binomial_ok(int(flipped.sum()), N, SPEC.flip_p * (1 - SPEC.jitter_p) * (1 - SPEC.grayscale_p) * (1 - SPEC.blur_p))


@pytest.mark.parametrize("drop_last", [False, True])
def test_shards(loader, drop_last):
    seen = []
    for rank in range(2):
        got = torch.cat([b.index for b in run(loader, epoch=3, rank=rank, world=2, drop_last=drop_last)]).numpy()
        want = shard_indices(N, rank, 2, seed=5, epoch=3, batch_size=64, drop_last=drop_last)
        assert np.array_equal(got, want)
        seen.append(got)
    allseen = np.concatenate(seen)
    assert len(set(allseen.tolist())) == len(allseen)
    if not drop_last:
        assert sorted(allseen.tolist()) == list(range(N))


def test_resume(loader):
    full = run(loader, epoch=2)
    loader.set_epoch(2)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    it.close()
    assert state == {"epoch": 2, "batch": 2}
    loader.load_state_dict(state)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2) and torch.equal(x.index, y.index)


def test_missing_beton_is_an_error(split):
    from pipelines.sources import Split

    bad = Split("val", split.labels, images=split.images, root=split.root)
    with pytest.raises(FileNotFoundError):
        FfcvTwoViewLoader(bad, SPEC, batch_size=8)
