"""End-to-end SimCLR training throughput: the model alone (synthetic views) against each real
loader.

    python -m tools.bench_train --quick
    python -m tools.bench_train --device cuda --archs resnet50 --sizes 224 --json train_cuda.json
    python -m tools.bench_train --device cpu --archs resnet18 --sizes 32 --batch-size 128 --steps 10

Every step is train/pretrain.py's step: both views in one forward of encoder + head (bf16 autocast
and channels_last on CUDA, channels_last on CPU as in the default config), NT-Xent with the
implementation `resolve_impl("auto")` picks, backward, LARS with SimCLR's parameter groups and
the learning rate set from the warmup schedule.

Implementations (the data source of the same step):
    synthetic      pre-made random normalised views already on the device: the model, loss and
                   optimizer alone, the baseline of every ratio
    torchvision    the real loaders of pipelines.loader.build_loader on a temporary dataset: random
    dali           uint8 arrays for sizes up to 64 (e.g. 32); above (e.g. 224), real JPEGs from
    ffcv           --images, $SIMCLR_IMAGENET_SAMPLE or ../shared/data/imagenet-sample beside the
                   repository (without any, the case's real loaders are skipped with the reason).
                   FFCV reads a .beton written first (not timed).

Each case is one (arch, image size); its dataset holds exactly (warmup + steps) batches, so one
epoch covers the run and no epoch restart falls inside the timing. Per step, "data wait" is the
time spent getting the next batch and "compute" the rest (forward, loss, backward, optimizer;
CUDA is synchronised at the end of every step so the split is exact). Metrics, over the timed
steps after the warm-up ones (which absorb worker start-up, pipeline builds, FFCV's compilation
and torch.compile): images/s (each image is two views), views/s, mean step / data-wait / compute
milliseconds, the median step (robust to bursts of load from other processes on a shared machine;
the JSON settings record the load averages), the data-wait fraction, achieved TFLOP/s of model
FLOPs (model/flops.py) and, on a GPU with a known peak, model FLOPs utilisation. One model and
optimizer per case serve its data sources in turn, synthetic first. The data-wait ratios compare
with an in-memory source whose wait is near zero: read those values as absolute times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.encoder import ARCHS
from model.flops import model_flops_utilisation, peak_flops, training_flops_per_image
from model.nt_xent import resolve_impl
from model.simclr import SimCLR
from pipelines.loader import BACKENDS, build_loader
from pipelines.sources import Split, beton_file
from pipelines.spec import AugmentSpec, TwoViewBatch
from tools import benchmark
from train.cli import above, at_least
from train.lars import LARS, lars_param_groups
from train.schedule import lr_schedule, scaled_lr
from train.step import training_step

BASELINE = "synthetic"
IMPLS = (BASELINE, *BACKENDS)
# metric name -> (table header, format); the order of the JSON rows and the table columns
METRICS = {
    "images_per_s": ("img/s", "{:.1f}"),
    "views_per_s": ("views/s", "{:.1f}"),
    "step_ms": ("step ms", "{:.1f}"),
    "step_ms_median": ("median ms", "{:.1f}"),
    "data_wait_ms": ("wait ms", "{:.1f}"),
    "compute_ms": ("compute ms", "{:.1f}"),
    "data_wait_frac": ("wait %", "{:.1%}"),
    "achieved_tflops": ("TFLOP/s", "{:.3f}"),
    "mfu": ("MFU", "{:.1%}"),
}
QUICK = {"archs": "resnet18", "sizes": "32", "backends": "synthetic,torchvision,dali",
         "batch_size": 8, "steps": 2, "warmup": 1}


def build_parser():
    p = benchmark.parser(
        "bench_train",
        "Time whole SimCLR training steps with synthetic in-memory views (the model alone) and "
        "with each real loader; print a table, optionally write JSON.",
        device="where the model trains", quick="a small run; see below",
        epilog="--quick: resnet18 at size 32 only, batch 8, 1 warm-up + 2 timed steps, backends "
               "synthetic, torchvision and dali (under a minute on 2 CPU cores); any option given "
               "explicitly overrides these.",
    )
    p.add_argument("--archs", default=None,
                   help="comma-separated encoders (default resnet18,resnet50)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated image sides: up to 64 from random arrays (small stem), "
                        "above from JPEGs (default 32,224)")
    p.add_argument("--width", type=above(0.0), default=1.0,
                   help="encoder channel multiplier (default 1.0, torchvision's widths; smaller "
                        "for smoke runs)")
    p.add_argument("--batch-size", type=at_least(2), default=None,
                   help="images per step, each two views (default: CPU 32 at size <= 64, 8 above; "
                        "CUDA 512 / 256)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated data sources among {','.join(IMPLS)} (default: all); "
                        f"'{BASELINE}' is always run, as the baseline")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="timed steps per run (default CPU 10, CUDA 50)")
    p.add_argument("--warmup", type=at_least(0), default=None,
                   help="untimed steps first (default CPU 2, CUDA 10)")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="loader workers / threads for every backend (default: CPU cores, at most "
                        "16)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEGs for size 224 (default: $SIMCLR_IMAGENET_SAMPLE or "
                        "../shared/data/imagenet-sample beside the repository)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compilation "
                   "falls in the warm-up steps: raise --warmup)")
    return p


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------- data sources

class SyntheticTwoViews:
    """`steps` TwoViewBatches cycling through two pre-made batches of N(0, 1) views on `device`
    (the statistics of normalised images), channels_last like every real loader's output."""

    def __init__(self, batch_size: int, size: int, steps: int, device: torch.device,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        def views():
            x = torch.randn(batch_size, 3, size, size, generator=g)  # [B, 3, S, S]
            return x.to(device).contiguous(memory_format=torch.channels_last)
        index = torch.arange(batch_size, device=device)
        self.pool = [TwoViewBatch(views(), views(), torch.zeros_like(index), index)
                     for _ in range(2)]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.pool[i % 2]


def _dataset(size: int, n: int, root: Path, images: Path
             ) -> tuple[Split | None, AugmentSpec, str | None]:
    """(split of n samples, augmentation spec, reason when the case cannot run)."""
    root.mkdir(parents=True, exist_ok=True)
    if size <= 64:
        rng = np.random.default_rng(0)
        split = Split("train", rng.integers(0, 10, n).astype(np.int64),
                      images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), root=root)
        return split, AugmentSpec(size=size, jitter_strength=0.5, blur_p=0.0), None
    files = sorted(str(p) for p in images.glob("*")
                   if p.suffix.lower() in (".jpeg", ".jpg")) if images.is_dir() else []
    if not files:
        return None, AugmentSpec(size=size), (f"no JPEGs in '{images}' for size {size} "
                                              f"(set --images or SIMCLR_IMAGENET_SAMPLE)")
    files = [files[i % len(files)] for i in range(n)]  # a small sample is repeated to fill the run
    split = Split("train", np.zeros(n, dtype=np.int64), files=files, root=root)
    return split, AugmentSpec(size=size), None


def _real_loader(impl: str, split: Split, spec: AugmentSpec, batch_size: int,
                 device: torch.device, workers: int):
    if impl == "ffcv":
        beton = beton_file(split.root, split.name)
        if not beton.is_file():
            from pipelines.ffcv_writer import write_beton

            write_beton(split, beton)
    return build_loader(impl, split, spec, batch_size=batch_size, seed=0, device=device,
                        num_workers=workers, shuffle=True, drop_last=True)


# ---------------------------------------------------------------- the training step

def _time_run(source, model, optimizer, lrs, warmup: int, steps: int, temperature: float,
              loss_impl: str, autocast, device: torch.device, batch_size: int) -> dict:
    """Seconds waiting for data and computing over the `steps` steps after `warmup` ones, and each
    timed step's wall time."""
    cuda = device.type == "cuda"
    wait = compute = 0.0
    step_s = []
    it = iter(source)
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            if batch is None:
                raise RuntimeError(f"the loader ended after {i} of {warmup + steps} batches")
            if len(batch.index) != batch_size:
                raise RuntimeError(f"batch {i} holds {len(batch.index)} images, "
                                   f"expected {batch_size}")
            loss = training_step(model, optimizer, batch, lrs[i], temperature, loss_impl, autocast)
            if cuda:
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            if i >= warmup:
                wait += t1 - t0
                compute += t2 - t1
                step_s.append(t2 - t0)
    finally:
        if hasattr(it, "close"):
            it.close()  # stop the loader's pipeline/workers now, not at garbage collection
    return {"wait_s": wait, "compute_s": compute, "step_s": step_s, "final_loss": float(loss)}


def _metrics(run: dict, steps: int, batch_size: int, flops_per_image: float,
             peak: float | None) -> dict:
    total = run["wait_s"] + run["compute_s"]
    ips = steps * batch_size / total
    out = {"images_per_s": ips, "views_per_s": 2 * ips, "step_ms": 1e3 * total / steps,
           "step_ms_median": 1e3 * statistics.median(run["step_s"]),
           "data_wait_ms": 1e3 * run["wait_s"] / steps,
           "compute_ms": 1e3 * run["compute_s"] / steps,
           "data_wait_frac": run["wait_s"] / total,
           "achieved_tflops": flops_per_image * ips / 1e12}
    mfu = model_flops_utilisation(flops_per_image, ips, peak)
    if mfu is not None:
        out["mfu"] = mfu
    return out


# ---------------------------------------------------------------- driver

def _settings(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    q = QUICK if args.quick else {}
    archs = _csv(args.archs or q.get("archs", "resnet18,resnet50"))
    sizes = [int(s) for s in _csv(args.sizes or q.get("sizes", "32,224"))]
    backends = _csv(args.backends or q.get("backends", ",".join(IMPLS)))
    unknown = [b for b in backends if b not in IMPLS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}: choose among "
                         f"{', '.join(IMPLS)}")
    impls = [BASELINE] + [b for b in IMPLS if b in backends and b != BASELINE]
    steps = args.steps if args.steps is not None else q.get("steps", 50 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else q.get("warmup", 10 if cuda else 2)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    batch_size = args.batch_size if args.batch_size is not None else q.get("batch_size")
    for name, v, lo in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--workers", workers, 1),
                        ("--batch-size", 2 if batch_size is None else batch_size, 2)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise ValueError(f"unknown arch(s) {', '.join(bad)}: choose among {', '.join(ARCHS)}")
    if any(s < 8 for s in sizes):
        raise ValueError(f"--sizes must be >= 8, got {sizes}")
    if not args.width > 0:
        raise ValueError(f"--width must be > 0, got {args.width}")
    return {"archs": archs, "sizes": sizes, "impls": impls, "steps": steps, "warmup": warmup,
            "workers": workers, "batch_size": batch_size, "width": args.width,
            "compile": args.compile, "images": args.images or benchmark.default_images()}


def _batch_size(s: dict, size: int, cuda: bool) -> int:
    if s["batch_size"]:
        return s["batch_size"]
    if cuda:
        return 512 if size <= 64 else 256
    return 32 if size <= 64 else 8


def run_case(arch: str, size: int, s: dict, device: torch.device, tmp: Path, skipped: dict,
             case_info: dict) -> list[dict]:
    """Result rows of one (arch, size): every data source in turn through one model and optimizer
    (so torch.compile compiles once per case); fills skipped[case/impl] and case_info[case]."""
    cuda = device.type == "cuda"
    case = f"{arch}-{size}"
    bs = _batch_size(s, size, cuda)
    steps, warmup = s["steps"], s["warmup"]
    split, spec, skip = _dataset(size, (warmup + steps) * bs, tmp / case, s["images"])

    torch.manual_seed(0)
    small_stem = size <= 64  # the 3x3 stem without max-pool of the 32x32 recipes
    model = SimCLR(arch, width=s["width"], small_stem=small_stem).to(device)
    model = model.to(memory_format=torch.channels_last)
    flops = training_flops_per_image(model, size)
    peak = peak_flops(device, torch.bfloat16 if cuda else torch.float32)
    optimizer = LARS(lars_param_groups(model, 1e-6), lr=0.0, momentum=0.9, eta=0.001)
    model.train()
    step_model = torch.compile(model) if s["compile"] else model
    loss_impl = resolve_impl("auto", device, model.head[-1].out_features, torch.float32)
    temperature = 0.5 if small_stem else 0.1
    lrs = lr_schedule(scaled_lr(0.3, bs), warmup + steps, warmup).tolist()
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda
                else contextlib.nullcontext)
    case_info[case] = {"batch_size": bs, "width": s["width"], "small_stem": small_stem,
                       "augment": dataclasses.asdict(spec), "loss_impl": loss_impl,
                       "temperature": temperature, "training_flops_per_image": flops,
                       "peak_flops": peak, "final_loss": {}}
    print(f"[{case}] batch {bs}, {flops / 1e9:.2f} GFLOP per image (2 views, fwd+bwd), "
          f"loss {loss_impl}", flush=True)

    threads = torch.get_num_threads()
    values: dict[str, dict] = {}
    for impl in s["impls"]:
        if impl != BASELINE and skip:
            skipped[f"{case}/{impl}"] = skip
            continue
        try:
            if impl == BASELINE:
                source = SyntheticTwoViews(bs, size, warmup + steps, device)
            else:
                source = _real_loader(impl, split, spec, bs, device, s["workers"])
            run = _time_run(source, step_model, optimizer, lrs, warmup, steps, temperature,
                            loss_impl, autocast, device, bs)
        except Exception as e:  # a backend that cannot run here is reported and skipped
            skipped[f"{case}/{impl}"] = f"{type(e).__name__}: {e}"
            print(f"[{case}] {impl} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        finally:
            source = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            torch.set_num_threads(threads)  # a loader may change the process-wide thread count
        values[impl] = _metrics(run, steps, bs, flops, peak)
        case_info[case]["final_loss"][impl] = run["final_loss"]
        m = values[impl]
        print(f"[{case}] {impl}: {m['images_per_s']:.1f} img/s, wait {m['data_wait_frac']:.0%}",
              flush=True)
    if skip:
        print(f"[{case}] real backends skipped: {skip}", flush=True)

    base = values.get(BASELINE, {})
    return [benchmark.row(case, impl, metric, v, BASELINE, base.get(metric))
            for impl, metrics in values.items() for metric, v in metrics.items()]


def _loads(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def headline(report: dict) -> str:
    """gpu_check's line for this report: images/s of every case and data source, TFLOP/s and MFU
    (where the peak is known) of the synthetic ones, the real loaders against them, and what was
    skipped. KeyError for a key or metric the report lacks."""
    rows = benchmark.by_key(report, "images_per_s", "achieved_tflops")
    out = []
    for (case, impl, metric), row in rows.items():
        if metric != "images_per_s":
            continue
        text = f"{case} {impl}: {row['value']:.0f} img/s"
        if impl == BASELINE:
            text += f", {rows[(case, impl, 'achieved_tflops')]['value']:.1f} TFLOP/s"
            mfu = rows.get((case, impl, "mfu"))  # only on a GPU with a known peak
            if mfu:
                text += f", MFU {100 * mfu['value']:.0f}%"
        elif benchmark.finite(row["ratio"]):
            text += f" ({row['ratio']:.2f}x {BASELINE})"
        out.append(text)
    return "; ".join(out + [f"{k} skipped" for k in report["settings"]["skipped"]])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_train")
    try:
        s = _settings(args, device)
    except ValueError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    results, skipped, case_info = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmpdir:
        for arch in s["archs"]:
            for size in s["sizes"]:
                results += run_case(arch, size, s, device, Path(tmpdir), skipped, case_info)
    cuda = device.type == "cuda"
    settings = {
        "archs": s["archs"], "sizes": s["sizes"], "backends": s["impls"], "width": args.width,
        "steps": s["steps"], "warmup": s["warmup"], "workers": s["workers"], "quick": args.quick,
        "compile": args.compile, "precision": "bf16 autocast" if cuda else "fp32",
        "channels_last": True, "optimizer": "LARS (momentum 0.9, eta 0.001, weight decay 1e-6)",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "images": str(s["images"]), "cases": case_info, "skipped": skipped,
        "timing": "per step: data wait = getting the next batch, compute = forward+loss+"
                  "backward+LARS (CUDA synchronised each step); means over the timed steps after "
                  "warm-up; images/s counts images, each two views",
        "flops": "convolution and matmul FLOPs (2 per multiply-add), forward + backward, both "
                 "views, counted by torch.utils.flop_counter (model/flops.py)"}
    print()
    benchmark.print_table(results, [(h, m, fmt, "value") for m, (h, fmt) in METRICS.items()]
                          + [(f"img/s vs {BASELINE}", "images_per_s", "{:.2f}x", "ratio")])
    for key, reason in skipped.items():
        print(f"skipped {key}: {reason}")
    print(f"load average (1/5/15 min) before {_loads(load_before)}, after "
          f"{_loads(os.getloadavg())} on {os.cpu_count()} CPU cores")
    benchmark.write_json(args.json, benchmark.report(device, settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
