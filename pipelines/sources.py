"""Reading a converted dataset directory (written by `python -m tools.convert`).

Layout of a dataset directory:
    manifest.json            counts, classes, shapes, input checksums, skipped files
    <split>_images.npy       uint8 [N, H, W, C] (C = 1 or 3), for array datasets
    <split>_labels.npy       int64 [N] (-1 where unlabelled)
    <split>_files.txt        one absolute image path per line, for JPEG-folder datasets
    <split>.beton            FFCV file (written by `tools.convert --to ffcv`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A dataset directory is missing, incomplete or of an unknown format."""


@dataclass
class Split:
    name: str
    labels: np.ndarray  # int64 [N]
    images: np.ndarray | None = None  # uint8 [N, H, W, C], memory-mapped (array datasets)
    files: list[str] | None = None  # absolute paths (JPEG-folder datasets)
    classes: tuple[str, ...] = ()
    root: Path | None = None  # the dataset directory (where `<name>.beton` lives)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        return "array" if self.images is not None else "files"


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
        except json.JSONDecodeError as e:
            raise DatasetError(f"'{mpath}' is not valid JSON ({e}): re-run tools.convert") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"'{mpath}' has format_version {self.manifest.get('format_version')!r}, expected "
                f"{FORMAT_VERSION}: re-run tools.convert"
            )

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("classes", ()))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def beton(self, split: str) -> Path:
        path = self.root / f"{split}.beton"
        if not path.is_file():
            raise DatasetError(
                f"no FFCV file '{path}': write it with 'python -m tools.convert ... {self.root} --to ffcv'"
            )
        return path

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise DatasetError(
                f"dataset '{self.root}' has no split '{name}' (has: {', '.join(self.splits)})"
            )
        labels = np.load(self.root / f"{name}_labels.npy")
        if self.kind == "array":
            images = np.load(self.root / f"{name}_images.npy", mmap_mode="r")
            if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
                raise DatasetError(f"'{self.root}/{name}_images.npy' is malformed: re-run tools.convert")
            return Split(name, labels, images=images, classes=self.classes, root=self.root)
        files = (self.root / f"{name}_files.txt").read_text().splitlines()
        if len(files) != len(labels):
            raise DatasetError(f"'{self.root}/{name}_files.txt' and labels disagree: re-run tools.convert")
        return Split(name, labels, files=files, classes=self.classes, root=self.root)


def open_dataset(root: str | Path) -> DatasetDir:
    return DatasetDir(root)
