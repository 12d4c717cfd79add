"""The data side of "nothing lost, nothing hangs" (issue 11).

- Every image format tools.convert accepts trains on every backend, each seeing the pixels an
  independent oracle gives: torchvision's own decode_image(mode=RGB) of the original file (EXIF
  orientation applied, 16-bit scaled to 8 bits with torchvision's to_dtype), or PIL's for the
  formats torchvision cannot read (BMP, TIFF).
- Convert faults: a sample larger than FFCV's default page, a writer worker that raises or is
  killed, --overwrite of a directory tools.convert did not write, file names that a text list
  cannot hold, --verify.
- Dataset files removed or truncated after conversion, for each backend: one line naming the file,
  never a hang.

Every test that runs FFCV's writer or a loader carries a timeout: a hang is a failure.
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.formats as formats_mod
from pipelines.dataset_writer import convert
from pipelines.sources import DatasetError, open_dataset
from pipelines.spec import AugmentSpec
from tests.marks import backends
from tools.convert import main

SIDE = 24
# Identity crop, no colour ops: a view is the decoded image (resized S -> S), normalised.
IDENTITY = AugmentSpec(size=SIDE, crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                       jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _backend(name: str):
    """Skip cleanly, with the reason, where a backend's package does not import."""
    from pipelines.loader import BackendUnavailable, require_backend

    try:
        require_backend(name)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def _smooth(seed: int, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    """A smooth, asymmetric SIDE x SIDE image (JPEG keeps it well; a rotation changes it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    top = np.iinfo(dtype).max
    weights = rng.uniform(0.2, 1.0, (channels, 3))
    planes = [(a * x + b * y * y + c) / (a + b + c) for a, b, c in weights]
    return np.clip(np.rint(np.stack(planes, -1) * top), 0, top).astype(dtype)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit gray (H x W) or RGB (H x W x 3) PNG, written out by hand (PIL cannot write 16-bit
    RGB): signature, IHDR, one zlib IDAT of filter-0 big-endian rows, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2").reshape(h, -1).view(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _exif_rotated() -> bytes:
    im = Image.fromarray(_smooth(9))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encoded(im, "JPEG", quality=95, exif=exif)


# name -> (file name, bytes); every case SIDE x SIDE
FORMATS = {
    "jpeg_rgb": ("rgb.jpg", lambda: _encoded(Image.fromarray(_smooth(1)), "JPEG", quality=95)),
    "jpeg_gray": ("gray.jpg",
                  lambda: _encoded(Image.fromarray(_smooth(2, 1)[..., 0]), "JPEG", quality=95)),
    "jpeg_cmyk": ("cmyk.jpg",
                  lambda: _encoded(Image.fromarray(_smooth(3, 4), "CMYK"), "JPEG", quality=95)),
    "jpeg_exif_rotated": ("rotated.jpg", _exif_rotated),
    "png_rgb8": ("rgb8.png", lambda: _encoded(Image.fromarray(_smooth(4)), "PNG")),
    "png_gray8": ("gray8.png", lambda: _encoded(Image.fromarray(_smooth(5, 1)[..., 0]), "PNG")),
    "png_gray16": ("gray16.png", lambda: _png16(_smooth(6, 1, np.uint16)[..., 0])),
    "png_rgb16": ("rgb16.png", lambda: _png16(_smooth(7, 3, np.uint16))),
    "png_rgba": ("rgba.png", lambda: _encoded(Image.fromarray(_smooth(8, 4)), "PNG")),
    "png_la": ("la.png", lambda: _encoded(Image.fromarray(_smooth(10, 2), "LA"), "PNG")),
    "png_palette": ("palette.png",
                    lambda: _encoded(Image.fromarray(_smooth(11)).quantize(64), "PNG")),
    "png_named_jpg": ("png_inside.jpg", lambda: _encoded(Image.fromarray(_smooth(12)), "PNG")),
    "bmp": ("bitmap.bmp", lambda: _encoded(Image.fromarray(_smooth(13)), "BMP")),
    "gif": ("anim.gif", lambda: _encoded(Image.fromarray(_smooth(14)).quantize(64), "GIF")),
    "tiff": ("scan.tiff", lambda: _encoded(Image.fromarray(_smooth(15)), "TIFF")),
    "webp": ("photo.webp", lambda: _encoded(Image.fromarray(_smooth(16)), "WEBP", lossless=True)),
}
JPEG_CONTENT = {"jpeg_rgb", "jpeg_gray", "jpeg_cmyk", "jpeg_exif_rotated"}


def oracle(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3]: torchvision's decode of the original file (not the converter's code)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = decode_image(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # BMP, TIFF: not torchvision formats; PIL defines their pixels
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    if img.ndim == 4:  # GIF: frames
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG: torchvision's own scaling to 8 bits
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def formats_dataset(tmp_path_factory):
    pytest.importorskip("ffcv")
    root = tmp_path_factory.mktemp("formats")
    src = root / "src"
    src.mkdir()
    expected = {}
    for case, (name, make) in FORMATS.items():
        data = make()
        (src / name).write_bytes(data)
        expected[case] = oracle(data)
        assert expected[case].shape == (SIDE, SIDE, 3), case
    manifest = convert(src, root / "out", to="ffcv", workers=1)
    split = open_dataset(root / "out").split("train")
    assert not manifest["skipped"] and len(split) == len(FORMATS)
    names = sorted(name for name, _ in FORMATS.values())  # the converter lists files sorted
    index = {case: names.index(name) for case, (name, _) in FORMATS.items()}
    for case, (name, _) in FORMATS.items():  # served as it is, or normalised into a PNG
        path = Path(split.files[index[case]])
        assert path == src / name or path.parent == root / "out" / "normalised" / "train", case
    assert manifest["splits"]["train"]["normalised"] == len(_normalised(split))
    return split, expected, index


_views: dict[str, np.ndarray] = {}


def backend_views(backend: str, split) -> np.ndarray:
    """uint8-ish float [N, S, S, 3]: every image of the split as one backend trains on it."""
    if backend not in _views:
        from pipelines.loader import build_loader
        from tests.pipelines.augment_stats import to_uint8

        ld = build_loader(backend, split, IDENTITY, batch_size=len(split), num_workers=1,
                          shuffle=False, drop_last=False)
        (batch,) = list(ld)  # trains: one batch of every image
        assert batch.index.tolist() == list(range(len(split)))
        pixels = to_uint8(batch.view1, IDENTITY.mean, IDENTITY.std)
        _views[backend] = pixels.permute(0, 2, 3, 1).numpy()
    return _views[backend]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", backends(["torchvision", "dali", "ffcv"]))
@pytest.mark.parametrize("case", list(FORMATS))
def test_every_format_trains_with_the_same_pixels_on_every_backend(formats_dataset, case, backend):
    _backend(backend)
    split, expected, index = formats_dataset
    got = backend_views(backend, split)[index[case]]
    diff = np.abs(got - expected[case].astype(np.float64))
    if backend == "ffcv":  # the .beton holds a quality-90 JPEG of the pixels (measured: max 8)
        assert diff.mean() < 2.5 and diff.max() < 12, (case, diff.mean(), diff.max())
    elif backend == "dali" and case in JPEG_CONTENT and index[case] not in _normalised(split):
        assert diff.max() < 1.02, (case, diff.max())  # libjpeg builds may round differently
    else:  # exact pixels (the normalisation undone in float leaves < 0.01)
        assert diff.max() < 0.02, (case, diff.max())


def _normalised(split) -> set[int]:
    return {i for i, f in enumerate(split.files) if "/normalised/" in f}


def test_decode_rgb_matches_torchvision_on_every_format():
    for case, (_, make) in FORMATS.items():
        data = make()
        np.testing.assert_array_equal(formats_mod.decode_rgb(data), oracle(data), err_msg=case)


# ---------------------------------------------------------------- convert faults


def _one_line(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _nothing_left(out: Path) -> None:
    """OUT was not created and no temporary file or directory remains next to it."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def _jpeg_folder(src: Path, n: int = 6) -> list[Path]:
    (src / "c").mkdir(parents=True)
    paths = []
    for i in range(n):
        paths.append(src / "c" / f"{i}.jpg")
        paths[-1].write_bytes(_encoded(Image.fromarray(_smooth(i)), "JPEG", quality=90))
    return paths


@pytest.mark.timeout(240)
def test_beton_pages_hold_a_jpeg_larger_than_four_mib(tmp_path, capsys):
    """FFCV's fixed 4 MiB page made its worker raise and the parent wait at 0/N forever."""
    pytest.importorskip("ffcv")
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "c").mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "c" / "big.jpg", quality=90)
    assert (src / "c" / "big.jpg").stat().st_size > 4 << 20  # re-encoded at 90, still > 4 MiB
    assert main([str(src), str(out), "--to", "ffcv"]) == 0, capsys.readouterr().err
    from ffcv.reader import Reader

    reader = Reader(str(out / "train.beton"))
    assert reader.num_samples == 1 and len(reader.alloc_table) == 1
    image = reader.metadata["f0"][0]  # fields in order: image, label, index
    (_, ptr, size), = reader.alloc_table
    assert (image["width"], image["height"]) == (2400, 2400) and size > 4 << 20
    with open(out / "train.beton", "rb") as f:
        f.seek(int(ptr))
        stored = np.asarray(Image.open(io.BytesIO(f.read(int(size)))).convert("RGB"))
    assert stored.shape == noise.shape
    # JPEG (twice, with chroma subsampling) keeps little of noise but its 16 x 16 block means
    blocks = [a.reshape(150, 16, 150, 16, 3).mean(axis=(1, 3)) for a in (stored, noise)]
    assert np.abs(blocks[0] - blocks[1]).mean() < 3


def _failing_decode(bad_name: str, how: str):
    real = formats_mod.decode_rgb

    def decode(source, name=None):
        if name is not None and Path(name).name == bad_name:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise MemoryError("Tried allocating 9 but page size is 4")
        return real(source, name)

    return decode


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_beton_worker_failure_ends_convert_with_one_line_and_no_output(tmp_path, capsys,
                                                                       monkeypatch, how):
    """A worker that raises, or dies by a signal, ends the conversion: no hang, nothing left."""
    pytest.importorskip("ffcv")
    src, out = tmp_path / "src", tmp_path / "out"
    _jpeg_folder(src)
    monkeypatch.setattr(formats_mod, "decode_rgb", _failing_decode("3.jpg", how))  # forked workers
    code = main([str(src), str(out), "--to", "ffcv", "--workers", "1"])
    line = _one_line(code, capsys.readouterr().err, "train.beton")
    if how == "raise":
        assert "3.jpg" in line and "Tried allocating" in line
    else:
        assert "signal 9" in line
    _nothing_left(out)


def _inspect_or_die(path):
    """inspect_image, but the process decoding 3.jpg is killed (as by the OOM killer)."""
    if Path(path).name == "3.jpg":
        os.kill(os.getpid(), signal.SIGKILL)
    return formats_mod.inspect_image(path)


@pytest.mark.timeout(120)
def test_killed_decoding_worker_ends_convert_with_one_line_and_no_output(tmp_path, capsys,
                                                                         monkeypatch):
    """A sibling of the writer's hang: multiprocessing.Pool waits forever for a killed worker."""
    import pipelines.dataset_readers as convert_mod

    src, out = tmp_path / "src", tmp_path / "out"
    _jpeg_folder(src, 8)
    monkeypatch.setattr(convert_mod, "inspect_image", _inspect_or_die)
    code = main([str(src), str(out), "--workers", "2"])
    _one_line(code, capsys.readouterr().err, "decoding train died", "--workers")
    _nothing_left(out)


def test_overwrite_replaces_only_a_directory_tools_convert_wrote(tmp_path, capsys):
    src = tmp_path / "src"
    _jpeg_folder(src, 2)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (webapp / "index.html").write_text("<html></html>")
    code = main([str(src), str(webapp), "--overwrite"])
    _one_line(code, capsys.readouterr().err, str(webapp), "not a converted dataset")
    assert (webapp / "index.html").read_text() == "<html></html>"
    # a manifest that claims the tool but has no format_version is not ours either
    (webapp / "manifest.json").write_text(json.dumps({"tool": "tools.convert"}))
    code = main([str(src), str(webapp), "--overwrite"])
    _one_line(code, capsys.readouterr().err, "not a converted")
    assert (webapp / "index.html").is_file()
    # a dataset this tool wrote, even of an older format version, is replaced
    out = tmp_path / "out"
    assert main([str(src), str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert main([str(src), str(out), "--overwrite"]) == 0, capsys.readouterr().err
    assert open_dataset(out).split("train").files == [str(src / "c" / f"{i}.jpg") for i in range(2)]


def test_old_format_version_is_a_one_line_reconvert_error(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _jpeg_folder(src, 2)
    convert(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(DatasetError, match="format_version 1, expected 2: re-run tools.convert"):
        open_dataset(out)


ODD_NAMES = [b"new\nline.jpg", "para\u2028sep.jpg".encode(), b"latin1-\xe9t\xe9.jpg",
             b"tab\there.jpg"]


@pytest.mark.timeout(120)
def test_any_file_name_round_trips_and_trains(tmp_path, capsys):
    """Names with a newline, U+2028 or bytes that are not UTF-8 (os.fsencode) convert into a
    dataset that opens with the same paths, and train."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i, name in enumerate(ODD_NAMES):
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(_encoded(Image.fromarray(_smooth(i)), "JPEG", quality=90))
    assert main([str(src), str(out)]) == 0, capsys.readouterr().err
    split = open_dataset(out).split("train")
    assert sorted(os.fsencode(Path(f).name) for f in split.files) == sorted(ODD_NAMES)
    for f in split.files:
        assert Path(f).is_file()
    from pipelines.eval_view import load_image

    for i, f in enumerate(split.files):
        j = ODD_NAMES.index(os.fsencode(Path(f).name))
        want = oracle(_encoded(Image.fromarray(_smooth(j)), "JPEG", quality=90))
        np.testing.assert_array_equal(load_image(split, i).permute(1, 2, 0).numpy(), want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(os.fsencode(k) for k in manifest["inputs"]) == sorted(ODD_NAMES)
    capsys.readouterr()
    assert main(["--verify", str(out)]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------- --verify


def test_verify_clean_then_names_every_changed_missing_or_truncated_file(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    paths = _jpeg_folder(src, 3)
    (src / "c" / "cmyk.jpg").write_bytes(FORMATS["jpeg_cmyk"][1]())  # gives a normalised PNG
    assert main([str(src), str(out)]) == 0
    capsys.readouterr()
    assert main(["--verify", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["files", "checked", "ok", "changed", "missing"]
    assert table[2].split() == ["inputs", "4", "4", "0", "0"]
    assert table[3].split() == ["artefacts", "4", "4", "0", "0"]  # labels, files, sizes, the PNG

    paths[0].write_bytes(paths[0].read_bytes()[:-1] + b"\0")  # same length, other content
    paths[1].unlink()
    labels = out / "train_labels.npy"
    labels.write_bytes(labels.read_bytes()[:-8])
    png = next((out / "normalised" / "train").iterdir())
    png.unlink()
    assert main(["--verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert sorted(err[:-1]) == sorted([
        f"verify: changed: '{paths[0]}' (sha256 differs from the manifest)",
        f"verify: missing: '{paths[1]}' (No such file or directory)",
        f"verify: changed: '{labels}' ({labels.stat().st_size} bytes, "
        f"{labels.stat().st_size + 8} when converted)",
        f"verify: missing: '{png}' (No such file or directory)",
    ])
    assert err[-1].startswith("verify: 4 file(s) differ") and "re-run tools.convert" in err[-1]


def test_verify_of_a_directory_not_written_by_convert(tmp_path, capsys):
    assert main(["--verify", str(tmp_path)]) == 2
    _one_line(2, capsys.readouterr().err, str(tmp_path), "not a dataset directory")


# ---------------------------------------------------------------- dataset files damaged later


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A folder dataset and an array (IDX) dataset, both with .beton files, converted once;
    each test damages a fresh copy."""
    pytest.importorskip("ffcv")
    from tests.tools.test_convert import write_idx_dir

    root = tmp_path_factory.mktemp("converted")
    _jpeg_folder(root / "folder_src", 8)
    convert(root / "folder_src", root / "folder", to="ffcv", workers=1)
    write_idx_dir(root / "array_src", gz=False, n_train=8, n_test=4, side=SIDE)
    convert(root / "array_src", root / "array", to="ffcv", workers=1)
    return root


def _copy(converted: Path, kind: str, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(converted / f"{kind}_src", tmp_path / f"{kind}_src")
    out = tmp_path / kind
    shutil.copytree(converted / kind, out)
    if kind == "folder":  # point the copy's file list at the copied sources
        from pipelines.sources import write_file_list

        files = open_dataset(converted / kind).split("train").files
        write_file_list(out / "train_files.nul",
                        [f.replace(str(converted), str(tmp_path)) for f in files])
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["artefacts"]["train_files.nul"]["bytes"] = (out / "train_files.nul").stat().st_size
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _damage(path: Path, how: str) -> None:
    if how == "removed":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _first_batch(backend: str, out: Path) -> None:
    from pipelines.loader import build_loader

    split = open_dataset(out).split("train")
    ld = build_loader(backend, split, IDENTITY, batch_size=4, num_workers=1, shuffle=False)
    next(iter(ld))


# (dataset kind, damaged file, backends that read that file)
DAMAGE = [
    ("array", "train_labels.npy", ("torchvision", "dali", "ffcv")),
    ("array", "train_images.npy", ("torchvision", "dali", "ffcv")),
    ("array", "train.beton", ("ffcv",)),
    ("folder", "train_labels.npy", ("torchvision", "dali", "ffcv")),
    ("folder", "train_files.nul", ("torchvision", "dali", "ffcv")),
    ("folder", "train_sizes.npy", ("torchvision", "dali", "ffcv")),
    ("folder", "image", ("torchvision", "dali")),
    ("folder", "train.beton", ("ffcv",)),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["removed", "truncated"])
@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
@pytest.mark.parametrize("kind,target,readers", DAMAGE, ids=[f"{k}-{t}" for k, t, _ in DAMAGE])
def test_damaged_dataset_file_is_one_line_naming_it(converted, tmp_path, kind, target, readers,
                                                    backend, how):
    if backend not in readers:
        pytest.skip(f"the {backend} loader does not read {target}")
    _backend(backend)
    out = _copy(converted, kind, tmp_path)
    path = Path(open_dataset(out).split("train").files[2]) if target == "image" else out / target
    _damage(path, how)
    with pytest.raises(DatasetError) as info:
        _first_batch(backend, out)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message, message
    assert "tools.convert" in message  # the fix


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_undecodable_image_of_the_converted_length_is_named(converted, tmp_path, backend):
    """DALI's own decode error names no file: the loader finds and names it."""
    _backend(backend)
    out = _copy(converted, "folder", tmp_path)
    path = Path(open_dataset(out).split("train").files[2])
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    with pytest.raises(DatasetError) as info:
        _first_batch(backend, out)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and f"cannot decode image '{path}'" in message, message


@pytest.mark.timeout(120)
def test_evaluation_views_of_a_removed_image_are_one_line_naming_it(converted, tmp_path):
    """The kNN monitor and linear evaluation read files through their own DataLoader."""
    from train.features import eval_views

    out = _copy(converted, "folder", tmp_path)
    split = open_dataset(out).split("train")
    Path(split.files[5]).unlink()
    with pytest.raises(DatasetError) as info:
        list(eval_views(split, IDENTITY, np.arange(len(split)), batch_size=4, num_workers=1))
    message = str(info.value)
    assert (len(message.splitlines()) == 1
            and f"'{split.files[5]}' is unreadable" in message), message


def test_header_sizes_of_jpeg_and_png():
    """The DALI host read's and the FFCV writer's fallback for splits without recorded sizes (PNG
    raised before)."""
    from pipelines.formats import image_size

    for make in (FORMATS["jpeg_rgb"][1], FORMATS["png_rgb8"][1], FORMATS["png_named_jpg"][1]):
        assert image_size(make()) == (SIDE, SIDE)
    wide = _encoded(Image.new("RGB", (37, 11)), "PNG")
    assert image_size(wide) == (11, 37)
