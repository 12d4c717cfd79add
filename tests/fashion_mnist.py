"""Locating the real Fashion-MNIST for tests and cutting small dataset directories from it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipelines.formats import read_idx

REPO = Path(__file__).resolve().parents[1]
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def fashion_mnist_dir() -> Path | None:
    """SIMCLR_DATA, the path tools/setup.sh recorded, or Debian's dataset-fashion-mnist."""
    candidates = [os.environ.get("SIMCLR_DATA")]
    recorded = REPO / "data" / ".fashion-mnist-path"
    if recorded.is_file():
        candidates.append(recorded.read_text().strip())
    candidates.append("/usr/share/datasets/fashion-mnist")
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in FILES):
            return Path(c)
    return None


def require_fashion_mnist() -> Path:
    path = fashion_mnist_dir()
    if path is None:
        pytest.skip("Fashion-MNIST not found: run 'bash tools/setup.sh' or set SIMCLR_DATA to the "
                    "folder of its *-ubyte.gz files")
    return path


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = (struct.pack(">HBB", 0, 0x08, array.ndim)
              + struct.pack(">" + "I" * array.ndim, *array.shape))
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_subset(dst: Path, n_train: int, n_test: int, *, beton: bool = False,
                classes: tuple[int, ...] | None = None) -> Path:
    """Real Fashion-MNIST images cut to the first n_train/n_test (of `classes` only, when given)
    and converted by tools.convert (with `beton`, also the train split's FFCV file, where FFCV
    imports)."""
    from pipelines.dataset_writer import convert

    src = require_fashion_mnist()
    raw = dst / "raw-fashion-mnist"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.flatnonzero(np.isin(labels, classes) if classes else labels >= 0)[:n]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte",
                   read_idx(src / f"{prefix}-images-idx3-ubyte.gz")[keep])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[keep])
    out = dst / "fashion-mnist"
    convert(raw, out, fmt="idx", name="fashion-mnist", workers=1)
    if beton and importlib.util.find_spec("ffcv") is not None:
        from pipelines.ffcv_writer import write_beton
        from pipelines.sources import beton_file, open_dataset

        write_beton(open_dataset(out).split("train"), beton_file(out, "train"))
    return out


def shared_root(tmp_path_factory) -> Path:
    """A folder that every pytest-xdist worker of this test run shares (the run's own temporary
    folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`root/name`, built by `build(root/name)` by the first process of this test run that asks;
    the others wait for it and reuse it."""
    from filelock import FileLock  # a dependency of torch

    out = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            (root / f"{name}.done").touch()
    return out


def subset_dataset(tmp_path_factory, n_train: int, n_test: int) -> Path:
    """`make_subset` (with the train .beton) once per test run for these sizes, shared by every
    module and worker: read it, never write into it."""
    made = build_once(shared_root(tmp_path_factory), f"fashion-mnist-{n_train}-{n_test}",
                      lambda out: make_subset(out, n_train, n_test, beton=True))
    return made / "fashion-mnist"


def pretrain_tiny(run: Path, data: Path, *overrides: str, steps: int = 2) -> Path:
    """A few steps of the demo recipe on a narrow network (width 1/8): a real run directory with a
    checkpoint, for the tools that read one."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--config",
         str(REPO / "train/configs/fashion_mnist_demo.yaml"), f"--data.path={data}",
         f"--train.out_dir={run}", "--model.width=0.125", "--data.batch_size=32",
         "--data.num_workers=0", f"--train.max_steps={steps}", "--data.backend=torchvision",
         "--train.knn_every=-1", "--train.time_budget_s=0", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"pretraining failed:\n{proc.stderr[-3000:]}")
    return run
