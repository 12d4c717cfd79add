"""Reading a converted dataset directory (written by `python -m tools.convert`).

Layout of a dataset directory (format_version 2):
    manifest.json            counts, classes, shapes, input checksums, skipped files, and the
                             byte size and sha256 of every artefact below ("artefacts")
    <split>_images.npy       uint8 [N, H, W, C] (C = 1 or 3), for array datasets
    <split>_labels.npy       int64 [N] (-1 where unlabelled)
    <split>_files.nul        image paths of folder datasets, each os.fsencode'd and ended by a
                             NUL byte (so any file name round-trips); absolute paths of source
                             files, or paths relative to the dataset directory (normalised/...)
    <split>_sizes.npy        int64 [N, 3]: height, width and byte length of each image file
    normalised/<split>/*.png images that are not 8-bit RGB/gray JPEG or PNG (16-bit, CMYK, palette,
                             EXIF-rotated, GIF, WebP, ...) as lossless 8-bit RGB PNGs
    <split>.beton            FFCV file (written by `tools.convert --to ffcv`)

Every problem with the directory is a one-line `DatasetError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
# the files of a split in a dataset directory, `<split>_<part>` (array or folder datasets)
SPLIT_FILES = ("images.npy", "labels.npy", "files.nul", "sizes.npy")
FORMAT_VERSION = 2
RECONVERT = "re-run tools.convert (check it with 'python -m tools.convert --verify DIR')"


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or of an unknown format."""

    @classmethod
    def from_worker(cls, e: BaseException) -> DatasetError:
        """The one-line error inside a DataLoader worker's re-raised, traceback-laden message."""
        lines = str(e).strip().splitlines()
        last = lines[-1] if lines else ""
        return cls(last.partition("DatasetError: ")[2] or last)


def one_line_worker_errors(batches):
    """Iterate `batches` (a DataLoader), re-raising a worker's DatasetError as its one line."""
    try:
        yield from batches
    except DatasetError as e:
        raise DatasetError.from_worker(e) from None


class BetonWriteError(RuntimeError):
    """Writing a .beton failed (a worker raised, died or was killed); one line naming the image."""


def show_path(path: str | os.PathLike) -> str:
    """A path for a one-line message: control characters and undecodable bytes escaped."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else os.fsdecode(text)
    if text.isprintable():
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return ascii(text)[1:-1]


def read_file_list(path: Path) -> list[str]:
    """The paths of a `<split>_files.nul` (see the module docstring), relative ones resolved."""
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\0"):
        raise DatasetError(f"'{show_path(path)}' is truncated (no final NUL byte): {RECONVERT}")
    root = os.fsencode(path.parent)
    return [os.fsdecode(p if p.startswith(b"/") else os.path.join(root, p))
            for p in raw.split(b"\0")[:-1]]


def write_file_list(path: Path, files: list[str]) -> None:
    path.write_bytes(b"".join(os.fsencode(f) + b"\0" for f in files))


def check_artefact(root: Path, name: str, artefacts: dict) -> Path:
    """`root / name`, after checking that it exists with the byte size the manifest records."""
    path = root / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"dataset file '{show_path(path)}' is unreadable ({e.strerror}): "
                           f"{RECONVERT}") from None
    want = artefacts.get(name, {}).get("bytes")
    if want is not None and size != want:
        raise DatasetError(f"dataset file '{show_path(path)}' is {size} bytes, the manifest "
                           f"records {want} (truncated or changed since conversion): {RECONVERT}")
    return path


def check_image_bytes(path: str, data: bytes, want: int | None) -> None:
    """Raise a `DatasetError` naming `path` if its contents are not the length converted."""
    if want is not None and len(data) != want:
        raise DatasetError(f"image '{show_path(path)}' is {len(data)} bytes, {want} when converted "
                           f"(truncated or changed since): {RECONVERT}")


def read_image_bytes(path: str, want: int | None) -> bytes:
    """The bytes of a dataset's image file, or a one-line `DatasetError` naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"image '{show_path(path)}' is unreadable ({e.strerror or e}): "
                           f"{RECONVERT}") from None
    check_image_bytes(path, data, want)
    return data


def beton_file(root: str | Path, split: str) -> Path:
    """Where split `split`'s FFCV file is written and read: `<dataset dir>/<split>.beton`."""
    return Path(root) / f"{split}.beton"


def find_beton(root: str | Path, split: str, artefacts: dict) -> Path:
    """`beton_file`, after checking that it exists with the byte size the manifest records."""
    path = beton_file(root, split)
    if not path.is_file():
        raise DatasetError(f"no FFCV file '{path}': write it with "
                           f"'python -m tools.convert ... {root} --to ffcv'")
    return check_artefact(Path(root), path.name, artefacts)


@dataclass
class Split:
    name: str
    labels: np.ndarray  # int64 [N]
    images: np.ndarray | None = None  # uint8 [N, H, W, C], memory-mapped (array datasets)
    files: list[str] | None = None  # absolute paths (folder datasets)
    classes: tuple[str, ...] = ()
    root: Path | None = None  # the dataset directory (where `<name>.beton` lives)
    sizes: np.ndarray | None = None  # int64 [N, 3]: height, width, bytes of each file
    artefacts: dict = field(default_factory=dict)  # the manifest's artefacts: name -> bytes, sha256

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        return "array" if self.images is not None else "files"

    def file_bytes(self, index: int) -> bytes:
        """The bytes of image file `index`, checked against the length recorded at conversion."""
        want = int(self.sizes[index, 2]) if self.sizes is not None else None
        return read_image_bytes(self.files[index], want)


class DatasetDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise DatasetError(
                f"no dataset at '{self.root}' ({MANIFEST} missing): convert one first, "
                f"e.g. 'python -m tools.convert /usr/share/datasets/fashion-mnist {self.root}'"
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"'{mpath}' is not valid JSON ({e}): re-run tools.convert") from None
        version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if version != FORMAT_VERSION:
            raise DatasetError(
                f"'{mpath}' has format_version {version!r}, expected "
                f"{FORMAT_VERSION}: re-run tools.convert"
            )
        artefacts = self.manifest.get("artefacts")
        self.artefacts = artefacts if isinstance(artefacts, dict) else {}

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("classes", ()))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def fingerprint(self, split: str) -> str | None:
        """A digest of what `split` holds (its images or file list, sizes and labels, by the
        manifest's checksums; not its FFCV file, which is derived from them): the same after the
        dataset directory moves, different for another dataset of the same size. None where the
        manifest records no checksum."""
        names = [f"{split}_{part}" for part in SPLIT_FILES]
        records = [(n, self.artefacts[n].get("sha256")) for n in names if n in self.artefacts]
        if not records or any(not isinstance(h, str) for _, h in records):
            return None
        return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]

    def beton(self, split: str) -> Path:
        return find_beton(self.root, split, self.artefacts)

    def _load(self, name: str, **kwargs) -> np.ndarray:
        path = check_artefact(self.root, name, self.artefacts)
        try:
            return np.load(path, allow_pickle=False, **kwargs)
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"dataset file '{show_path(path)}' is unreadable or truncated "
                               f"({' '.join(str(e).split())}): {RECONVERT}") from None

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise DatasetError(
                f"dataset '{self.root}' has no split '{name}' (has: {', '.join(self.splits)})"
            )
        count = self.manifest["splits"][name].get("count")
        labels = self._load(f"{name}_labels.npy")
        if labels.ndim != 1 or (count is not None and len(labels) != count):
            raise DatasetError(f"'{self.root}/{name}_labels.npy' holds {labels.shape} labels, the "
                               f"manifest records {count}: {RECONVERT}")
        common = dict(classes=self.classes, root=self.root, artefacts=self.artefacts)
        if self.kind == "array":
            images = self._load(f"{name}_images.npy", mmap_mode="r")
            if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
                raise DatasetError(f"'{self.root}/{name}_images.npy' is malformed: {RECONVERT}")
            return Split(name, labels, images=images, **common)
        files = read_file_list(check_artefact(self.root, f"{name}_files.nul", self.artefacts))
        sizes = self._load(f"{name}_sizes.npy")
        if len(files) != len(labels) or sizes.shape != (len(labels), 3):
            raise DatasetError(f"'{self.root}/{name}_files.nul', _sizes.npy and _labels.npy "
                               f"disagree: {RECONVERT}")
        return Split(name, labels, files=files, sizes=sizes, **common)


def open_dataset(root: str | Path) -> DatasetDir:
    return DatasetDir(root)
