"""Writing a dataset directory (layout in `pipelines.sources`) from what a reader of
`pipelines.dataset_readers` produced, and checking one against its manifest.

    convert(src, out, fmt=..., to=...)  read SRC, write OUT atomically (a temp directory beside
                                        it, renamed into place when complete); the manifest
    write_dataset(conv, root, src)      the numpy artefacts, file lists, normalised PNGs and
                                        manifest.json (sha256 of every input and artefact)
    write_betons(root, manifest, px)    with `to="ffcv"`: <split>.beton (pipelines.ffcv_writer)
    verify(root)                        re-hash the inputs and artefacts the manifest lists

`python -m tools.convert` is the command line over these. Problems the user can fix are one-line
`ConvertError`s. One conversion at a time writes an OUT (a lock beside it, `train.lock`): another
one is refused with `train.lock.OutputBusy`, naming it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines.dataset_readers import (
    FORMATS,
    Converted,
    ConvertError,
    SplitData,
    detect_format,
    no_progress,
    parallel_map,
    read_cifar_dataset,
    read_folder_dataset,
    read_idx_dataset,
)
from pipelines.formats import decode_rgb, sha256_file
from pipelines.sources import (
    FORMAT_VERSION,
    MANIFEST,
    BetonWriteError,
    beton_file,
    open_dataset,
    show_path,
    write_file_list,
)
from train.atomic import remove_dead_temp_dirs, replace_dir
from train.lock import acquire, lock_beside, released_on_return

# the manifest's "tool": the command that runs this writer; --overwrite replaces only what it wrote
TOOL = "tools.convert"
TARGETS = ("numpy", "ffcv")
NORMALISED = "normalised"


def _normalise(job: tuple[str, str]) -> tuple[int, int, int]:
    """Decode `src` with `decode_rgb` into the lossless 8-bit RGB PNG `dst`.

    Returns (height, width, bytes written)."""
    from PIL import Image

    src, dst = job
    pixels = decode_rgb(src)
    Image.fromarray(pixels).save(dst, format="PNG", compress_level=3)
    return pixels.shape[0], pixels.shape[1], os.path.getsize(dst)


def _normalise_files(data: SplitData, root: Path, split: str, workers: int, progress) -> None:
    """Replace `data`'s files that not every backend decodes alike by PNGs under `root`."""
    todo = [k for k, plain in enumerate(data.plain) if not plain]
    if not todo:
        return
    folder = root / NORMALISED / split
    folder.mkdir(parents=True)
    rel = [f"{NORMALISED}/{split}/{k:08d}.png" for k in todo]
    jobs = [(data.files[k], str(root / r)) for k, r in zip(todo, rel, strict=True)]
    done = parallel_map(_normalise, jobs, workers, f"normalising {split}", progress)
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


def write_dataset(conv: Converted, root: Path, src: Path, workers: int = 1,
                  progress=no_progress) -> dict:
    """Write the numpy artefacts and manifest.json of `conv` into the (empty) directory `root`."""
    manifest_splits = {}
    for split, data in conv.splits.items():
        np.save(root / f"{split}_labels.npy", data.labels.astype(np.int64))
        if data.images is not None:
            np.save(root / f"{split}_images.npy", np.ascontiguousarray(data.images, dtype=np.uint8))
            shape = list(data.images.shape[1:])
        else:
            _normalise_files(data, root, split, workers, progress)
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


def write_betons(root: Path, manifest: dict, max_resolution: int | None,
                 progress=no_progress) -> dict:
    """Add `<split>.beton` of every split to the dataset directory `root` (FFCV's writer) and
    their records to its manifest; return the manifest."""
    write_beton = _load_write_beton()
    dataset = open_dataset(root)
    for split in progress(dataset.splits, desc="writing .beton"):
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


@released_on_return  # the lock of OUT
def convert(src: str | Path, out: str | Path, *, fmt: str = "auto", name: str | None = None,
            overwrite: bool = False, to: str = "numpy", workers: int | None = None,
            max_resolution: int | None = None, progress=no_progress) -> dict:
    """Convert SRC into the dataset directory OUT, atomically; return the manifest written.
    `progress` (e.g. tqdm) shows the decoding, normalising and .beton writing."""
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
    acquire(lock_beside(out), f"output '{out}'",
            "wait for that conversion to end, or choose another OUT").until_return()
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
        conv = read_folder_dataset(src, name, workers, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_dirs(out.parent, f".{out.name}.tmp-")  # what a killed conversion left
    # mkdir (not mkdtemp) so OUT gets the usual umask permissions rather than 0700.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        manifest = write_dataset(conv, tmp, src, workers, progress)
        if to == "ffcv":
            manifest = write_betons(tmp, manifest, max_resolution, progress)
        _check_out(src, out, overwrite)  # OUT may have appeared while we worked
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def verify(root: str | Path, progress=no_progress) -> tuple[dict[str, Counter], list[str]]:
    """Re-hash the inputs and artefacts that DIR's manifest lists. Returns the counts of "ok",
    "changed" and "missing" files of each kind ("inputs", "artefacts"), and one line per
    mismatch (none when everything matches)."""
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
    for kind, path, want in progress(checks, total=len(checks), desc="verifying", unit="file"):
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
    return counts, problems
