"""Reading a raw image dataset into a `Converted` (its splits, classes and input checksums), which
`pipelines.dataset_writer` writes as a dataset directory (`python -m tools.convert` runs both).

    detect_format(src)                 "idx", "cifar" or "folder"
    read_idx_dataset(src, name)        MNIST / Fashion-MNIST IDX files -> train, test
    read_cifar_dataset(src, name)      CIFAR-10/100 python pickles -> train, test
    read_folder_dataset(src, name, workers)
                                       image folders: SRC/train/<class>/*, SRC/val/<class>/*;
                                       SRC/<class>/*; loose images (unlabelled, label -1)

The readers of the files themselves are in `pipelines.formats`. Every problem the user can fix
is a one-line `ConvertError` "<problem>: <fix>"; an unreadable image is skipped and recorded
(`Converted.skipped`), never fatal.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.formats import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    IMAGE_SUFFIXES,
    ImageCheck,
    cifar_rows_to_hwc,
    inspect_image,
    is_image,
    read_cifar_pickle,
    read_idx,
    sha256_file,
)
from pipelines.sources import show_path
from train.atomic import die_with_parent

FORMATS = ("auto", "idx", "cifar", "folder")
IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
IDX_SPLITS = {"train": "train", "t10k": "test"}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


class ConvertError(ValueError):
    """A problem the user can fix, in one line "<problem>: <fix>" (tools.convert prints it as
    `convert: error: <problem>: <fix>`)."""

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
    """"idx", "cifar" or "folder": the format of the raw dataset in SRC."""
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
    """The train and test IDX files in SRC (either may be absent, not both)."""
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
    """The CIFAR-10 or CIFAR-100 python pickles in SRC (or its extracted-archive child)."""
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
    die_with_parent(os.getppid())  # a SIGKILLed conversion leaves no worker behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how Pool.terminate() stops a worker


def no_progress(items, **_):
    """The default `progress`: `items` as they are, nothing shown. A caller passes tqdm (or
    anything that takes an iterable and total=, desc=, unit= and yields the same items)."""
    return items


def parallel_map(fn, items: list, workers: int, desc: str, progress=no_progress) -> list:
    """[fn(item) for item in items], in `workers` processes where that pays; `desc` names the
    work in `progress` and in the error if a process dies.

    A multiprocessing.Pool replaces a worker killed by a signal (the OOM killer, say) and waits
    forever for the task it lost; a ProcessPoolExecutor raises BrokenProcessPool instead.
    """
    bar = dict(total=len(items), desc=desc, unit="img")
    if workers <= 1 or len(items) < 2 * workers:
        return [fn(p) for p in progress(items, **bar)]
    chunk = max(1, min(64, len(items) // (workers * 8)))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                               initializer=_quiet_worker)
    try:
        return list(progress(pool.map(fn, items, chunksize=chunk), **bar))
    except BrokenProcessPool:
        raise ConvertError(f"a process {desc} died (killed by a signal: out of memory?)",
                           "convert again, with fewer --workers if memory is short") from None
    finally:
        for process in list((pool._processes or {}).values()):  # Ctrl-C: stop mid-task ones too
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def read_folder_dataset(src: Path, name: str | None, workers: int,
                        progress=no_progress) -> Converted:
    """Every image under SRC, fully decoded (`inspect_image`) in `workers` processes: the
    readable ones by split and class, the others skipped with the reason."""
    classes, layout = _folder_layout(src)
    if not any(layout.values()):
        raise ConvertError(f"no images found in '{src}' "
                           f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                           "point SRC at a folder of images, class folders or train/ and val/")
    splits, inputs, skipped = {}, {}, []
    for split, items in layout.items():
        checks: list[ImageCheck] = parallel_map(inspect_image, [p for p, _ in items], workers,
                                                 f"decoding {split}", progress)
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
