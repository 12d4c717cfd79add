"""Embeddings of a dataset split or a folder of images by a pretrained encoder, and the nearest
neighbours of a query image among them.

    python -m tools.embed --checkpoint runs/fashion-mnist-demo SOURCE [--split NAME]
        [--out PREFIX] [--batch-size N] [--workers N] [--device D] [--skip-bad]
        [--query IMAGE [--k 10] [--query-json PATH]]

SOURCE is a dataset directory written by tools.convert (its --split, default data.train_split)
or a folder of images (searched recursively, paths sorted). Each row is the frozen encoder's
feature h (the representation kept after training, before the projection head; not normalised)
of an image's evaluation view, float32, written as the rows are computed into PREFIX.npy (so
memory does not grow with the image count); PREFIX.files.txt names each row's image (a path, or
<split>/<index> for an array dataset) and PREFIX.json says what was embedded. The default PREFIX
is <run dir>/embeddings/<source name>-<split, or 'images' for a folder>. --query IMAGE (a file, or
<split>/<index> of the dataset) prints the --k rows of highest cosine similarity to the query's
feature and writes them to PREFIX.query.json; embeddings already written for this checkpoint and
source are reused. One command at a time writes a PREFIX: another one is refused in one line
naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipelines.eval_view import FolderViews, decode_view, eval_transform
from pipelines.formats import IMAGE_SUFFIXES, image_files
from pipelines.sources import (
    MANIFEST,
    DatasetError,
    one_line_worker_errors,
    open_dataset,
    show_path,
)
from train.atomic import fsync_dir, remove_stale_temps, temp_name, unwritable, write_atomic
from train.checkpoint import load_pretrained, read_trainer_state, run_output
from train.cli import add_checkpoint, at_least
from train.commands import print_report, run_command
from train.config import ConfigError
from train.features import eval_views, forward_eval
from train.linear_eval import check_device
from train.lock import acquire, lock_beside, released_on_return

SIMILARITY_CHUNK = 1 << 16  # rows per block of the query's similarity pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.embed",
                                description=__doc__.split("\n\n")[0])
    add_checkpoint(p)
    p.add_argument("source", metavar="SOURCE",
                   help="a dataset directory (tools.convert) or a folder of images")
    p.add_argument("--split", default=None,
                   help="split of a dataset directory (default: data.train_split)")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.npy, PREFIX.files.txt and PREFIX.json (default: "
                   "<run dir>/embeddings/<source name>-<split or 'images'>)")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help="images per forward pass (default: eval.batch_size)")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="image-decoding processes (default: data.num_workers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the encoder runs (default: cuda when available)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images of a folder that cannot be decoded (listed in PREFIX.json)")
    p.add_argument("--query", default=None, metavar="IMAGE",
                   help="an image file, or <split>/<index> of the dataset: print its --k nearest "
                   "rows by cosine similarity")
    p.add_argument("--k", type=at_least(1), default=10, help="neighbours to show (default: 10)")
    p.add_argument("--query-json", default=None, metavar="PATH",
                   help="where to write the neighbours (default: PREFIX.query.json)")
    return p


def _worker_init(_):
    torch.set_num_threads(1)  # workers are processes already; threads would oversubscribe


def encode(encoder: torch.nn.Module, x: torch.Tensor, device) -> np.ndarray:
    """float32 [B, F] features of a normalised batch, as train.features.extract_features
    computes them."""
    return forward_eval(encoder, x, device).numpy()


def write_rows(path: Path, batches, count: int, dim: int, encoder, device, progress) -> list[int]:
    """Encode `batches` ((views, decoded mask) pairs, `count` images in all) into the .npy at
    `path`, row by row through a memory map at a temp name beside it, renamed into place only
    when complete. Returns the indices of the images skipped (mask False)."""
    from numpy.lib.format import open_memmap

    remove_stale_temps(path)  # of an earlier run that was killed outright
    tmp, short = temp_name(path), None
    try:
        rows = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, dim))
        written, seen, skipped = 0, 0, []
        for x, ok in batches:
            skipped += (seen + np.flatnonzero(~ok.numpy())).tolist()
            if ok.any():
                h = encode(encoder, x[ok], device)
                rows[written : written + len(h)] = h
                written += len(h)
            seen += len(ok)
            progress(len(ok))
        rows.flush()
        if written == 0:
            raise DatasetError(f"none of the {count} images could be decoded: pass a folder of "
                               f"readable images")
        if written < count:  # skipped images: copy the rows into a .npy of the right length
            short = temp_name(path)
            fewer = open_memmap(short, mode="w+", dtype=np.float32, shape=(written, dim))
            for s in range(0, written, SIMILARITY_CHUNK):
                e = min(s + SIMILARITY_CHUNK, written)
                fewer[s:e] = rows[s:e]
            fewer.flush()
            del fewer
            os.replace(short, tmp)
        del rows
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        for p in (tmp, short):
            if p is not None:
                p.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return skipped


def output_prefix(ckpt: Path, source: Path, split: str | None, out_arg: str | None) -> Path:
    if out_arg:
        return Path(out_arg)
    return run_output(ckpt, "embeddings") / f"{source.name}-{split or 'images'}"


def outputs(prefix: Path) -> dict[str, Path]:
    return {kind: prefix.with_name(f"{prefix.name}.{kind}")
            for kind in ("npy", "files.txt", "json", "query.json")}


class Source:
    """What SOURCE holds: a dataset split (`split`) or image files (`files`)."""

    def __init__(self, path: str, split_arg: str | None, cfg):
        self.path = Path(path).resolve()
        self.dataset = self.split = self.files = None
        if (self.path / MANIFEST).is_file():
            self.dataset = open_dataset(self.path)
            self.split = self.dataset.split(split_arg or cfg.data.train_split)
            self.count = len(self.split)
        elif self.path.is_dir():
            if split_arg:
                raise ConfigError(f"--split {split_arg}: '{show_path(self.path)}' is a folder of "
                                  f"images, not a dataset directory: drop --split")
            self.files = image_files(self.path)
            if not self.files:
                raise DatasetError(f"no images under '{show_path(self.path)}' (looked for "
                                   f"{', '.join(sorted(IMAGE_SUFFIXES))}): pass a folder of "
                                   f"images or a dataset directory")
            self.count = len(self.files)
        else:
            raise DatasetError(f"'{show_path(self.path)}' is neither a dataset directory nor a "
                               f"folder of images: pass one")

    @property
    def split_name(self) -> str | None:
        return None if self.split is None else self.split.name

    def names(self):
        """One line per row of the embeddings: the image's path, or <split>/<index>."""
        if self.files is not None:
            return (show_path(f) for f in self.files)
        if self.split.files is not None:
            return (show_path(f) for f in self.split.files)
        return (f"{self.split.name}/{i}" for i in range(len(self.split)))

    def batches(self, spec, batch_size: int, workers: int, skip_bad: bool):
        """(normalised views [B, 3, S, S], decoded mask [B]) in row order."""
        if self.split is not None:
            for x in eval_views(self.split, spec, np.arange(self.count), batch_size, workers):
                yield x, torch.ones(len(x), dtype=torch.bool)
            return
        loader = DataLoader(FolderViews(self.files, spec, skip_bad), batch_size=batch_size,
                            num_workers=workers, worker_init_fn=_worker_init if workers else None)
        yield from one_line_worker_errors(loader)


def embed(args, ckpt: Path, cfg, encoder, source: Source, files: dict[str, Path]) -> dict:
    from tqdm import tqdm

    files["npy"].parent.mkdir(parents=True, exist_ok=True)
    files["json"].unlink(missing_ok=True)  # present only beside the rows it describes
    batch_size = args.batch_size or cfg.eval.batch_size
    t0 = time.perf_counter()
    with tqdm(total=source.count, desc="embedding", unit="img") as bar:
        workers = cfg.data.num_workers if args.workers is None else args.workers
        skipped = write_rows(files["npy"], source.batches(cfg.augment, batch_size, workers,
                                                          args.skip_bad),
                             source.count, encoder.feat_dim, encoder, args.device, bar.update)
    seconds = time.perf_counter() - t0
    gone = set(skipped)
    names = (n for i, n in enumerate(source.names()) if i not in gone)
    write_atomic(files["files.txt"], "".join(f"{n}\n" for n in names))
    meta = {"checkpoint": str(ckpt), "step": read_trainer_state(ckpt).get("step"),
            "source": str(source.path), "split": source.split_name,
            "count": source.count - len(skipped), "dim": encoder.feat_dim, "normalised": False,
            "device": str(args.device), "seconds": seconds,
            "images_per_s": source.count / seconds if seconds > 0 else None,
            "skipped": [show_path(source.files[i]) for i in skipped]}
    write_atomic(files["json"], json.dumps(meta, indent=1))
    for name in meta["skipped"]:
        print(f"embed: skipped '{name}' (cannot be decoded)", file=sys.stderr)
    return meta


def reusable(files: dict[str, Path], ckpt: Path, source: Source) -> dict | None:
    """The embeddings' PREFIX.json when it describes this checkpoint's rows of this source."""
    try:
        meta = json.loads(files["json"].read_text())
        rows = np.load(files["npy"], mmap_mode="r")
    except (OSError, ValueError):
        return None
    same = (meta.get("checkpoint"), meta.get("step"), meta.get("source"), meta.get("split")) == (
        str(ckpt), read_trainer_state(ckpt).get("step"), str(source.path), source.split_name)
    return meta if same and rows.shape == (meta.get("count"), meta.get("dim")) else None


def query_view(query: str, source: Source, spec) -> torch.Tensor:
    """[1, 3, S, S]: the evaluation view of an image file, or of <split>/<index> of the dataset."""
    if Path(query).is_file():
        return decode_view(Path(query), eval_transform(spec), "pass another --query")[None]
    m = re.fullmatch(r"(.+)/(\d+)", query)
    if source.dataset is not None and m and m.group(1) in source.dataset.splits:
        split = source.dataset.split(m.group(1))
        index = int(m.group(2))
        if index >= len(split):
            raise DatasetError(f"--query {query}: split '{split.name}' has {len(split)} images: "
                               f"pass an index below {len(split)}")
        return next(iter(eval_views(split, spec, np.array([index]), 1, num_workers=0)))
    raise DatasetError(f"--query '{show_path(query)}' is neither an image file nor "
                       f"<split>/<index> of a dataset directory SOURCE: pass one")


def nearest(rows: np.ndarray, q: np.ndarray, k: int,
            chunk: int = SIMILARITY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosine similarities) of the k rows most similar to `q`, best first (ties: the
    lower index), reading `rows` (e.g. a memory map) `chunk` rows at a time."""
    q = q.astype(np.float32) / max(float(np.linalg.norm(q)), 1e-12)
    best_i, best_s = np.empty(0, np.int64), np.empty(0, np.float32)
    for s in range(0, len(rows), chunk):
        block = np.asarray(rows[s : s + chunk], dtype=np.float32)
        sims = block @ q / np.maximum(np.linalg.norm(block, axis=1), 1e-12)
        cand_i = np.concatenate([best_i, np.arange(s, s + len(block))])
        cand_s = np.concatenate([best_s, sims.astype(np.float32)])
        keep = np.argsort(-cand_s, kind="stable")[:k]
        best_i, best_s = cand_i[keep], cand_s[keep]
    return best_i, best_s


def lines_at(path: Path, wanted) -> dict[int, str]:
    """Lines `wanted` (0-based) of a text file, read in one pass without holding the others."""
    wanted, found = set(int(i) for i in wanted), {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted:
                found[i] = line.rstrip("\n")
    return found


def query(args, ckpt: Path, encoder, x: torch.Tensor, files: dict[str, Path]) -> dict:
    """The --k nearest rows to the query's view `x`, printed and written to the query JSON."""
    q = encode(encoder, x, args.device)[0]
    idx, sims = nearest(np.load(files["npy"], mmap_mode="r"), q, args.k)
    paths = lines_at(files["files.txt"], idx)
    result = {"query": args.query, "checkpoint": str(ckpt), "embeddings": str(files["npy"]),
              "k": args.k,
              "neighbours": [{"rank": r + 1, "index": int(i), "similarity": float(s),
                              "path": paths.get(int(i))}
                             for r, (i, s) in enumerate(zip(idx, sims))]}
    out = Path(args.query_json) if args.query_json else files["query.json"]
    write_atomic(out, json.dumps(result, indent=1))
    from rich.table import Table

    t = Table(title=f"Nearest to {args.query}")
    for col, just in (("rank", "right"), ("similarity", "right"), ("image", "left")):
        t.add_column(col, justify=just)
    for n in result["neighbours"]:
        t.add_row(str(n["rank"]), f"{n['similarity']:.4f}", n["path"])
    print_report([t], [f"neighbours: {out}"])
    return result


@released_on_return  # the lock of PREFIX
def run(args) -> dict:
    check_device(args.device)
    ckpt, cfg, model = load_pretrained(args.checkpoint)
    source = Source(args.source, args.split, cfg)
    prefix = output_prefix(ckpt, source.path, source.split_name, args.out)
    files = outputs(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)  # kept: the lock beside PREFIX goes
    acquire(lock_beside(prefix), f"--out '{show_path(prefix)}'",
            "wait for that command to end, or pass another --out").until_return()
    ckpt = ckpt.resolve()  # PREFIX.json names it wherever the command runs from
    query_x = None
    if args.query:  # the query and its output checked before the split is embedded
        query_x = query_view(args.query, source, cfg.augment)
        problem = unwritable(args.query_json or files["query.json"])
        if problem:
            raise ConfigError(f"--query-json: the neighbours cannot be written: {problem}: "
                              f"pass another --query-json")
    encoder = model.encoder.to(args.device).to(memory_format=torch.channels_last).eval()
    meta = reusable(files, ckpt, source) if args.query else None
    if meta is None:
        meta = embed(args, ckpt, cfg, encoder, source, files)
        _print_summary(meta, files)
    if args.query:
        meta["query"] = query(args, ckpt, encoder, query_x, files)
    return meta


def _print_summary(meta: dict, files: dict[str, Path]) -> None:
    from rich.table import Table

    t = Table(title=f"Embeddings of step {meta['step']}")
    for col in ("source", "images", "dim", "device", "seconds", "images/s"):
        t.add_column(col, justify="left" if col == "source" else "right")
    rate = meta["images_per_s"]
    t.add_row(Path(meta["source"]).name + (f" ({meta['split']})" if meta["split"] else ""),
              str(meta["count"]), str(meta["dim"]), meta["device"], f"{meta['seconds']:.1f}",
              f"{rate:.0f}" if rate else "-")
    print_report([t], [f"{kind}: {files[kind]}" for kind in ("npy", "files.txt", "json")])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("embed", lambda: run(args), oom_fix="pass a smaller --batch-size")


if __name__ == "__main__":
    sys.exit(main())
