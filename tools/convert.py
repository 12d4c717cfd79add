"""Convert a raw image dataset into a dataset directory that every loader backend reads.

    python -m tools.convert /usr/share/datasets/fashion-mnist data/fashion-mnist
    python -m tools.convert ~/cifar-10-batches-py data/cifar10
    python -m tools.convert /data/imagenet data/imagenet --workers 8 --to ffcv --max-resolution 256

Inputs (--format auto detects them from SRC):
    idx     MNIST / Fashion-MNIST: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] -> train, test
    cifar   cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta) or
            cifar-100-python (train, test, meta; fine labels) -> train, test
    folder  image folders: SRC/train/<class>/*, SRC/val/<class>/* -> train, val;
            SRC/<class>/* -> train; SRC/*.jpg -> train, unlabelled (label -1);
            loose images inside train/ or val/ are unlabelled too (raw ImageNet val).
            Files named *.jpg, *.jpeg, *.png, *.bmp, *.gif, *.tif, *.tiff, *.webp (any case).

The output layout is described in pipelines/sources.py. Every folder image is fully decoded
first; unreadable ones are skipped and listed in the manifest, never abort the run. 8-bit RGB or
grayscale JPEGs and PNGs are used in place; every other image (16-bit, CMYK, palette, alpha,
EXIF-rotated, BMP, GIF, TIFF, WebP) is decoded once by `pipelines.formats.decode_rgb` and stored
as a lossless 8-bit RGB PNG in the dataset directory, so that every backend sees the same pixels.
The output is built in a temporary directory next to OUT and renamed into place only when
complete; the manifest records the sha256 of every input and artefact.

    python -m tools.convert --verify data/imagenet    # re-hash inputs and artefacts
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.formats import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    IMAGE_SUFFIXES,
    FormatError,
    ImageCheck,
    cifar_rows_to_hwc,
    decode_rgb,
    inspect_image,
    is_image,
    read_cifar_pickle,
    read_idx,
    sha256_file,
)
from pipelines.sources import (
    FORMAT_VERSION,
    MANIFEST,
    BetonWriteError,
    DatasetError,
    beton_file,
    open_dataset,
    show_path,
    write_file_list,
)
from train.atomic import exchange
from train.cli import at_least

TOOL = "tools.convert"  # the manifest's "tool": --overwrite replaces only what this tool wrote
FORMATS = ("auto", "idx", "cifar", "folder")
TARGETS = ("numpy", "ffcv")
IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
IDX_SPLITS = {"train": "train", "t10k": "test"}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class ConvertError(ValueError):
    """A problem the user can fix; printed as one line `convert: error: <problem>: <fix>`."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}: {fix}")


@dataclass
class SplitData:
    """One converted split before it is written: an image array or a list of files."""

    labels: np.ndarray  # int64 [N], -1 where unlabelled
    images: np.ndarray | None = None  # uint8 [N, H, W, C]
    files: list[str] | None = None  # absolute paths
    plain: list[bool] | None = None  # per file: used in place (else normalised to a PNG)
    sizes: list[tuple[int, int, int]] | None = None  # per file: height, width, bytes
    extra: dict = field(default_factory=dict)  # more manifest fields for this split


@dataclass
class Converted:
    """Everything a reader produced, ready for `write_dataset`."""

    source_format: str
    name: str
    kind: str  # "array" | "files"
    classes: list[str]
    splits: dict[str, SplitData]
    inputs: dict[str, str]  # path relative to SRC -> sha256
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- format detection


def _idx_files(src: Path) -> dict[tuple[str, str], Path]:
    """{(split, "images"|"labels"): path}, preferring the uncompressed copy when both exist."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(src.iterdir(), key=lambda p: p.name.endswith(".gz")):
        m = IDX_NAME.match(path.name)
        if m and path.is_file():
            found.setdefault((IDX_SPLITS[m.group(1)], m.group(2)), path)
    return found


def _cifar_root(src: Path) -> Path | None:
    """The directory holding the CIFAR pickles: SRC itself or its extracted-archive child."""
    for root in (src, src / "cifar-10-batches-py", src / "cifar-100-python"):
        if (root / "batches.meta").is_file() or all((root / n).is_file()
                                                    for n in ("train", "test", "meta")):
            return root
    return None


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_format(src: Path) -> str:
    if _idx_files(src):
        return "idx"
    if _cifar_root(src) is not None:
        return "cifar"
    if any(is_image(p) for p in src.iterdir()) or any(
        is_image(p) for d in _visible_dirs(src) for p in d.rglob("*")
    ):
        return "folder"
    raise ConvertError(
        f"unrecognised dataset format in '{src}' (no IDX files, CIFAR pickles or images)",
        "point SRC at the directory holding the files, or pass --format idx|cifar|folder",
    )


# ---------------------------------------------------------------- readers


def _idx_classes(src: Path, name: str | None) -> list[str]:
    fashion = "fashion" in (name or "").lower() or "fashion" in src.name.lower()
    return list(FASHION_MNIST_CLASSES if fashion else DIGIT_CLASSES)


def _check_labels(labels: np.ndarray, n_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ConvertError(f"{where}: labels span {labels.min()}..{labels.max()}, expected "
                           f"0..{n_classes - 1}", "check that SRC holds the dataset you meant")
    return labels


def _class_counts(labels: np.ndarray, n_classes: int) -> list[int]:
    return np.bincount(labels[labels >= 0], minlength=n_classes).tolist()


def _array_extra(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    # Per-channel statistics in [0, 1], for normalisation. Exact integer sums, in blocks so that
    # no float copy of the whole array is made.
    channels = images.shape[-1]
    total, total_sq = np.zeros(channels, np.uint64), np.zeros(channels, np.uint64)
    for start in range(0, len(images), 4096):
        block = images[start:start + 4096].reshape(-1, channels).astype(np.uint32)
        total += block.sum(axis=0, dtype=np.uint64)
        total_sq += (block * block).sum(axis=0, dtype=np.uint64)
    n = max(images[..., 0].size, 1)
    mean = total / n / 255.0
    std = np.sqrt(np.maximum(total_sq / n / 255.0**2 - mean**2, 0.0))
    return {"class_counts": _class_counts(labels, n_classes),
            "pixel_mean": [round(float(v), 6) for v in mean],
            "pixel_std": [round(float(v), 6) for v in std]}


def read_idx_dataset(src: Path, name: str | None) -> Converted:
    found = _idx_files(src)
    classes = _idx_classes(src, name)
    splits, inputs = {}, {}
    for split in ("train", "test"):
        pair = [found.get((split, part)) for part in ("images", "labels")]
        if not any(pair):
            continue
        if not all(pair):
            have = next(p for p in pair if p)
            missing = "labels" if pair[1] is None else "images"
            raise ConvertError(f"'{have.name}' has no matching {missing} file in '{src}'",
                               f"add the {split} {missing} IDX file next to it")
        images, labels = (read_idx(p) for p in pair)
        if images.ndim == 3:
            images = images[..., None]  # [N, H, W] -> [N, H, W, 1]
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise ConvertError(f"'{pair[0]}': IDX images have shape {list(images.shape)} and "
                               f"dtype {images.dtype}, expected uint8 [N, H, W]", "check the file")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ConvertError(f"'{pair[1]}': {labels.shape[0]} labels for {len(images)} images "
                               f"in '{pair[0].name}'", "use images and labels of the same release")
        labels = _check_labels(labels, len(classes), f"'{pair[1]}'")
        splits[split] = SplitData(labels, images=images,
                                  extra=_array_extra(images, labels, len(classes)))
        for p in pair:
            inputs[p.name] = sha256_file(p)
    if not splits:
        raise ConvertError(f"no IDX files in '{src}'",
                           "expected train-images-idx3-ubyte[.gz] and friends")
    return Converted("idx", name or src.name, "array", classes, splits, inputs)


def _need(root: Path, names: tuple[str, ...]) -> list[Path]:
    paths = [root / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConvertError(f"CIFAR directory '{root}' lacks {', '.join(missing)}",
                           "re-extract the complete CIFAR python archive")
    return paths


def _cifar_split(paths: list[Path], label_key: str, n_classes: int) -> SplitData:
    rows, labels = [], []
    for path in paths:
        batch = read_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ConvertError(f"'{path}': pickle has keys {sorted(batch)}, expected 'data' and "
                               f"'{label_key}'", "re-extract the CIFAR python archive")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ConvertError(f"'{path}': data is {data.dtype} {list(data.shape)}, expected "
                               f"uint8 [N, 3072]", "re-extract the CIFAR python archive")
        if len(batch[label_key]) != len(data):
            raise ConvertError(f"'{path}': {len(batch[label_key])} labels for {len(data)} images",
                               "re-extract the CIFAR python archive")
        rows.append(data)
        labels.append(_check_labels(batch[label_key], n_classes, f"'{path}'"))
    images = cifar_rows_to_hwc(np.concatenate(rows))  # [N, 32, 32, 3]
    labels_all = np.concatenate(labels)
    return SplitData(labels_all, images=images, extra=_array_extra(images, labels_all, n_classes))


def _names(meta: dict, key: str, path: Path) -> list[str]:
    if key not in meta:
        raise ConvertError(f"'{path}': no '{key}' entry", "re-extract the CIFAR python archive")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def read_cifar_dataset(src: Path, name: str | None) -> Converted:
    root = _cifar_root(src)
    if root is None:
        raise ConvertError(f"no CIFAR pickles in '{src}' (want data_batch_1..5, test_batch, "
                           f"batches.meta or train, test, meta)",
                           "point SRC at cifar-10-batches-py or cifar-100-python")
    if (root / "batches.meta").is_file():
        default_name, label_key, meta_key = "cifar-10", "labels", "label_names"
        meta_path, *train = _need(root, ("batches.meta",) + CIFAR10_TRAIN)
        test = _need(root, ("test_batch",))
    else:
        default_name, label_key, meta_key = "cifar-100", "fine_labels", "fine_label_names"
        meta_path, train_path, test_path = _need(root, ("meta", "train", "test"))
        train, test = [train_path], [test_path]
    classes = _names(read_cifar_pickle(meta_path), meta_key, meta_path)
    splits = {"train": _cifar_split(train, label_key, len(classes)),
              "test": _cifar_split(test, label_key, len(classes))}
    inputs = {str(p.relative_to(src)): sha256_file(p) for p in [meta_path, *train, *test]}
    return Converted("cifar", name or default_name, "array", classes, splits, inputs)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image(p) and p.is_file())


def _class_images(root: Path) -> dict[str, list[Path]]:
    """{class folder name: the images anywhere under it}, for sub-folders of root holding images."""
    found = {d.name: sorted(p for p in d.rglob("*") if is_image(p) and p.is_file())
             for d in _visible_dirs(root)}
    return {name: paths for name, paths in found.items() if paths}


def _folder_layout(src: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(classes, {split: [(path, label)]}) for the three folder layouts, in a stable order."""
    if (src / "train").is_dir():  # ImageNet: train/<class>/*, val/<class>/* (and test/ if there)
        classes = sorted(_class_images(src / "train"))
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for split in ("train", "val", "test"):
            if not (src / split).is_dir():
                continue
            by_class = _class_images(src / split)
            unknown = sorted(set(by_class) - set(index))
            if unknown:
                raise ConvertError(f"'{src / split}' has class folders that train/ lacks: "
                                   f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}",
                                   "give every split the same class folders as train/")
            items = [(p, index[c]) for c in classes for p in by_class.get(c, ())]
            # loose images (raw ImageNet val keeps its labels elsewhere) are unlabelled
            splits[split] = items + [(p, -1) for p in _images_in(src / split)]
        return classes, splits
    by_class = _class_images(src)
    if by_class:  # SRC/<class>/*; folders without images are not classes
        classes = sorted(by_class)
        return classes, {"train": [(p, i) for i, c in enumerate(classes) for p in by_class[c]]}
    return [], {"train": [(p, -1) for p in _images_in(src)]}


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how Pool.terminate() stops a worker


def _map(fn, items: list, workers: int, desc: str) -> list:
    """[fn(item) for item in items], in `workers` processes where that pays.

    A multiprocessing.Pool replaces a worker killed by a signal (the OOM killer, say) and waits
    forever for the task it lost; a ProcessPoolExecutor raises BrokenProcessPool instead.
    """
    bar = dict(total=len(items), desc=desc, unit="img", disable=None, leave=False)
    if workers <= 1 or len(items) < 2 * workers:
        return [fn(p) for p in tqdm(items, **bar)]
    chunk = max(1, min(64, len(items) // (workers * 8)))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                               initializer=_quiet_worker)
    try:
        return list(tqdm(pool.map(fn, items, chunksize=chunk), **bar))
    except BrokenProcessPool:
        raise ConvertError(f"a process {desc} died (killed by a signal: out of memory?)",
                           "convert again, with fewer --workers if memory is short") from None
    finally:
        for process in list((pool._processes or {}).values()):  # Ctrl-C: stop mid-task ones too
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def read_folder_dataset(src: Path, name: str | None, workers: int) -> Converted:
    classes, layout = _folder_layout(src)
    if not any(layout.values()):
        raise ConvertError(f"no images found in '{src}' "
                           f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                           "point SRC at a folder of images, class folders or train/ and val/")
    splits, inputs, skipped = {}, {}, []
    for split, items in layout.items():
        checks: list[ImageCheck] = _map(inspect_image, [p for p, _ in items], workers,
                                         f"decoding {split}")
        good, modes, sizes, plain, dims, bad = [], Counter(), [], [], [], 0
        for (path, label), check in zip(items, checks, strict=True):
            rel = str(path.relative_to(src))
            if check.sha256 is not None:
                inputs[rel] = check.sha256
            if check.error is not None:
                skipped.append({"path": rel, "split": split, "reason": check.error})
                bad += 1
                continue
            good.append((str(path), label))
            modes[check.mode] += 1
            sizes.append(check.size)
            plain.append(check.plain)
            dims.append((check.size[1], check.size[0], check.nbytes))
        if items and not good:
            raise ConvertError(f"none of the {len(items)} images in split '{split}' of '{src}' "
                               f"decode (first: {show_path(skipped[-bad]['path'])}: "
                               f"{skipped[-bad]['reason']})",
                               "check that the files are intact images")
        labels = np.array([label for _, label in good], dtype=np.int64)
        wh = np.array(sizes or [(0, 0)])
        extra = {"skipped": bad, "modes": dict(sorted(modes.items())),
                 "normalised": plain.count(False),
                 "min_size": wh.min(axis=0).tolist(), "max_size": wh.max(axis=0).tolist()}
        if classes:
            extra["class_counts"] = _class_counts(labels, len(classes))
        splits[split] = SplitData(labels, files=[f for f, _ in good], plain=plain,
                                  sizes=dims, extra=extra)
    return Converted("folder", name or src.name, "files", classes, splits, inputs, skipped)


# ---------------------------------------------------------------- writing


NORMALISED = "normalised"


def _normalise(job: tuple[str, str]) -> tuple[int, int, int]:
    """Decode `src` with `decode_rgb` into the lossless 8-bit RGB PNG `dst`.

    Returns (height, width, bytes written)."""
    from PIL import Image

    src, dst = job
    pixels = decode_rgb(src)
    Image.fromarray(pixels).save(dst, format="PNG", compress_level=3)
    return pixels.shape[0], pixels.shape[1], os.path.getsize(dst)


def _normalise_files(data: SplitData, root: Path, split: str, workers: int) -> None:
    """Replace `data`'s files that not every backend decodes alike by PNGs under `root`."""
    todo = [k for k, plain in enumerate(data.plain) if not plain]
    if not todo:
        return
    folder = root / NORMALISED / split
    folder.mkdir(parents=True)
    rel = [f"{NORMALISED}/{split}/{k:08d}.png" for k in todo]
    jobs = [(data.files[k], str(root / r)) for k, r in zip(todo, rel, strict=True)]
    done = _map(_normalise, jobs, workers, f"normalising {split}")
    for k, r, dims in zip(todo, rel, done, strict=True):
        data.files[k], data.sizes[k] = r, dims


def artefact_records(root: Path, known: dict | None = None) -> dict[str, dict]:
    """{path relative to root: {"bytes", "sha256"}} for every file under root but the manifest;
    files already in `known` (written earlier in this conversion) keep their record unhashed."""
    records = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = path.relative_to(root).as_posix()
        records[name] = (known or {}).get(name) or {"bytes": path.stat().st_size,
                                                    "sha256": sha256_file(path)}
    return records


def write_dataset(conv: Converted, root: Path, src: Path, workers: int = 1) -> dict:
    """Write the numpy artefacts and manifest.json of `conv` into the (empty) directory `root`."""
    manifest_splits = {}
    for split, data in conv.splits.items():
        np.save(root / f"{split}_labels.npy", data.labels.astype(np.int64))
        if data.images is not None:
            np.save(root / f"{split}_images.npy", np.ascontiguousarray(data.images, dtype=np.uint8))
            shape = list(data.images.shape[1:])
        else:
            _normalise_files(data, root, split, workers)
            write_file_list(root / f"{split}_files.nul", data.files)
            sizes = np.array(data.sizes, dtype=np.int64).reshape(-1, 3)
            np.save(root / f"{split}_sizes.npy", sizes)
            shape = None
        manifest_splits[split] = {"count": len(data.labels), "image_shape": shape,
                                  "labelled": bool(len(data.labels) and (data.labels >= 0).all()),
                                  **data.extra}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": conv.name,
        "kind": conv.kind,
        "source_format": conv.source_format,
        "source": str(src),
        "classes": conv.classes,
        "splits": manifest_splits,
        "inputs": conv.inputs,
        "skipped": conv.skipped,
        "artefacts": artefact_records(root),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": TOOL,
    }
    _write_manifest(root, manifest)
    return manifest


def _write_manifest(root: Path, manifest: dict) -> None:
    # ensure_ascii (the default) keeps names with undecodable bytes (lone surrogates) writable
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _load_write_beton():
    try:
        from pipelines.ffcv_writer import write_beton
    except ImportError as e:
        raise ConvertError(f"--to ffcv needs pipelines.ffcv_writer.write_beton, which failed to "
                           f"import ({e})",
                           "install ffcv (tools/setup.sh) or use --to numpy") from None
    return write_beton


def write_betons(root: Path, manifest: dict, max_resolution: int | None) -> dict:
    write_beton = _load_write_beton()
    dataset = open_dataset(root)
    for split in tqdm(dataset.splits, desc="writing .beton", disable=None, leave=False):
        path = beton_file(root, split)
        try:
            write_beton(dataset.split(split), path, max_resolution=max_resolution)
        except BetonWriteError as e:
            raise ConvertError(f"writing {path.name} failed: {e}",
                               "fix or remove that image (or pass --max-resolution) and "
                               "convert again") from None
    manifest["artefacts"] = artefact_records(root, known=manifest["artefacts"])
    _write_manifest(root, manifest)
    return manifest




def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is swapped out, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if exchange(tmp, out):  # now `tmp` holds the old dataset
        shutil.rmtree(tmp)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old)


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out == src or src.is_relative_to(out):
        raise ConvertError(f"OUT '{out}' is SRC or contains it",
                           "choose an OUT outside the source data")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ConvertError(f"output '{out}' already exists",
                           "pass --overwrite to replace it, or choose another OUT")
    if not out.is_dir() or out.is_symlink():
        raise ConvertError(f"output '{out}' exists and is not a directory",
                           "remove it yourself or choose another OUT")
    if any(out.iterdir()) and not _written_by_us(out):
        # --overwrite deletes OUT: only ever a dataset directory this tool wrote, or an empty one.
        raise ConvertError(f"output '{out}' is not a converted dataset (no {MANIFEST} with "
                           f"\"tool\": \"{TOOL}\" and a format_version)",
                           "choose another OUT or remove it yourself")


def _written_by_us(out: Path) -> bool:
    """Whether `out` holds a manifest that tools.convert wrote (of any format version)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("tool") == TOOL
            and type(manifest.get("format_version")) is int)


# ---------------------------------------------------------------- entry points


def convert(src: str | Path, out: str | Path, *, fmt: str = "auto", name: str | None = None,
            overwrite: bool = False, to: str = "numpy", workers: int | None = None,
            max_resolution: int | None = None) -> dict:
    """Convert SRC into the dataset directory OUT, atomically; return the manifest written."""
    src, out = Path(os.path.abspath(src)), Path(os.path.abspath(out))
    workers = workers or min(4, os.cpu_count() or 1)
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if to not in TARGETS:
        raise ConvertError(f"unknown target '{to}'", f"use one of {', '.join(TARGETS)}")
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise ConvertError(f"SRC '{src}' is an archive",
                           f"extract it first (tar xf '{src}') and pass the directory")
    if not src.is_dir():
        raise ConvertError(f"source '{src}' does not exist or is not a directory",
                           "pass the directory that holds the dataset files")
    _check_out(src, out, overwrite)
    if to == "ffcv":
        _load_write_beton()  # fail before the slow part
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "folder" and out.is_relative_to(src):
        raise ConvertError(f"OUT '{out}' is inside the image folder SRC",
                           "choose an OUT outside SRC")

    if fmt == "idx":
        conv = read_idx_dataset(src, name)
    elif fmt == "cifar":
        conv = read_cifar_dataset(src, name)
    else:
        conv = read_folder_dataset(src, name, workers)

    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so OUT gets the usual umask permissions rather than 0700.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        manifest = write_dataset(conv, tmp, src, workers)
        if to == "ffcv":
            manifest = write_betons(tmp, manifest, max_resolution)
        _check_out(src, out, overwrite)  # OUT may have appeared while we worked
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _print_table(rows: list[tuple[str, ...]], file) -> None:
    """A header row, a rule, then the rows: first column left-aligned, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)


def print_summary(manifest: dict, out: Path, file=None) -> None:
    file = file or sys.stdout
    rows = [("split", "count", "skipped", "shape", "classes")]
    n_classes = str(len(manifest["classes"])) if manifest["classes"] else "unlabelled"
    for split, info in manifest["splits"].items():
        skipped = sum(1 for s in manifest["skipped"] if s.get("split") == split)
        shape = "x".join(map(str, info["image_shape"])) if info["image_shape"] else "files"
        rows.append((split, str(info["count"]), str(skipped), shape, n_classes))
    _print_table(rows, file)
    for s in manifest["skipped"][:5]:
        print(f"skipped {show_path(s['path'])}: {s['reason']}", file=file)
    if len(manifest["skipped"]) > 5:
        print(f"... and {len(manifest['skipped']) - 5} more (see {MANIFEST})", file=file)
    normalised = sum(info.get("normalised", 0) for info in manifest["splits"].values())
    if normalised:
        print(f"{normalised} image(s) not 8-bit RGB/gray JPEG or PNG stored as 8-bit RGB PNGs "
              f"under {out / 'normalised'}", file=file)
    print(f"{manifest['name']} ({manifest['source_format']}) -> {show_path(out)}", file=file)


# ---------------------------------------------------------------- --verify


def verify(root: str | Path, file=None) -> list[str]:
    """Re-hash the inputs and artefacts that DIR's manifest lists; print a summary table to
    `file` and return one line per mismatch (empty when everything matches)."""
    file = file or sys.stdout
    root = Path(os.path.abspath(root))
    if not _written_by_us(root):
        raise ConvertError(f"'{root}' is not a dataset directory written by {TOOL} (no readable "
                           f"{MANIFEST} with \"tool\": \"{TOOL}\")", "pass the OUT of a conversion")
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest["format_version"] != FORMAT_VERSION:
        raise ConvertError(f"'{root}' has format_version {manifest['format_version']}, this tool "
                           f"writes {FORMAT_VERSION}", "convert it again")
    source = Path(manifest["source"])
    checks = [("inputs", source / rel, {"sha256": sha}) for rel, sha in manifest["inputs"].items()]
    checks += [("artefacts", root / rel, want) for rel, want in manifest["artefacts"].items()]
    counts = {kind: Counter() for kind in ("inputs", "artefacts")}
    problems = []
    for kind, path, want in tqdm(checks, desc="verifying", unit="file", disable=None, leave=False):
        try:
            size = path.stat().st_size
            found = None if "bytes" in want and size != want["bytes"] else sha256_file(path)
        except OSError as e:
            counts[kind]["missing"] += 1
            problems.append(f"missing: '{show_path(path)}' ({e.strerror})")
            continue
        if found != want["sha256"]:
            counts[kind]["changed"] += 1
            why = (f"{size} bytes, {want['bytes']} when converted" if found is None
                   else "sha256 differs from the manifest")
            problems.append(f"changed: '{show_path(path)}' ({why})")
        else:
            counts[kind]["ok"] += 1
    rows = [("files", "checked", "ok", "changed", "missing")]
    for kind, c in counts.items():
        rows.append((kind, str(sum(c.values())),
                     *(str(c[k]) for k in ("ok", "changed", "missing"))))
    _print_table(rows, file)
    return problems


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.convert",
        description="Convert IDX (MNIST, Fashion-MNIST), CIFAR-10/100 pickles or image folders "
                    "(JPEG, PNG; BMP, GIF, TIFF, WebP are stored as PNGs) into a dataset directory "
                    "(manifest.json + numpy artefacts, optionally .beton); or, with --verify DIR, "
                    "check a dataset directory against the checksums its manifest records.",
        usage="python -m tools.convert SRC OUT [options]\n"
              "       python -m tools.convert --verify DIR",
    )
    p.add_argument("src", metavar="SRC", nargs="?", help="directory holding the raw dataset")
    p.add_argument("out", metavar="OUT", nargs="?", help="dataset directory to create")
    p.add_argument("--verify", metavar="DIR", default=None,
                   help="re-hash every input and artefact listed in DIR/manifest.json; print a "
                        "table and one line per changed or missing file; exit 0 only if all match")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto",
                   help="input format (default: detect from SRC)")
    p.add_argument("--name", default=None,
                   help="dataset name for the manifest (default: from SRC; 'fashion-mnist' picks "
                        "Fashion-MNIST class names for IDX input)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT that tools.convert wrote "
                        "(never another directory)")
    p.add_argument("--to", choices=TARGETS, default="numpy",
                   help="numpy: manifest, .npy, file lists and normalised PNGs only; ffcv: also "
                        "<split>.beton (default: numpy)")
    p.add_argument("--workers", type=at_least(1), default=None, metavar="N",
                   help="processes decoding and normalising folder images (default: min(4, CPUs))")
    p.add_argument("--max-resolution", type=at_least(1), default=None, metavar="PX",
                   help="--to ffcv only: longest side stored in the .beton (recommended 256 for "
                        "ImageNet at 224; default: keep full size)")
    return p


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # so `kill` also removes the temporary directory


def _main_verify(root: str) -> int:
    try:
        problems = verify(root)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert: interrupted", file=sys.stderr)
        return 130
    for line in problems:
        print(f"verify: {line}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} file(s) differ from '{show_path(root)}/{MANIFEST}': "
              f"re-run tools.convert (or restore the files)", file=sys.stderr)
        return 1
    print(f"verify: every input and artefact of '{show_path(root)}' matches its manifest")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.src is not None or args.out is not None:
            parser.error("--verify DIR takes no SRC or OUT")
        return _main_verify(args.verify)
    if args.src is None or args.out is None:
        parser.error("the following arguments are required: SRC OUT (or --verify DIR)")
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    if args.max_resolution is not None and args.to != "ffcv":
        print("convert: error: --max-resolution applies only to .beton files: "
              "add --to ffcv or drop it", file=sys.stderr)
        return 2
    try:
        manifest = convert(args.src, args.out, fmt=args.fmt, name=args.name,
                           overwrite=args.overwrite, to=args.to, workers=args.workers,
                           max_resolution=args.max_resolution)
    except (ConvertError, FormatError, DatasetError) as e:
        print(f"convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f" '{e.filename}'" if e.filename else ""
        print(f"convert: error: {e.strerror or e}{where}: "
              "check the path, free space and permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convert: interrupted: '{args.out}' was not written or changed", file=sys.stderr)
        return 130
    print_summary(manifest, Path(os.path.abspath(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
