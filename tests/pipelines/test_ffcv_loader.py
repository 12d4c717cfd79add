"""FFCV two-view loader: augmentation statistics against the torchvision reference, the torch
colour tail, .beton files written by tools.convert, and stalled epochs. The contract it shares
with the other backends is checked in test_loader_contract.py.

FFCV compiles every Loader on its first epoch (seconds each), so loaders are module-scoped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from pipelines.ffcv_loader import FfcvTwoViewLoader  # noqa: E402
from pipelines.ffcv_writer import write_beton  # noqa: E402
from pipelines.sources import beton_file  # noqa: E402
from pipelines.spec import AugmentSpec  # noqa: E402
from tests.marks import FFCV  # noqa: E402
from tests.pipelines.augment_stats import (  # noqa: E402
    area_ratio_stats,
    binomial_ok,
    coord_split,
    drawn,
    noise_split,
    recover_boxes,
    roughness,
    to_uint8,
    two_sample_ok,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::Warning"), FFCV]
N = 300
# Identity crop, so pixels can be compared with the source; blur sigma >= 1 so every blur shows.
SPEC = AugmentSpec(size=16, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_strength=0.5,
                   blur_p=0.5, blur_sigma=(1.0, 2.0))
CROP_SPEC = AugmentSpec(size=24, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
COORD_H, COORD_W, COORD_N = 48, 64, 256


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    s = noise_split(N, 16, root=root)
    write_beton(s, beton_file(root, s.name))
    return s


@pytest.fixture(scope="module")
def loader(split):
    ld = FfcvTwoViewLoader(split, SPEC, batch_size=64, seed=5, num_workers=2, drop_last=False)
    list(ld)  # compile once
    return ld


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv_coord")
    s = coord_split(COORD_N, COORD_H, COORD_W, root=root)
    write_beton(s, beton_file(root, s.name))
    return s


def run(ld, epoch=0):
    ld.set_epoch(epoch)
    return list(ld)


def pixels(batches, spec, view="view1"):
    return torch.cat([to_uint8(getattr(b, view), spec.mean, spec.std) for b in batches])


def _detect(px, base):
    """Per-sample events seen in the pixels of identity-crop views of noise images."""
    gray = (px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 0.01
    blurred = roughness(px) < 1.2
    unchanged = (px - base).abs().amax((1, 2, 3)) < 0.01
    flipped = (px - base.flip(-1)).abs().amax((1, 2, 3)) < 0.01
    jittered = ~(unchanged | flipped)  # only meaningful where neither gray nor blurred
    return gray, blurred, unchanged, flipped, jittered


def test_frequencies_match_spec_and_torchvision_reference(loader, split):
    """Grayscale, blur, jitter and flip frequencies: binomial bounds around the spec, and within
    two-sample bounds of the torchvision reference loader on the same images."""
    from pipelines.torchvision_loader import TorchvisionTwoViewLoader

    ref = TorchvisionTwoViewLoader(split, SPEC, batch_size=100, seed=5, num_workers=0,
                                   shuffle=False, drop_last=False)
    counts = {}
    for name, batches in (("ffcv", run(loader)), ("torchvision", list(ref))):
        idx = torch.cat([b.index for b in batches]).numpy()
        base = torch.from_numpy(split.images[idx]).permute(0, 3, 1, 2).float()
        events = []
        for view in ("view1", "view2"):
            events.append(_detect(pixels(batches, SPEC, view), base))
        gray, blurred, unchanged, flipped, jittered = (torch.cat(e) for e in zip(*events))
        plain = ~gray & ~blurred
        counts[name] = {"gray": (int(gray.sum()), len(gray)),
                        "blur": (int(blurred.sum()), len(gray)),
                        "jitter": (int(jittered[plain].sum()), int(plain.sum())),
                        "flip_alone": (int(flipped.sum()), len(gray)),
                        "untouched": (int(unchanged.sum()), len(gray))}
    n_off = (1 - SPEC.jitter_p) * (1 - SPEC.grayscale_p) * (1 - SPEC.blur_p)
    expect = {"gray": SPEC.grayscale_p, "blur": SPEC.blur_p, "jitter": SPEC.jitter_p,
              "flip_alone": SPEC.flip_p * n_off, "untouched": (1 - SPEC.flip_p) * n_off}
    for event, p in expect.items():
        k, n = counts["ffcv"][event]
        assert binomial_ok(k, n, p), (event, k, n, p)
        assert two_sample_ok(k, n, *counts["torchvision"][event]), (event, counts)


@pytest.fixture(scope="module")
def crop_loader(coord):
    ld = FfcvTwoViewLoader(coord, CROP_SPEC, batch_size=128, seed=3, num_workers=2, shuffle=False,
                           drop_last=False)
    list(ld)
    return ld


def test_crop_boxes_follow_keys_and_match_torchvision_reference(crop_loader, coord):
    """Crop area and aspect: per sample as drawn from the key, and in distribution as the
    torchvision reference's RandomResizedCrop."""
    from pipelines.torchvision_loader import TorchvisionTwoViewLoader

    h, w = COORD_H, COORD_W
    batches = run(crop_loader)
    wh = recover_boxes(pixels(batches, CROP_SPEC), h, w)
    idx = torch.cat([b.index for b in batches]).numpy()
    # (w, h): the one sampler
    expect = drawn(CROP_SPEC, 3, 0, idx, 0, h, w)["box"][:, [3, 2]].astype(float)
    assert np.median(np.abs(wh - expect) / expect) < 0.05
    ref = TorchvisionTwoViewLoader(coord, CROP_SPEC, batch_size=128, seed=3, num_workers=0,
                                   shuffle=False, drop_last=False)
    wh_ref = recover_boxes(pixels(list(ref), CROP_SPEC), h, w)
    (a_ffcv, r_ffcv), (a_ref, r_ref) = area_ratio_stats(wh, h, w), area_ratio_stats(wh_ref, h, w)
    assert abs(a_ref.mean() - a_ffcv.mean()) < 0.06
    assert abs(np.log(r_ref).mean() - np.log(r_ffcv).mean()) < 0.06
    area, ratio = area_ratio_stats(expect, h, w)
    assert area.min() >= CROP_SPEC.crop_area[0] - 0.02 and area.max() <= 1.0
    # the rest: centre-crop fallback
    assert ((ratio >= 0.75 - 0.05) & (ratio <= 4 / 3 + 0.05)).mean() > 0.9


def test_missing_beton_is_an_error(split):
    from pipelines.sources import DatasetError, Split

    bad = Split("val", split.labels, images=split.images, root=split.root)
    with pytest.raises(DatasetError, match="no FFCV file .*val.beton.*--to ffcv"):
        FfcvTwoViewLoader(bad, SPEC, batch_size=8)


# ---- the GPU arrangement: crop in FFCV, the tail in torch after the transfer --------------------

@pytest.fixture(scope="module")
def tail_loader(split):
    return FfcvTwoViewLoader(split, SPEC, batch_size=64, seed=5, num_workers=2, drop_last=False,
                             colour_on_device=True)


def test_loader_with_torch_tail_matches_numba_loader(loader, tail_loader):
    """The CUDA arrangement (crop and flip in FFCV, the rest in torch after it) run on the CPU
    gives the same batches as the all-numba pipeline, up to float32 rounding."""
    for a, b in zip(run(loader, epoch=1), run(tail_loader, epoch=1), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.label, b.label)
        assert b.view1.is_contiguous(memory_format=torch.channels_last)
        for view in ("view1", "view2"):
            diff = (pixels([a], SPEC, view) - pixels([b], SPEC, view)).abs()
            assert diff.max() < 1.01 and (diff > 0.01).double().mean() < 1e-3


@pytest.mark.gpu
def test_cuda_loader_matches_cpu_loader(loader, split):
    """On a GPU, jitter, grayscale and blur run in torch after ToDevice; the views match the
    CPU's."""
    ld = FfcvTwoViewLoader(split, SPEC, batch_size=64, seed=5, num_workers=2, drop_last=False,
                           device="cuda")
    assert ld.colour_on_device
    for a, b in zip(run(loader, epoch=1), run(ld, epoch=1), strict=True):
        assert b.view1.is_cuda and b.view1.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.index, b.index.cpu())
        for view in ("view1", "view2"):
            diff = (pixels([a], SPEC, view) - pixels([b], SPEC, view)).abs()
            assert diff.max() < 1.01 and (diff > 0.01).double().mean() < 1e-3


# ---- real JPEGs through tools.convert ---------------------------------------------------------

def _imagenet_sample() -> Path:
    from tools.benchmark import default_images

    return default_images()


def test_convert_writes_beton_the_loader_reads(tmp_path):
    from PIL import Image

    from pipelines.dataset_writer import convert
    from pipelines.sources import open_dataset

    sample = _imagenet_sample()
    files = []
    if sample.is_dir():
        files = sorted(p for p in sample.glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        pytest.skip(f"no ImageNet sample JPEGs in '{sample}' (set SIMCLR_IMAGENET_SAMPLE)")
    modes = {}
    for p in files:
        with Image.open(p) as im:
            modes[p] = im.mode
    gray = [p for p in files if modes[p] == "L"][:1]
    colour = [p for p in files if modes[p] == "RGB"][:11]
    if not gray:
        pytest.skip(f"no grayscale JPEG in '{sample}'")
    src = tmp_path / "src"
    src.mkdir()
    for p in colour + gray:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    convert(src, out, fmt="folder", to="ffcv", max_resolution=96, workers=1)
    assert (out / "train.beton").is_file()
    split = open_dataset(out).split("train")
    assert len(split) == 12
    gray_index = [Path(f).name for f in split.files].index(gray[0].name)

    spec = AugmentSpec(size=32)
    ld = FfcvTwoViewLoader(split, spec, batch_size=5, seed=0, num_workers=2, shuffle=False,
                           drop_last=False)
    batches = list(ld)
    assert [len(b.index) for b in batches] == [5, 5, 2] == [len(b.label) for b in batches]
    for b in batches:
        for v in (b.view1, b.view2):
            assert v.shape == (len(b.index), 3, 32, 32) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v).all()
            px = to_uint8(v, spec.mean, spec.std)
            assert px.min() > -0.01 and px.max() < 255.01
        assert b.label.dtype == torch.int64 and b.index.dtype == torch.int64
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(12))
    assert torch.equal(torch.cat([b.label for b in batches]), torch.from_numpy(split.labels))
    # The grayscale JPEG stays gray through every view (jitter keeps gray pixels gray); colour
    # ones do not.
    spread = torch.cat([(pixels(batches, spec, v).amax(1) - pixels(batches, spec, v).amin(1))
                        .amax((1, 2)) for v in ("view1", "view2")]).view(2, 12)
    assert spread[:, gray_index].max() <= 3
    colour_spread = np.delete(spread.numpy(), gray_index, axis=1)
    assert (colour_spread > 20).mean() > 0.5


def test_importing_the_ffcv_backend_keeps_torch_threads():
    """ffcv's import sets torch to one thread process-wide; ours must put the setting back."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2); import pipelines.ffcv_writer, "
            "pipelines.ffcv_loader, pipelines.ffcv_ops; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "2"


class _SilentEpoch:
    """An FFCV epoch iterator whose thread is alive but never delivers (or ends at once)."""

    def __init__(self, items=()):
        import queue

        self.output_queue = queue.Queue()
        for item in items:
            self.output_queue.put(item)

    def is_alive(self):
        return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("items,wording",
                         [((), "produced no batch in 1 s"), ((None,), "ended early")])
def test_a_stalled_or_short_epoch_is_a_one_line_dataset_error(split, items, wording):
    from pipelines.sources import DatasetError

    ld = FfcvTwoViewLoader(split, AugmentSpec(size=16), batch_size=8, num_workers=1, timeout_s=1.0)
    with pytest.raises(DatasetError) as info:
        ld._next(_SilentEpoch(items), epoch=3, b=5)
    msg = str(info.value)
    assert "\n" not in msg and wording in msg and "batch 5 of epoch 3" in msg and "--verify" in msg
