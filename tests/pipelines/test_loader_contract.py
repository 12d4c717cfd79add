"""The contract of `pipelines.loader`, checked on every backend: the batch (shapes, dtype, layout,
normalisation, label and index), the shard each rank reads, resume, epochs, and views that depend
only on (seed, epoch, index). A backend whose library does not import is skipped, saying why.

FFCV compiles every Loader on its first epoch (seconds each), so its loaders are kept per
(split, spec, batch size, workers) and re-aimed through their attributes (rank, world, seed,
shuffle, drop_last), which every backend reads at the start of each pass.
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch

from pipelines.loader import BACKENDS, BackendUnavailable, build_loader, require_backend
from pipelines.sharding import shard_indices
from pipelines.sources import beton_file
from pipelines.spec import AugmentSpec
from tests.marks import backends
from tests.pipelines.augment_stats import noise_split

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::Warning"),
              pytest.mark.usefixtures("one_torch_thread")]

IDENTITY = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                grayscale_p=0.0, blur_p=0.0)
DEFAULT = AugmentSpec(size=16)


@pytest.fixture(scope="module", params=backends(BACKENDS))
def backend(request):
    try:
        require_backend(request.param)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return request.param


class Loaders:
    """Synthetic splits (with an FFCV file where the backend needs one) and loaders over them."""

    def __init__(self, backend: str, root):
        self.backend, self.root = backend, root
        self._splits, self._ffcv = {}, {}

    def split(self, n: int, side: int, channels: int = 3):
        key = (n, side, channels)
        if key not in self._splits:
            root = self.root / f"{n}_{side}_{channels}"
            root.mkdir()
            self._splits[key] = noise_split(n, side, root=root, channels=channels)
            if self.backend == "ffcv":
                from pipelines.ffcv_writer import write_beton

                write_beton(self._splits[key], beton_file(root, "train"))
        return self._splits[key]

    def __call__(self, split, spec: AugmentSpec, batch_size: int, *, fresh: bool = False, **kw):
        kw = {"num_workers": 0, "drop_last": False, **kw}
        if self.backend != "ffcv" or fresh:
            return build_loader(self.backend, split, spec, batch_size=batch_size, **kw)
        key = (id(split), spec, batch_size, kw.pop("num_workers"))
        if key not in self._ffcv:  # FFCV sizes its epochs by the first order: the whole split
            self._ffcv[key] = build_loader("ffcv", split, spec, batch_size=batch_size,
                                           num_workers=key[-1], drop_last=False)
        ld = self._ffcv[key]
        ld.rank, ld.world, ld.seed = kw.pop("rank", 0), kw.pop("world", 1), kw.pop("seed", 0)
        ld.shuffle, ld.drop_last = kw.pop("shuffle", True), kw.pop("drop_last")
        ld.subset = kw.pop("subset", None)
        assert not kw, kw
        ld.set_epoch(0)
        return ld


@pytest.fixture(scope="module")
def make(backend, tmp_path_factory):
    return Loaders(backend, tmp_path_factory.mktemp(backend))


def shut_down(ld) -> None:
    """Free the torchvision DataLoader (and its persistent workers) by reference count, so each
    test's workers do not outlive it; the other backends hold no worker processes."""
    ld.__dict__.pop("_dl", None)


def epoch(ld) -> list:
    return [type(b)(*(t.clone() for t in b)) for b in ld]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b, strict=True)
                                    for x, y in zip(ba, bb, strict=True))


# --- the batch -----------------------------------------------------------------------------------


def test_batch_contract(make):
    split = make.split(20, 24)
    batches = epoch(make(split, DEFAULT, 8))
    assert [len(b.index) for b in batches] == [8, 8, 4]
    for b in batches:
        B = len(b.index)
        for v in (b.view1, b.view2):
            assert v.shape == (B, 3, 16, 16) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all()
            px = v.float() * torch.tensor(DEFAULT.std).view(1, 3, 1, 1) * 255
            px += torch.tensor(DEFAULT.mean).view(1, 3, 1, 1) * 255
            assert px.min() > -0.01 and px.max() < 255.01
        assert b.label.dtype == torch.int64 and b.index.dtype == torch.int64
        assert b.label.shape == b.index.shape == (B,)
        assert torch.equal(b.label, torch.from_numpy(split.labels[b.index.numpy()]))


def test_unshuffled_identity_views_are_the_normalised_source(make):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    split = make.split(40, 16)
    spec = AugmentSpec(size=16, **{**IDENTITY, "mean": mean, "std": std})
    batches = epoch(make(split, spec, 32, shuffle=False))
    assert [len(b.index) for b in batches] == [32, 8]
    assert torch.cat([b.index for b in batches]).tolist() == list(range(40))
    for b in batches:
        assert torch.equal(b.label, torch.from_numpy(split.labels[b.index.numpy()]))
        # [B, 3, H, W]
        imgs = split.images[b.index.numpy()].astype(np.float64).transpose(0, 3, 1, 2)
        want = (imgs / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
        for v in (b.view1, b.view2):
            np.testing.assert_allclose(v.numpy(), want, rtol=0, atol=1e-5)


def test_grayscale_source_expands_to_three_channels(make):
    split = make.split(10, 16, channels=1)
    spec = AugmentSpec(size=16, **{**IDENTITY, "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.6, 0.7)})
    m, s = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    for b in epoch(make(split, spec, 5)):
        assert b.view1.shape == (5, 3, 16, 16)
        px = (b.view1 * s + m) * 255  # [B, 3, S, S] pixel values
        src = torch.from_numpy(split.images[b.index.numpy()]).permute(0, 3, 1, 2).float()
        assert torch.allclose(px, src.expand(-1, 3, -1, -1), atol=1e-3)


def test_grayscale_source_runs_through_the_full_augmentation(make):
    b = next(iter(make(make.split(10, 16, channels=1), DEFAULT, 5)))
    assert b.view1.shape == b.view2.shape == (5, 3, 16, 16) and torch.isfinite(b.view1).all()


# --- randomness and determinism ------------------------------------------------------------------


def test_two_views_of_an_image_differ(make):
    for b in epoch(make(make.split(20, 24), DEFAULT, 8)):
        assert (b.view1 != b.view2).flatten(1).any(1).all()


def test_same_seed_reproduces_an_epoch_and_another_seed_does_not(make):
    split = make.split(20, 24)
    first = epoch(make(split, DEFAULT, 8, seed=3))
    again = epoch(make(split, DEFAULT, 8, seed=3))
    other = epoch(make(split, DEFAULT, 8, seed=4))
    assert same_batches(first, again)
    assert not any(torch.equal(a.view1, b.view1) for a, b in zip(first, other, strict=True))
    # the augmentation depends on (seed, epoch, index) only, not on the global RNG
    torch.manual_seed(12345)
    assert same_batches(first, epoch(make(split, DEFAULT, 8, seed=3)))


def test_a_samples_views_do_not_depend_on_its_batch(make):
    """A sample's views depend on (seed, epoch, index) only, not on the batch it lands in."""
    split = make.split(20, 24)
    views = {int(i): v for x in epoch(make(split, DEFAULT, 8, seed=3))
             for i, v in zip(x.index, x.view1)}
    for x in epoch(make(split, DEFAULT, 7, seed=3)):
        for i, v in zip(x.index, x.view1):
            assert torch.allclose(v, views[int(i)], atol=1e-5)


def test_worker_count_does_not_change_the_batches(make):
    split = make.split(20, 24)
    single = epoch(make(split, DEFAULT, 8, seed=1, num_workers=0))
    ld = make(split, DEFAULT, 8, seed=1, num_workers=2)
    assert same_batches(single, epoch(ld))
    ld.set_epoch(1)  # persistent workers serve the next epoch too
    ref = make(split, DEFAULT, 8, seed=1, num_workers=0)
    ref.set_epoch(1)
    assert same_batches(epoch(ref), epoch(ld))
    shut_down(ld)


def test_set_epoch_changes_the_order_and_the_augmentation(make):
    split = make.split(20, 24)
    ld = make(split, DEFAULT, 8)
    orders, views = [], []
    for e in range(3):
        ld.set_epoch(e)
        batches = epoch(ld)
        idx = torch.cat([b.index for b in batches]).numpy()
        assert np.array_equal(idx, shard_indices(20, 0, 1, epoch=e))
        orders.append(idx)
        v = torch.cat([b.view1 for b in batches])
        views.append(v[np.argsort(idx)])  # sorted by sample index
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[0][:8], orders[1][:8])  # from the first batch on
    assert not torch.equal(views[0], views[1])  # fresh augmentations every epoch
    ld.set_epoch(0)
    assert np.array_equal(torch.cat([b.index for b in ld]).numpy(), orders[0])


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,world,bs,short", [(21, 2, 4, [3, 2]), (103, 3, 8, [3, 2, 2])])
def test_ranks_read_their_shards(make, n, world, bs, short, drop_last):
    split = make.split(n, 8)
    spec = AugmentSpec(size=8, **IDENTITY)
    seen = []
    for rank in range(world):
        ld = make(split, spec, bs, rank=rank, world=world, seed=7, drop_last=drop_last)
        ld.set_epoch(2)
        want = shard_indices(n, rank, world, seed=7, epoch=2, batch_size=bs, drop_last=drop_last)
        batches = epoch(ld)
        n_batches = len(want) // bs if drop_last else math.ceil(len(want) / bs)
        assert len(ld) == len(batches) == n_batches
        got = torch.cat([b.index for b in batches]).numpy()
        assert np.array_equal(got, want)  # same samples, same order
        sizes = [len(b.index) for b in batches]
        assert all(s == bs for s in sizes[:-1])
        assert sizes[-1] == (bs if drop_last else len(want) - bs * (len(batches) - 1))
        seen.append(got)
    allseen = np.concatenate(seen)
    assert len(set(allseen.tolist())) == len(allseen)  # disjoint
    if drop_last:
        assert [len(s) for s in seen] == [n // (world * bs) * bs] * world
    else:
        assert sorted(allseen.tolist()) == list(range(n))
        assert [len(s) % bs for s in seen] == short  # every rank ends on a short batch


@pytest.mark.parametrize("world", [1, 2])
def test_a_subset_epoch_reads_only_the_subset_with_the_splits_keys(make, world):
    """Fine-tuning on a fraction of the labels: the epoch is over `subset`, sharded as a split
    of that size, and each sample keeps its index, label and views from the whole split."""
    split = make.split(20, 24)
    whole = {int(i): (v1, v2) for b in epoch(make(split, DEFAULT, 8, seed=5))
             for i, v1, v2 in zip(b.index, b.view1, b.view2)}
    subset = np.array([17, 2, 11, 5, 8, 19, 0])
    seen = []
    for rank in range(world):
        ld = make(split, DEFAULT, 2, seed=5, subset=subset, rank=rank, world=world,
                  drop_last=True)
        ld.set_epoch(0)
        batches = epoch(ld)
        got = torch.cat([b.index for b in batches]).numpy()
        want = subset[shard_indices(7, rank, world, seed=5, epoch=0, batch_size=2,
                                    drop_last=True)]
        assert np.array_equal(got, want) and len(ld) == len(batches)
        for b in batches:
            assert torch.equal(b.label, torch.from_numpy(split.labels[b.index.numpy()]))
            for i, v1, v2 in zip(b.index, b.view1, b.view2):
                assert torch.allclose(v1, whole[int(i)][0], atol=1e-5)
                assert torch.allclose(v2, whole[int(i)][1], atol=1e-5)
        seen.append(got)
    assert sum(len(s) for s in seen) == (6 if world == 1 else 4)


def test_a_subset_outside_the_split_is_refused(make):
    split = make.split(20, 24)
    with pytest.raises(ValueError, match=r"indices in \[0, 20\)"):
        build_loader(make.backend, split, DEFAULT, batch_size=2, subset=np.array([3, 20]))


# --- resume and epochs ---------------------------------------------------------------------------


@pytest.mark.parametrize("ep,k,num_workers", [(0, 3, 0), (1, 1, 0), (1, 0, 0), (1, 3, 2)])
def test_resume_yields_exactly_the_rest_of_the_epoch(make, ep, k, num_workers):
    split = make.split(40, 16)
    ref = make(split, DEFAULT, 4, seed=2, drop_last=True)
    ref.set_epoch(ep)
    full = epoch(ref)
    assert len(full) == 10

    first = make(split, DEFAULT, 4, seed=2, drop_last=True, num_workers=num_workers)
    first.set_epoch(ep)
    it = iter(first)
    consumed = [type(b)(*(t.clone() for t in b)) for b in (next(it) for _ in range(k))]
    assert same_batches(consumed, full[:k])
    state = first.state_dict()
    assert state == {"epoch": ep, "batch": k}  # prefetching does not advance it
    del it
    first.load_state_dict(state)  # the same loader, its pass left midway
    assert same_batches(epoch(first), full[k:])
    shut_down(first)

    resumed = make(split, DEFAULT, 4, seed=2, drop_last=True)
    resumed.load_state_dict(state)
    assert same_batches(epoch(resumed), full[k:])
    # the next epoch is whole again
    resumed.set_epoch(ep + 1)
    ref.set_epoch(ep + 1)
    assert same_batches(epoch(resumed), epoch(ref))


def test_state_after_a_whole_epoch_resumes_to_nothing(make):
    split = make.split(40, 16)
    ld = make(split, DEFAULT, 4, drop_last=True)
    epoch(ld)
    state = ld.state_dict()
    assert state == {"epoch": 0, "batch": 10}
    resumed = make(split, DEFAULT, 4, drop_last=True)
    resumed.load_state_dict(state)
    assert epoch(resumed) == []


def test_a_dropped_loader_is_freed_by_reference_count(make, backend):
    if backend == "dali":
        # The first compile of DALI's numba tail in a process keeps the frames that built it in a
        # cycle with that one loader (the collector frees it); later loaders reuse the compile.
        epoch(make(make.split(8, 16), DEFAULT, 4, fresh=True))
    ld = make(make.split(8, 16), DEFAULT, 4, fresh=True)
    epoch(ld)
    ref = weakref.ref(ld)
    gc.disable()
    try:
        del ld
        assert ref() is None
    finally:
        gc.enable()
        gc.collect()


def test_build_loader_rejects_unknown_backend():
    with pytest.raises(ValueError):
        build_loader("pillow", noise_split(8, 16), DEFAULT, batch_size=4)
