"""A picture of what the augmentation recipe does, before a run spends hours on it.

    python -m tools.preview [--config YAML | --checkpoint RUN] [--data DIR] [--images 8]
                            [--backends torchvision,dali,ffcv] [--out preview.png]

One row per image: its evaluation view (un-augmented), then view 1 and view 2 of each loader
backend for epoch --epoch of a loader seeded --seed. A sample's views depend only on (seed, epoch,
index) in every backend, so the backends' columns show the same crops and colours, up to each
backend's resampling and rounding; the table (and the JSON beside the PNG) gives each backend's
difference from torchvision's views in uint8 levels. By default every backend that can run here
is shown, others are skipped with a note; one named in --backends that cannot run is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from pipelines.loader import BACKENDS, BackendUnavailable, build_loader, require_backend
from pipelines.loader_base import pixel_stats
from pipelines.sources import DatasetError, open_dataset, show_path
from tools.plot import pyplot, save_png
from train.atomic import write_atomic
from train.checkpoint import resolve_checkpoint
from train.cli import at_least
from train.commands import print_report, run_command
from train.config import ConfigError, load_config
from train.features import eval_views

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "train/configs/fashion_mnist_demo.yaml"
REFERENCE = "torchvision"
CELL_PX = 96  # smallest side of a drawn cell: 28-pixel images are upscaled (nearest) to 112
# margins around the cells, in pixels: row labels left; on top the column labels (HEAD_PX) under
# the title's lines (LINE_PX each, about CHAR_PX a character)
GAP_PX, LEFT_PX, RIGHT_PX, HEAD_PX, LINE_PX, CHAR_PX, BOTTOM_PX, DPI = 4, 110, 8, 44, 15, 7, 6, 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.preview",
                                description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default=None,
                     help=f"the recipe whose augmentation to show (default {DEFAULT_CONFIG})")
    src.add_argument("--checkpoint", default=None, metavar="RUN",
                     help="show the recipe of this run directory, checkpoints/ folder or step-* "
                     "checkpoint instead")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. augment.crop_area=[0.2,1] (repeatable)")
    p.add_argument("--data", default=None,
                   help="dataset directory from tools.convert (default: the config's data.path)")
    p.add_argument("--split", default=None, help="split to draw from (default: data.train_split)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--images", type=at_least(1), default=8, metavar="N",
                      help="a seeded random draw of N images of the split (default 8)")
    pick.add_argument("--indices", default=None, metavar="I,J,...",
                      help="these images of the split, in this order")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated loaders among {','.join(BACKENDS)} (default: every one "
                   f"that can run here)")
    p.add_argument("--epoch", type=at_least(0), default=0,
                   help="the epoch whose augmentation to draw (default 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="loader seed, which also draws --images (default: train.seed)")
    p.add_argument("--out", type=Path, default=None,
                   help="the PNG (default ./preview-<dataset name>.png); a JSON of the indices, "
                   "backends and differences is written beside it")
    return p


# ---------------------------------------------------------------- settings

def load_recipe(args):
    """The run's or the recipe's config, with --set overrides."""
    bad = [x for x in args.set if "=" not in x]
    if bad:
        raise ConfigError(f"--set '{bad[0]}' is not KEY=VALUE: write e.g. --set augment.size=32")
    overrides = [f"--{x}" for x in args.set]
    if args.checkpoint:
        return load_config(resolve_checkpoint(args.checkpoint) / "config.yaml", overrides)
    return load_config(args.config or REPO / DEFAULT_CONFIG, overrides)


def pick_indices(n: int, images: int, indices: str | None, seed: int) -> np.ndarray:
    if indices is None:
        return np.sort(np.random.default_rng(seed).choice(n, min(images, n), replace=False))
    try:
        idx = np.array([int(x) for x in indices.split(",") if x.strip()], dtype=np.int64)
    except ValueError:
        raise ConfigError(f"--indices '{indices}' is not a comma-separated list of integers: "
                          f"write e.g. --indices 3,17,42") from None
    if len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
        raise ConfigError(f"--indices '{indices}' must name images 0..{n - 1} of the split")
    return idx


def pick_backends(requested: str | None, ds, split: str) -> tuple[list[str], dict[str, str]]:
    """(backends to show, {skipped backend: why}); a requested one that cannot run raises."""
    names = [b.strip() for b in (requested or ",".join(BACKENDS)).split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise ConfigError(f"--backends: unknown backend(s) '{','.join(unknown)}': choose among "
                          f"{','.join(BACKENDS)}")
    shown, skipped = [], {}
    for b in names:
        try:
            require_backend(b)
            if b == "ffcv":
                ds.beton(split)
        except (BackendUnavailable, DatasetError) as e:
            if requested:
                raise ConfigError(f"--backends {b}: {e}") from None
            skipped[b] = str(e)
            continue
        shown.append(b)
    return shown, skipped


# ---------------------------------------------------------------- the grid

def to_uint8(x: torch.Tensor, spec) -> np.ndarray:
    """Normalised float [B, 3, S, S] -> uint8 [B, S, S, 3], rounded."""
    mean, std = pixel_stats(spec, torch.device("cpu"))
    px = (x.float().cpu() * std + mean).round().clamp(0, 255).to(torch.uint8)
    return px.permute(0, 2, 3, 1).contiguous().numpy()


def backend_views(backend: str, split, spec, indices: np.ndarray, *, seed: int,
                  epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(view 1, view 2) of `indices`, uint8 [N, S, S, 3], as `backend` yields them in `epoch`."""
    loader = build_loader(backend, split, spec, batch_size=len(indices), seed=seed,
                          shuffle=False, drop_last=False, subset=indices, device="cpu",
                          num_workers=0)
    loader.set_epoch(epoch)
    batches = iter(loader)
    try:
        batch = next(batches)
    finally:
        batches.close()
    assert np.array_equal(batch.index.cpu().numpy(), indices), "loader order"
    return to_uint8(batch.view1, spec), to_uint8(batch.view2, spec)


def grid_columns(split, spec, indices: np.ndarray, backends: list[str], *, seed: int,
                 epoch: int, progress=None) -> dict[str, np.ndarray]:
    """The grid's columns in order: "original" (the evaluation view), then "<backend> view 1",
    "<backend> view 2" per backend; each uint8 [N, S, S, 3], row i is image indices[i]."""
    original = torch.cat(list(eval_views(split, spec, indices, len(indices), num_workers=0)))
    columns = {"original": to_uint8(original, spec)}
    for b in backends:
        v1, v2 = backend_views(b, split, spec, indices, seed=seed, epoch=epoch)
        columns[f"{b} view 1"], columns[f"{b} view 2"] = v1, v2
        if progress is not None:
            progress(1)
    return columns


def fidelity(columns: dict[str, np.ndarray], backends: list[str]) -> dict:
    """{backend: {"view 1": {"mean", "max"}, ...}}: |difference| from torchvision's views in uint8
    levels (every backend but the reference, when the reference is shown)."""
    if REFERENCE not in backends:
        return {}
    out = {}
    for b in backends:
        if b == REFERENCE:
            continue
        out[b] = {}
        for view in ("view 1", "view 2"):
            d = np.abs(columns[f"{b} {view}"].astype(np.int16)
                       - columns[f"{REFERENCE} {view}"].astype(np.int16))
            out[b][view] = {"mean": float(d.mean()), "max": int(d.max())}
    return out


def cell_scale(size: int) -> int:
    """Nearest-neighbour upscaling factor that makes a cell at least CELL_PX wide."""
    return max(1, math.ceil(CELL_PX / size))


def layout(rows: int, cols: int, size: int, title: str) -> dict:
    """Pixel geometry of the figure: cells of the image upscaled by `cell_scale`, GAP_PX apart,
    their top-left corner at (LEFT_PX, "top"); the title wrapped to the figure's width."""
    cell = size * cell_scale(size)
    width = LEFT_PX + cols * (cell + GAP_PX) + RIGHT_PX
    lines = textwrap.wrap(title, max(30, width // CHAR_PX))
    top = 6 + LINE_PX * len(lines) + HEAD_PX
    return {"cell": cell, "width": width, "height": top + rows * (cell + GAP_PX) + BOTTOM_PX,
            "top": top, "title": "\n".join(lines)}


def mosaic(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The cells side by side, upscaled (nearest), on white: uint8 [H, W, 3]."""
    cols = list(columns.values())
    rows, size = cols[0].shape[0], cols[0].shape[1]
    scale, step = cell_scale(size), size * cell_scale(size) + GAP_PX
    out = np.full((rows * step, len(cols) * step, 3), 255, np.uint8)
    for c, col in enumerate(cols):
        big = col.repeat(scale, axis=1).repeat(scale, axis=2)
        for r in range(rows):
            y, x = r * step + GAP_PX // 2, c * step + GAP_PX // 2
            out[y : y + big.shape[1], x : x + big.shape[2]] = big[r]
    return out


def draw(columns: dict[str, np.ndarray], row_labels: list[str], title: str):
    """The figure: the mosaic drawn 1:1 (one image pixel per screen pixel), labels around it."""
    plt = pyplot()
    image = mosaic(columns)
    n_cols, size = len(columns), next(iter(columns.values())).shape[1]
    geo = layout(len(row_labels), n_cols, size, title)
    fig = plt.figure(figsize=(geo["width"] / DPI, geo["height"] / DPI), dpi=DPI)
    grid_h, grid_w = image.shape[:2]
    ax = fig.add_axes((LEFT_PX / geo["width"], BOTTOM_PX / geo["height"],
                       grid_w / geo["width"], grid_h / geo["height"]))
    ax.imshow(image, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    step = geo["cell"] + GAP_PX
    for c, name in enumerate(columns):
        ax.text((c + 0.5) * step, -6, name.replace(" view", "\nview"), ha="center",
                va="bottom", fontsize=9)
    for r, label in enumerate(row_labels):
        ax.text(-8, (r + 0.5) * step, label, ha="right", va="center", fontsize=9)
    fig.suptitle(geo["title"], y=1 - 6 / geo["height"], va="top", fontsize=9)
    return fig


# ---------------------------------------------------------------- the command

def preview(args) -> dict:
    cfg = load_recipe(args)
    seed = cfg.train.seed if args.seed is None else args.seed
    ds = open_dataset(args.data or cfg.data.path)
    split = ds.split(args.split or cfg.data.train_split)
    backends, skipped = pick_backends(args.backends, ds, split.name)
    for b, why in skipped.items():
        print(f"preview: skipping {b}: {why}", file=sys.stderr)
    if not backends:
        raise ConfigError("no loader backend can run here: install torchvision")
    indices = pick_indices(len(split), args.images, args.indices, seed)
    spec = cfg.augment

    from tqdm import tqdm

    with tqdm(total=len(backends), desc="views", unit="backend") as bar:
        columns = grid_columns(split, spec, indices, backends, seed=seed, epoch=args.epoch,
                               progress=bar.update)
    classes = split.classes
    labels = [int(y) for y in np.asarray(split.labels)[indices]]
    row_labels = [f"#{i}" + (f"\n{classes[y]}" if 0 <= y < len(classes) else "")
                  for i, y in zip(indices, labels, strict=True)]
    same = ("; every loader draws the same crop and colours for a view (one sampler keyed by "
            "seed, epoch and index), up to its resampling and rounding" if len(backends) > 1
            else "")
    title = (f"{Path(ds.root).resolve().name} '{split.name}', epoch {args.epoch}, seed {seed}: "
             f"the original, then two augmented views per loader{same}")
    out = args.out or Path(f"preview-{Path(ds.root).resolve().name}.png")
    save_png(draw(columns, row_labels, title), out)
    result = {"dataset": str(ds.root), "split": split.name, "indices": indices.tolist(),
              "labels": labels, "epoch": args.epoch, "seed": seed, "backends": backends,
              "skipped": skipped, "reference": REFERENCE, "fidelity": fidelity(columns, backends),
              "spec": dataclasses.asdict(spec), "png": str(out)}
    out_json = out.with_suffix(".json")
    write_atomic(out_json, json.dumps(result, indent=1))
    _print_table(result, out, out_json)
    return result


def _print_table(r: dict, png: Path, js: Path) -> None:
    from rich.table import Table

    tables = []
    if r["fidelity"]:
        t = Table(title=f"|difference| from {REFERENCE}'s views (uint8 levels, "
                        f"{len(r['indices'])} images)")
        for col in ("backend", "view 1 mean", "view 1 max", "view 2 mean", "view 2 max"):
            t.add_column(col, justify="right")
        for b, views in r["fidelity"].items():
            t.add_row(b, *(f"{views[v][k]:.2f}" if k == "mean" else str(views[v][k])
                           for v in ("view 1", "view 2") for k in ("mean", "max")))
        tables.append(t)
    print_report(tables, [f"backends: {', '.join(r['backends'])}"
                          + (f" (skipped: {', '.join(r['skipped'])})" if r["skipped"] else ""),
                          f"wrote {show_path(png)}", f"wrote {show_path(js)}"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("preview", lambda: preview(args))


if __name__ == "__main__":
    sys.exit(main())
