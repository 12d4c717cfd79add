"""tools.convert: every input format round-trips into a dataset directory that
pipelines.sources opens; bad inputs give one-line errors; output is written atomically.

Oracles are independent of the converter: IDX and CIFAR files are written here with struct
and pickle from known arrays, pixels are computed by hand from the CHW row layout, the real
Fashion-MNIST is compared with torchvision's own IDX reader, checksums with hashlib.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipelines.dataset_writer as convert_mod
from pipelines.dataset_readers import ConvertError
from pipelines.dataset_writer import convert
from pipelines.formats import FASHION_MNIST_CLASSES, FormatError, read_cifar_pickle, read_idx
from pipelines.sources import open_dataset
from tools.benchmark import default_images
from tools.convert import main

REPO = Path(__file__).resolve().parents[2]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_SAMPLE = default_images()


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0x0000, type 0x08, rank, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(root: Path, gz: bool, n_train=7, n_test=3, side=5,
                  seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, rank in (("images", 3), ("labels", 1)):
            data = idx_bytes(arrays[f"{prefix}-{kind}"])
            name = f"{prefix}-{kind}-idx{rank}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
            else:
                (root / name).write_bytes(data)
    return arrays


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("convert: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def jpeg_bytes(seed: int, side: int = 16, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path, gz):
    src = tmp_path / "mnist-like"
    arrays = write_idx_dir(src, gz)
    for stem, array in arrays.items():
        rank = 3 if "images" in stem else 1
        path = next(src.glob(f"{stem}-idx{rank}-ubyte*"))
        np.testing.assert_array_equal(read_idx(path), array)

    manifest = convert(src, tmp_path / "out", workers=1)
    ds = open_dataset(tmp_path / "out")
    assert ds.kind == "array" and set(ds.splits) == {"train", "test"}
    assert ds.classes == tuple(str(d) for d in range(10))  # no "fashion" anywhere: digits
    for split, prefix in (("train", "train"), ("test", "t10k")):
        s = ds.split(split)
        assert s.images.shape == (len(arrays[f"{prefix}-labels"]), 5, 5, 1)
        np.testing.assert_array_equal(s.images[..., 0], arrays[f"{prefix}-images"])
        np.testing.assert_array_equal(s.labels, arrays[f"{prefix}-labels"])
        assert s.labels.dtype == np.int64
        assert manifest["splits"][split]["image_shape"] == [5, 5, 1]
        assert manifest["splits"][split]["count"] == len(s)
    assert manifest["source_format"] == "idx" and manifest["tool"] == "tools.convert"
    assert manifest["format_version"] == 2 and manifest["source"] == str(src)
    for rel, digest in manifest["inputs"].items():
        assert hashlib.sha256((src / rel).read_bytes()).hexdigest() == digest
    assert len(manifest["inputs"]) == 4
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_idx_fashion_class_names_from_name(tmp_path):
    write_idx_dir(tmp_path / "src", gz=False)
    manifest = convert(tmp_path / "src", tmp_path / "out", name="fashion-mnist")
    assert (manifest["classes"] == list(FASHION_MNIST_CLASSES)
            and manifest["name"] == "fashion-mnist")


def test_truncated_idx_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "src"
    write_idx_dir(src, gz=False)
    header = struct.pack(">HBBIII", 0, 0x08, 3, 60000, 28, 28)
    (src / "train-images-idx3-ubyte").write_bytes(header + bytes(1000))
    code, out, err = run_main([src, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "train-images-idx3-ubyte",
                          "expected 47040000 bytes of pixels, found 1000")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_truncated_gzip_and_bad_magic(tmp_path, capsys):
    src = tmp_path / "src"
    write_idx_dir(src, gz=True, n_train=200, side=28)
    path = src / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    code, _, err = run_main([src, tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "train-images-idx3-ubyte.gz", "truncated")

    bad = tmp_path / "bad-labels-idx1-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(FormatError, match="bad IDX magic number 0x12340801"):
        read_idx(bad)


def test_cli_entry_point_exit_code(tmp_path):
    src = tmp_path / "src"
    write_idx_dir(src, gz=False)
    (src / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 0x08, 1, 3) + b"\x01")
    proc = subprocess.run([sys.executable, "-m", "tools.convert", str(src), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"convert: error: '{src / 't10k-labels-idx1-ubyte'}': expected 3 bytes of values, found 1 "
        "(header shape [3]): re-download the file"
    ]


@pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                    reason=f"{FASHION_MNIST} absent (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    manifest = convert(FASHION_MNIST, tmp_path / "fmnist")
    ds = open_dataset(tmp_path / "fmnist")
    train, test = ds.split("train"), ds.split("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert ds.classes == FASHION_MNIST_CLASSES
    for rel, digest in manifest["inputs"].items():
        assert hashlib.sha256((FASHION_MNIST / rel).read_bytes()).hexdigest() == digest

    # torchvision's reader takes uncompressed files; compare a spread of images and all labels.
    for split, prefix in ((test, "t10k"), (train, "train")):
        raw = {}
        for kind, rank in (("images", 3), ("labels", 1)):
            path = tmp_path / f"{prefix}-{kind}-idx{rank}-ubyte"
            path.write_bytes(gzip.decompress((FASHION_MNIST / f"{path.name}.gz").read_bytes()))
            raw[kind] = path
        ref_images = read_image_file(str(raw["images"])).numpy()
        ref_labels = read_label_file(str(raw["labels"])).numpy()
        picks = np.linspace(0, len(split) - 1, 50).astype(int)
        np.testing.assert_array_equal(split.images[picks, :, :, 0], ref_images[picks])
        np.testing.assert_array_equal(split.labels, ref_labels)


# ---------------------------------------------------------------- CIFAR


def dump_legacy_pickle(obj, path: Path) -> None:
    """Protocol 2 with numpy's pre-2.0 module names, as the published CIFAR pickles have."""
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"numpy._core.", b"numpy.core."))


def fake_cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def hand_pixel(rows: np.ndarray, i: int, y: int, x: int, c: int) -> int:
    # CIFAR rows: 1024 red values, then 1024 green, then 1024 blue, each plane row-major.
    return int(rows[i, c * 1024 + y * 32 + x])


def test_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    dump_legacy_pickle({b"label_names": names, b"num_cases_per_batch": 4, b"num_vis": 3072},
                       src / "batches.meta")
    batches = []
    for i in range(1, 6):
        rows, labels = fake_cifar_rows(rng, 4), rng.integers(0, 10, 4).tolist()
        batches.append((rows, labels))
        dump_legacy_pickle({b"batch_label": b"training batch", b"labels": labels, b"data": rows,
                            b"filenames": [b"x.png"] * 4}, src / f"data_batch_{i}")
    test_rows, test_labels = fake_cifar_rows(rng, 3), [9, 0, 5]
    (src / "test_batch").write_bytes(pickle.dumps({b"labels": test_labels, b"data": test_rows},
                                                  protocol=5))

    # SRC may be the folder holding the extracted archive
    manifest = convert(tmp_path, tmp_path / "out")
    assert manifest["name"] == "cifar-10" and manifest["source_format"] == "cifar"
    ds = open_dataset(tmp_path / "out")
    assert ds.classes == tuple(n.decode() for n in names)
    train, test = ds.split("train"), ds.split("test")
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
    all_rows = np.concatenate([r for r, _ in batches])
    np.testing.assert_array_equal(train.labels, sum((lab for _, lab in batches), []))
    np.testing.assert_array_equal(test.labels, test_labels)
    assert train.images[13, 2, 30, 1] == hand_pixel(all_rows, 13, 2, 30, 1)
    assert test.images[2, 31, 0, 2] == hand_pixel(test_rows, 2, 31, 0, 2)
    for i, y, x, c in rng.integers(0, [20, 32, 32, 3], (200, 4)):
        assert train.images[i, y, x, c] == hand_pixel(all_rows, i, y, x, c)
    assert sorted(manifest["inputs"]) == sorted(
        [f"cifar-10-batches-py/{n}"
         for n in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]])
    assert manifest["inputs"]["cifar-10-batches-py/test_batch"] == hashlib.sha256(
        (src / "test_batch").read_bytes()).hexdigest()


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    fine = [f"class{i:02d}".encode() for i in range(100)]
    dump_legacy_pickle({b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20},
                       src / "meta")
    rows = {"train": fake_cifar_rows(rng, 6), "test": fake_cifar_rows(rng, 2)}
    fine_labels = {"train": [99, 0, 42, 7, 7, 63], "test": [5, 98]}
    for split in ("train", "test"):
        dump_legacy_pickle({b"data": rows[split], b"fine_labels": fine_labels[split],
                            b"coarse_labels": [1] * len(fine_labels[split])}, src / split)

    manifest = convert(src, tmp_path / "out", fmt="cifar")
    ds = open_dataset(tmp_path / "out")
    assert (manifest["name"] == "cifar-100" and len(ds.classes) == 100
            and ds.classes[42] == "class42")
    for split in ("train", "test"):
        s = ds.split(split)
        np.testing.assert_array_equal(s.labels, fine_labels[split])
        assert s.images[-1, 10, 20, 0] == hand_pixel(rows[split], len(s) - 1, 10, 20, 0)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(FormatError, match="refusing to load"):
        read_cifar_pickle(path)


# ---------------------------------------------------------------- folders


def test_imagenet_layout_skips_corrupt_images(tmp_path, capsys):
    src = tmp_path / "imagenet"
    for split, per_class in (("train", 3), ("val", 1)):
        for c, cls in enumerate(("n02_dog", "n01_cat")):
            (src / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (src / split / cls / f"{split}_{i}.JPEG").write_bytes(
                    jpeg_bytes(100 * c + i + len(split)))
    Image.new("RGB", (9, 7), (200, 10, 10)).save(src / "train" / "n01_cat" / "extra.png")
    (src / "train" / "n01_cat" / "corrupt.JPEG").write_bytes(np.random.default_rng(3).bytes(2000))
    whole = jpeg_bytes(7, side=64)
    (src / "train" / "n02_dog" / "truncated.JPEG").write_bytes(whole[: len(whole) * 6 // 10])
    (src / "train" / "n02_dog" / "notes.txt").write_text("not an image")

    code, out, err = run_main([src, tmp_path / "out", "--workers", "1"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ds = open_dataset(tmp_path / "out")
    assert ds.kind == "files" and ds.classes == ("n01_cat", "n02_dog")  # sorted train folders
    train, val = ds.split("train"), ds.split("val")
    assert len(train) == 7 and len(val) == 2
    for s in (train, val):
        for path, label in zip(s.files, s.labels, strict=True):
            assert Path(path).is_absolute() and Path(path).is_file()
            assert Path(path).parent.name == ds.classes[label]
    assert str(src / "train" / "n01_cat" / "extra.png") in train.files
    assert {s["path"] for s in manifest["skipped"]} == {"train/n01_cat/corrupt.JPEG",
                                                        "train/n02_dog/truncated.JPEG"}
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "truncated" in reasons["train/n02_dog/truncated.JPEG"]
    assert manifest["splits"]["train"]["skipped"] == 2 and manifest["splits"]["val"]["skipped"] == 0
    assert manifest["splits"]["train"]["class_counts"] == [4, 3]
    assert manifest["splits"]["train"]["image_shape"] is None
    # every file read is checksummed, skipped ones included; the .txt is not an input
    assert len(manifest["inputs"]) == 11 and "train/n02_dog/notes.txt" not in manifest["inputs"]
    corrupt = src / "train" / "n01_cat" / "corrupt.JPEG"
    assert manifest["inputs"]["train/n01_cat/corrupt.JPEG"] == hashlib.sha256(
        corrupt.read_bytes()).hexdigest()
    table = out.splitlines()
    assert table[0].split() == ["split", "count", "skipped", "shape", "classes"]
    assert table[2].split() == ["train", "7", "2", "files", "2"]
    assert table[3].split() == ["val", "2", "0", "files", "2"]
    assert str(tmp_path / "out") in out


def test_class_folders_without_split_dirs(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        (tmp_path / "src" / cls / "0.jpg").write_bytes(jpeg_bytes(ord(cls)))
    (tmp_path / "src" / "empty").mkdir()
    manifest = convert(tmp_path / "src", tmp_path / "out", workers=1)
    assert manifest["classes"] == ["a", "b"] and list(manifest["splits"]) == ["train"]
    np.testing.assert_array_equal(open_dataset(tmp_path / "out").split("train").labels, [0, 1])


def test_raw_val_folder_is_unlabelled_and_foreign_classes_refused(tmp_path, capsys):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / "train" / cls).mkdir(parents=True)
        (src / "train" / cls / "0.jpg").write_bytes(jpeg_bytes(ord(cls)))
    (src / "val").mkdir()
    for i in range(2):
        (src / "val" / f"ILSVRC2012_val_{i}.JPEG").write_bytes(jpeg_bytes(i))
    manifest = convert(src, tmp_path / "out", workers=1)
    val = open_dataset(tmp_path / "out").split("val")
    assert ((val.labels == -1).all() and len(val) == 2
            and manifest["splits"]["val"]["labelled"] is False)

    (src / "val" / "zebra").mkdir()
    (src / "val" / "zebra" / "z.jpg").write_bytes(jpeg_bytes(9))
    code, _, err = run_main([src, tmp_path / "out2"], capsys)
    assert_one_line_error(code, err, "class folders that train/ lacks: zebra")


def imagenet_sample_subset(dst: Path, n: int = 20) -> tuple[list[str], str]:
    """Copy n sample JPEGs, at least one of them grayscale; return names and a grayscale one."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"imagenet-sample not found at {IMAGENET_SAMPLE} (set SIMCLR_IMAGENET_SAMPLE)")
    jpegs = sorted(p for p in IMAGENET_SAMPLE.iterdir() if p.suffix == ".JPEG")
    gray = next(p for p in jpegs if Image.open(p).mode == "L")  # header only: cheap
    picked = [gray] + [p for p in jpegs[:: max(1, len(jpegs) // n)] if p != gray][: n - 1]
    dst.mkdir()
    for p in picked:
        shutil.copy(p, dst / p.name)
    return sorted(p.name for p in picked), gray.name


def test_flat_imagenet_sample_unlabelled(tmp_path):
    names, gray = imagenet_sample_subset(tmp_path / "sample")
    manifest = convert(tmp_path / "sample", tmp_path / "out", workers=2)  # 2 workers: the pool path
    ds = open_dataset(tmp_path / "out")
    train = ds.split("train")
    assert ds.classes == () and manifest["classes"] == []
    assert train.files == [str(tmp_path / "sample" / n) for n in names]
    assert (train.labels == -1).all() and train.labels.dtype == np.int64
    assert manifest["splits"]["train"]["modes"]["L"] >= 1 and manifest["skipped"] == []
    assert manifest["splits"]["train"]["labelled"] is False
    assert manifest["inputs"][gray] == hashlib.sha256(
        (tmp_path / "sample" / gray).read_bytes()).hexdigest()
    assert sorted(manifest["inputs"]) == names


# ---------------------------------------------------------------- output handling


def test_out_exists_refused_then_overwritten(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_idx_dir(src, gz=False, seed=1)
    assert run_main([src, out], capsys)[0] == 0
    before = (out / "manifest.json").read_bytes()

    code, _, err = run_main([src, out], capsys)
    assert_one_line_error(code, err, str(out), "already exists", "--overwrite")
    assert (out / "manifest.json").read_bytes() == before

    arrays = write_idx_dir(src, gz=False, n_train=4, seed=2)
    code, _, err = run_main([src, out, "--overwrite"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(open_dataset(out).split("train").images[..., 0],
                                  arrays["train-images"])
    assert no_leftovers(tmp_path)

    stranger = tmp_path / "stranger"
    (stranger / "keep").mkdir(parents=True)
    code, _, err = run_main([src, stranger, "--overwrite"], capsys)
    assert_one_line_error(code, err, "not a converted dataset")
    assert (stranger / "keep").is_dir()


def test_failure_midway_leaves_no_partial_out(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_idx_dir(src, gz=False)
    real_save = np.save
    calls = []

    def failing_save(path, array, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # after two artefacts are on disk
            raise OSError(28, "No space left on device", str(path))
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(convert_mod.np, "save", failing_save)
    with pytest.raises(OSError):
        convert(src, out)
    assert not out.exists() and no_leftovers(tmp_path)

    # the same failure during --overwrite keeps the old dataset intact
    monkeypatch.setattr(convert_mod.np, "save", real_save)
    convert(src, out)
    before = (out / "manifest.json").read_text()
    calls.clear()
    monkeypatch.setattr(convert_mod.np, "save", failing_save)
    with pytest.raises(OSError):
        convert(src, out, overwrite=True)
    assert (out / "manifest.json").read_text() == before and no_leftovers(tmp_path)


def test_to_ffcv_calls_write_beton_per_split(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_idx_dir(src, gz=False)
    calls = []

    def fake_write_beton(split, path, *, max_resolution=None):
        calls.append((split.name, len(split), Path(path), max_resolution))
        Path(path).write_bytes(b"beton")

    monkeypatch.setitem(sys.modules, "pipelines.ffcv_writer",
                        types.SimpleNamespace(write_beton=fake_write_beton))
    code = main([str(src), str(out), "--to", "ffcv", "--max-resolution", "64"])
    assert code == 0
    assert [(name, n, mr) for name, n, _, mr in calls] == [("train", 7, 64), ("test", 3, 64)]
    for name, _, path, _ in calls:
        assert path.name == f"{name}.beton"
        assert path.parent.parent == tmp_path and path.parent != out  # written before the rename
        assert (out / f"{name}.beton").read_bytes() == b"beton"
        open_dataset(out).beton(name)
    assert "train.beton" in json.loads((out / "manifest.json").read_text())["artefacts"]


def test_to_ffcv_without_ffcv_writer(tmp_path, monkeypatch, capsys):
    write_idx_dir(tmp_path / "src", gz=False)
    monkeypatch.setitem(sys.modules, "pipelines.ffcv_writer", None)  # makes the import fail
    code, _, err = run_main([tmp_path / "src", tmp_path / "out", "--to", "ffcv"], capsys)
    assert_one_line_error(code, err, "pipelines.ffcv_writer", "--to numpy")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "does not exist"),
    ("unknown", "unrecognised dataset format"),
    ("no_images", "no images found"),
])
def test_input_errors(tmp_path, capsys, setup, fragment):
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
        (src / "README.txt").write_text("hello")
    args = [src, tmp_path / "out"] + (["--format", "folder"] if setup == "no_images" else [])
    code, _, err = run_main(args, capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_max_resolution_needs_ffcv(tmp_path, capsys):
    code, _, err = run_main([tmp_path, tmp_path / "out", "--max-resolution", "256"], capsys)
    assert_one_line_error(code, err, "--to ffcv")


def test_convert_raises_typed_error(tmp_path):
    with pytest.raises(ConvertError, match="unknown format"):
        convert(tmp_path, tmp_path / "out", fmt="tfrecord")


def _gone(pid: int) -> bool:
    """Whether `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_killed_parent():
    """The conversion's workers (the readers' pool, FFCV's writer) call die_with_parent: a
    SIGKILLed conversion used to leave them running, holding their memory."""
    import textwrap
    import time

    code = textwrap.dedent("""
        import multiprocessing, os, time
        from train.atomic import die_with_parent

        def work(parent):
            die_with_parent(parent)
            time.sleep(120)

        if __name__ == "__main__":
            child = multiprocessing.get_context("fork").Process(target=work, args=(os.getpid(),))
            child.start()
            print(child.pid, flush=True)
            time.sleep(1.0)
            os.kill(os.getpid(), 9)
    """)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr[-2000:]
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 15
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"worker {child} outlived its SIGKILLed parent"


def test_convert_removes_the_temporaries_of_conversions_that_no_longer_run(tmp_path):
    """A SIGKILLed conversion leaves `.OUT.tmp-<pid>-*` behind: the next conversion beside it
    deletes those of dead processes and keeps those of live ones (another conversion's)."""
    from tests.fashion_mnist import make_subset

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = tmp_path / f".fashion-mnist.tmp-{ended.pid}-0badf00d"
    live = tmp_path / f".fashion-mnist.tmp-{os.getpid()}-0badf00d"
    for d in (stale, live):
        d.mkdir()
        (d / "train_images.npy").write_bytes(b"\0" * 4096)
    out = make_subset(tmp_path, 64, 32)
    assert (out / "manifest.json").is_file()
    assert not stale.exists() and live.exists()
