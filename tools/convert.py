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

This module is the command line; the readers are in pipelines/dataset_readers.py, the writer and
the verification in pipelines/dataset_writer.py, the output layout in pipelines/sources.py. Every
folder image is fully decoded first; unreadable ones are skipped and listed in the manifest,
never abort the run. 8-bit RGB or grayscale JPEGs and PNGs are used in place; every other image
(16-bit, CMYK, palette, alpha, EXIF-rotated, BMP, GIF, TIFF, WebP) is decoded once by
`pipelines.formats.decode_rgb` and stored as a lossless 8-bit RGB PNG in the dataset directory,
so that every backend sees the same pixels. The output is built in a temporary directory next to
OUT and renamed into place only when complete; the manifest records the sha256 of every input and
artefact. One conversion at a time writes an OUT: another one is refused in one line naming it.

    python -m tools.convert --verify data/imagenet    # re-hash inputs and artefacts
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path

from tqdm import tqdm

from pipelines.dataset_readers import FORMATS, ConvertError
from pipelines.dataset_writer import TARGETS, convert, verify
from pipelines.formats import FormatError
from pipelines.sources import MANIFEST, DatasetError, show_path
from train.cli import at_least
from train.lock import OutputBusy

# the bars of the slow steps, on a terminal only (disable=None), removed when done
PROGRESS = functools.partial(tqdm, disable=None, leave=False)


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



def print_verify_table(counts: dict, file=None) -> None:
    """`verify`'s counts of each kind of file as a table."""
    rows = [("files", "checked", "ok", "changed", "missing")]
    for kind, c in counts.items():
        rows.append((kind, str(sum(c.values())),
                     *(str(c[k]) for k in ("ok", "changed", "missing"))))
    _print_table(rows, file or sys.stdout)


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
        counts, problems = verify(root, PROGRESS)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert: interrupted", file=sys.stderr)
        return 130
    print_verify_table(counts)
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
                           max_resolution=args.max_resolution, progress=PROGRESS)
    except (ConvertError, FormatError, DatasetError, OutputBusy) as e:
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
