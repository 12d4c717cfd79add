"""Two-view loader throughput: torchvision reference vs DALI vs FFCV on the same inputs.

    python -m tools.bench_loader [--device cpu|cuda] [--quick] [--json PATH] [--images DIR]
                                 [--workers N] [--batch-size B] [--repeat K]

Cases: (a) real ImageNet JPEGs cropped to 224 (skipped, with the reason, when no images are
found), (b) 32x32 uint8 arrays. Every backend gets the same worker count; the metric is
two-view images per second after one warm-up pass (which also pays FFCV's compilation: one
Loader per case, compiled once and reused for every timed epoch), reported as a ratio to the
torchvision reference. --quick uses fewer images and times a single epoch; the full run times
whole epochs over the full JPEG list (twice) and 16384 arrays (twice).

Time to first batch: the seconds from `build_loader` to the first batch, in a fresh Python
process (the backend's own imports included), twice: cold, with an empty numba cache (the first
run on a machine: every kernel compiles), and warm, with the cache the cold run left (every run
after it). FFCV also compiles the code it generates for each Loader; that part is never cached.
--quick measures it on the array case only.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines.loader import build_loader
from pipelines.sources import Split, beton_file
from pipelines.spec import AugmentSpec
from tools import benchmark
from train.cli import at_least

IMPLS = ("torchvision", "dali", "ffcv")
BASELINE = "torchvision"
METRIC = "images_per_s"
FIRST_BATCH = ("first_batch_s_cold", "first_batch_s_warm")
# Loaders live until the process exits: numba's finaliser for a discarded FFCV Loader's
# compiled JPEG decoder raises a harmless but noisy KeyError (it is skipped at exit).
_KEEP_ALIVE: list = []


def build_parser():
    p = benchmark.parser("bench_loader", __doc__.split("\n\n")[0],
                         device="where the views end up",
                         quick="small sizes, under a minute on 2 CPU cores")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEGs for case (a) (default: $SIMCLR_IMAGENET_SAMPLE or "
                        "../shared/data/imagenet-sample)")
    p.add_argument("--workers", type=at_least(1), default=2,
                   help="CPU workers for every backend (default 2)")
    p.add_argument("--batch-size", type=at_least(2), default=None,
                   help="default 64 (JPEG) / 256 (arrays); 32 / 128 with --quick")
    p.add_argument("--repeat", type=at_least(1), default=None,
                   help="passes over the JPEG list per timed run (default 2, 1 with --quick)")
    return p


def _time_loader(loader, min_images: int) -> float:
    """Images/s over whole epochs totalling at least `min_images` (after one warm-up epoch)."""
    for _ in loader:
        pass
    seen, t0, epoch = 0, time.perf_counter(), 1
    while seen < min_images:
        loader.set_epoch(epoch)
        for batch in loader:
            seen += len(batch.index)
        epoch += 1
    if batch.view1.is_cuda:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def first_batch_seconds(impl: str, split: Split, spec: AugmentSpec, batch_size: int,
                        workers: int, device: str) -> float:
    """Seconds from `build_loader` to the first batch, in this process."""
    t0 = time.perf_counter()
    loader = build_loader(impl, split, spec, batch_size=batch_size, seed=0,
                          device=torch.device(device), num_workers=workers, shuffle=True,
                          drop_last=False)
    batch = next(iter(loader))
    if batch.view1.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _default_start_method() -> None:
    multiprocessing.set_start_method(None, force=True)


def fresh_process_first_batch(cache_dir: Path, *args) -> float:
    """`first_batch_seconds(*args)` in a new interpreter whose numba cache is `cache_dir`. It
    takes the platform's default start method again (a spawned process inherits "spawn"), as a
    training process has, for the torchvision loader's workers."""
    before = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(cache_dir)  # read by the new interpreter at its start
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_default_start_method) as pool:
            return pool.submit(first_batch_seconds, *args).result(timeout=600)
    finally:
        if before is None:
            os.environ.pop("NUMBA_CACHE_DIR")
        else:
            os.environ["NUMBA_CACHE_DIR"] = before


def _cases(args, tmp: Path):
    """(name, split, spec, batch_size, min_images, skip_reason); quick mode keeps the whole run
    under a minute on 2 CPU cores, most of it FFCV's compilation."""
    quick = args.quick
    images = args.images or benchmark.default_images()
    files = sorted(str(p) for p in images.glob("*")
                   if p.suffix.lower() in (".jpeg", ".jpg")) if images.is_dir() else []
    if not files:
        yield ("jpeg224", None, None, 0, 0,
               f"no JPEGs in '{images}' (set --images or SIMCLR_IMAGENET_SAMPLE)")
    else:
        n = min(64 if quick else len(files), len(files))
        repeat = args.repeat or (1 if quick else 2)
        root = tmp / "jpeg"
        root.mkdir()
        split = Split("train", np.zeros(n, dtype=np.int64), files=files[:n], root=root)
        bs = args.batch_size or (32 if quick else 64)
        yield "jpeg224", split, AugmentSpec(size=224), bs, n * repeat, None
    n = 1024 if quick else 16384
    rng = np.random.default_rng(0)
    root = tmp / "arrays"
    root.mkdir()
    split = Split("train", rng.integers(0, 10, n).astype(np.int64),
                  images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), root=root)
    spec = AugmentSpec(size=32, jitter_strength=0.5, blur_p=0.0)
    bs = args.batch_size or (128 if quick else 256)
    yield "array32", split, spec, bs, n * (1 if quick else 2), None


def headline(report: dict) -> str:
    """gpu_check's line for this report: images/s of every case and loader against the baseline,
    the time to first batch cold and warm where measured, and what was skipped. KeyError for a
    key or metric the report lacks."""
    rows = benchmark.by_key(report, METRIC, *FIRST_BATCH)
    out = []
    for (case, impl, metric), row in rows.items():
        if metric != METRIC:
            continue
        text = f"{case} {impl}: {row['value']:.0f} img/s"
        if impl != row["baseline"] and benchmark.finite(row["ratio"]):
            text += f" ({row['ratio']:.2f}x {row['baseline']})"
        cold, warm = (rows.get((case, impl, m)) for m in FIRST_BATCH)  # --quick: arrays only
        if cold and warm:
            text += f", first batch {cold['value']:.1f} s cold / {warm['value']:.1f} s warm"
        out.append(text)
    return "; ".join(out + [f"{k} skipped" for k in report["settings"]["skipped"]])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_loader")
    results, skipped, used = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmpdir:
        for case, split, spec, bs, min_images, skip in _cases(args, Path(tmpdir)):
            if skip:
                skipped[case] = skip
                print(f"[{case}] skipped: {skip}")
                continue
            used[case] = {"batch_size": bs, "images": len(split), "min_timed_images": min_images}
            values, first = {}, {m: {} for m in FIRST_BATCH}
            for impl in IMPLS:
                try:
                    if impl == "ffcv":
                        from pipelines.ffcv_writer import write_beton

                        write_beton(split, beton_file(split.root, split.name))
                    loader = build_loader(impl, split, spec, batch_size=bs, seed=0, device=device,
                                          num_workers=args.workers, shuffle=True,
                                          drop_last=False)
                    _KEEP_ALIVE.append(loader)
                    values[impl] = _time_loader(loader, min_images)
                except Exception as e:
                    skipped[f"{case}/{impl}"] = f"{type(e).__name__}: {e}"
                    print(f"[{case}] {impl} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                print(f"[{case}] {impl}: {values[impl]:.0f} img/s", flush=True)
                if args.quick and case != "array32":
                    continue
                cache = Path(tmpdir) / f"numba-cache-{case}-{impl}"  # empty: the cold run fills it
                for metric in FIRST_BATCH:
                    first[metric][impl] = fresh_process_first_batch(
                        cache, impl, split, spec, bs, args.workers, str(device))
                print(f"[{case}] {impl}: first batch after {first[FIRST_BATCH[0]][impl]:.1f} s "
                      f"cold, {first[FIRST_BATCH[1]][impl]:.1f} s warm", flush=True)
            results += benchmark.rows(case, METRIC, values, BASELINE)
            for metric in FIRST_BATCH:
                if first[metric]:
                    results += benchmark.rows(case, metric, first[metric], BASELINE)
    settings = {"workers": args.workers,
                "batch_size": {c: u["batch_size"] for c, u in used.items()},
                "quick": args.quick, "repeat": args.repeat or (1 if args.quick else 2),
                "cases": used, "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "images": str(args.images or benchmark.default_images()), "skipped": skipped,
                "timing": "two-view images/s over whole epochs after one warm-up epoch",
                "first_batch": "seconds from build_loader to the first batch in a fresh process "
                               "(imports included): cold = empty numba cache, warm = the cache "
                               "the cold run wrote" + ("; array32 only" if args.quick else "")}
    print()
    benchmark.print_table(results, [("img/s", METRIC, "{:.0f}", "value"),
                                    (f"vs {BASELINE}", METRIC, "{:.2f}x", "ratio"),
                                    ("1st batch cold s", FIRST_BATCH[0], "{:.1f}", "value"),
                                    ("warm s", FIRST_BATCH[1], "{:.1f}", "value")])
    benchmark.write_json(args.json, benchmark.report(device, settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
