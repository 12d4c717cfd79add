"""End-to-end SimCLR training throughput: the model alone (synthetic views) against each real
loader; with --micro-batch, the peak memory and images/s of the micro-batched step beside the
plain one.

    python -m tools.bench_train --quick
    python -m tools.bench_train --device cuda --archs resnet50 --sizes 224 --json train_cuda.json
    python -m tools.bench_train --device cpu --archs resnet18 --sizes 32 --batch-size 128 --steps 10
    python -m tools.bench_train --device cpu --archs resnet18 --sizes 28 --width 0.5 --stem-pool \\
        --head-out 64 --batch-size 256,1024,4096,8192 --micro-batch 256 --backends synthetic \\
        --steps 2 --warmup 1    # the demo's encoder: memory and speed of micro-batching

Every step is train/pretrain.py's step: both views in one forward of encoder + head (channels_last;
bf16 autocast where pretraining's train.mixed_precision auto picks it: on a GPU and on a CPU with
native bf16, train/precision.py; --precision chooses), NT-Xent with the
implementation `resolve_impl("auto")` picks, backward, LARS with SimCLR's parameter groups and
the learning rate set from the warmup schedule. The encoder is `SimCLR(arch, width, small_stem=
size <= 64, stem_pool, head_out)`: `--stem-pool` adds the max-pool after the small stem (the
Fashion-MNIST demo's encoder), `--head-out` sets the projection's width.

Implementations (the data source of the same step):
    synthetic      pre-made random normalised views already on the device (two batches, used in
                   turn): the model, loss and optimizer alone, the baseline of every ratio
    synthetic-micro  with --micro-batch M: the same views through the micro-batched step
                   (train/step.py: micro_batched_step, the whole batch's loss and update with
                   the activations of M images, both views, at a time), against the plain step
                   (synthetic) at the same batch; not where M >= the batch (that is the plain step)
    synthetic-bf16 the same views at the other precision of --precision (on a CPU by default: bf16
    synthetic-fp32 beside fp32, or fp32 beside bf16 on a CPU with native bf16), a model of its
                   own from the same initialisation: its ratio is the precision's speed-up
    torchvision    the real loaders of pipelines.loader.build_loader on a temporary dataset: random
    dali           uint8 arrays for sizes up to 64 (e.g. 32); above (e.g. 224), real JPEGs from
    ffcv           --images, $SIMCLR_IMAGENET_SAMPLE or ../shared/data/imagenet-sample beside the
                   repository (without any, the case's real loaders are skipped with the reason);
                   with --images given, its JPEGs at every size (small images for 28/32 px).
                   FFCV reads a .beton written first (not timed). The real loaders always take the
                   plain step (their ratios are to the plain synthetic row).

Each case is one (arch, image size, batch size), named arch-size, or arch-size-bBATCH when
--batch-size lists several; its dataset holds exactly (warmup + steps) batches, so one epoch
covers the run and no epoch restart falls inside the timing. Per step, "data wait" is the
time spent getting the next batch and "compute" the rest (forward, loss, backward, optimizer;
CUDA is synchronised at the end of every step so the split is exact). Metrics, over the timed
steps after the warm-up ones (which absorb worker start-up, pipeline builds, FFCV's compilation
and torch.compile): images/s (each image is two views), views/s, mean step / data-wait / compute
milliseconds, the median step (robust to bursts of load from other processes on a shared machine;
the JSON settings record the load averages), the data-wait fraction, achieved TFLOP/s of model
FLOPs (model/flops.py) and, on a GPU with a known peak, model FLOPs utilisation. Without
--micro-batch one model and optimizer per case serve its data sources in turn, synthetic first.
The data-wait ratios compare with an in-memory source whose wait is near zero: read those values
as absolute times.

Micro-batching (--micro-batch M). Each case's synthetic views are timed with the plain step and
the micro-batched one, each cell (case, step) with a model, optimizer and views of its own, and
the peak memory the cell needed is reported (peak_mem_mb: model, optimizer state, views,
activations):
    CUDA  in this process: torch.cuda.max_memory_allocated() after the cell's steps (the
          statistics reset before it) minus what was allocated before it. A plain step that runs
          out of memory is skipped as not fitting, with the error.
    CPU   each cell in a fresh process (multiprocessing, "spawn"; torch threads as here): its
          resident-set high-water mark is reset after the imports (/proc/self/clear_refs), and
          the cell's peak is VmHWM after the steps minus VmRSS after the imports. Where
          clear_refs cannot be written, ru_maxrss stands in for VmHWM (the JSON settings say
          which). Before a plain cell its memory is estimated from the largest plain cell
          measured (its peak per image times the batch) and the cell is skipped, with the
          estimate, when that exceeds 70% of the memory available; a cell whose process the OS
          kills is skipped with its exit status.
Beside each row's ratio to the plain step at the same batch (images/s, peak memory; a micro row
whose plain step did not fit is its own baseline), peak_mem_vs_smallest_plain is its peak over
the plain step's at the smallest batch where that ran. A second table shows these, and one
verdict line per target follows (also in the JSON, settings.micro.targets): the micro step's
peak memory at most 1.5x the smallest batch's plain step, its images/s at least 0.70x the plain
step's at equal batch. The real loaders are skipped where the plain step does not fit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import multiprocessing
import os
import queue
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
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
from train.precision import accelerate_precision, cpu_native_bf16
from train.precision import autocast as autocast_for
from train.schedule import lr_schedule, scaled_lr
from train.step import Criterion, training_step

BASELINE = "synthetic"
MICRO = "synthetic-micro"  # the synthetic views through the micro-batched step
# the synthetic views at the other precision: Accelerate's mixed_precision of each
OTHER_PRECISION = {"synthetic-bf16": "bf16", "synthetic-fp32": "no"}
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
    "peak_mem_mb": ("peak MB", "{:.0f}"),
    "peak_mem_vs_smallest_plain": ("peak/smallest plain", "{:.2f}x"),
}
QUICK = {"archs": "resnet18", "sizes": "32", "backends": "synthetic,torchvision,dali",
         "batch_size": "8", "steps": 2, "warmup": 1}
# The targets for the micro-batched step: peak memory within MEMORY_TARGET x the plain
# step's at the smallest batch, images/s at least SPEED_TARGET x the plain step's at equal batch.
MEMORY_TARGET = 1.5
SPEED_TARGET = 0.70
FIT_FRACTION = 0.7  # a CPU plain cell runs when its estimated peak is below this x available


def build_parser():
    p = benchmark.parser(
        "bench_train",
        "Time whole SimCLR training steps with synthetic in-memory views (the model alone) and "
        "with each real loader; with --micro-batch, also the micro-batched step's peak memory "
        "and images/s beside the plain step's. Print a table, optionally write JSON.",
        device="where the model trains", quick="a small run; see below",
        epilog="--quick: resnet18 at size 32 only, batch 8, 1 warm-up + 2 timed steps, backends "
               "synthetic, torchvision and dali (under a minute on 2 CPU cores); any option given "
               "explicitly overrides these. --micro-batch M: every case's synthetic views are "
               "timed with the plain step (where it fits) and the micro-batched one, each in a "
               "fresh process on CPU, and their peak memory is reported, relative to the plain "
               "step at the same batch and at the smallest one, with one verdict line per target "
               f"(peak memory <= {MEMORY_TARGET}x the smallest batch's plain step, images/s >= "
               f"{SPEED_TARGET:.2f}x the plain step's at equal batch).",
    )
    p.add_argument("--archs", default=None,
                   help="comma-separated encoders (default resnet18,resnet50)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated image sides: up to 64 from random arrays (small stem), "
                        "above from JPEGs (default 32,224)")
    p.add_argument("--width", type=above(0.0), default=1.0,
                   help="encoder channel multiplier (default 1.0, torchvision's widths; smaller "
                        "for smoke runs)")
    p.add_argument("--stem-pool", action="store_true",
                   help="max-pool after the small stem (sizes <= 64), as the Fashion-MNIST demo's "
                        "encoder (default: none, the 32x32 recipes' stem)")
    p.add_argument("--head-out", type=at_least(1), default=128,
                   help="projection head output width (default 128; the demo's 64)")
    p.add_argument("--batch-size", type=batch_sizes, default=None, metavar="B[,B...]",
                   help="images per step, each two views; a comma list times each (default: CPU "
                        "32 at size <= 64, 8 above; CUDA 512 / 256)")
    p.add_argument("--micro-batch", type=at_least(0), default=0, metavar="M",
                   help="also time the micro-batched step (M images, both views, per forward "
                        "chunk; the whole batch's loss and update) beside the plain one, with "
                        "the peak memory of each (default 0: the plain step only)")
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
                   help="folder of JPEGs for the sizes above 64 (default: "
                        "$SIMCLR_IMAGENET_SAMPLE or ../shared/data/imagenet-sample beside the "
                        "repository); given explicitly, also for the sizes up to 64 instead of "
                        "random arrays (a folder of small images: the loaders' decode and crop "
                        "at the 28/32 px recipes' sizes)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compilation "
                   "falls in the warm-up steps: raise --warmup)")
    p.add_argument("--precision", default="auto", metavar="P[,P...]",
                   help="fp32 and/or bf16 (autocast), comma-separated: the first is that of "
                        f"'{BASELINE}' and the real loaders, each other one adds a synthetic row "
                        "(synthetic-bf16, synthetic-fp32) beside it (default auto: what "
                        "pretraining's train.mixed_precision auto picks, i.e. bf16 on a GPU and on "
                        "a CPU with native bf16, else fp32; on a CPU the other precision beside "
                        "it); with --micro-batch only the first")
    return p


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def batch_sizes(text: str) -> list[int]:
    """--batch-size: integers >= 2, comma-separated; ascending, without repeats."""
    out = []
    for t in _csv(text):
        try:
            out.append(int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers >= 2, comma-separated, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected integers >= 2, comma-separated, got {text!r}")
    if min(out) < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {min(out)}")
    return sorted(set(out))


# ---------------------------------------------------------------- data sources

class SyntheticTwoViews:
    """`steps` TwoViewBatches cycling through two pre-made batches of N(0, 1) views on `device`
    (the statistics of normalised images), channels_last like every real loader's output. They
    are drawn on the device itself (a GPU draws gigabytes of views in milliseconds)."""

    def __init__(self, batch_size: int, size: int, steps: int, device: torch.device,
                 seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)

        def views():
            x = torch.randn(batch_size, 3, size, size, generator=g, device=device)  # [B,3,S,S]
            return x.contiguous(memory_format=torch.channels_last)

        index = torch.arange(batch_size, device=device)
        self.pool = [TwoViewBatch(views(), views(), torch.zeros_like(index), index)
                     for _ in range(2)]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.pool[i % 2]


def _dataset(size: int, n: int, root: Path, images: Path, small_jpegs: bool = False
             ) -> tuple[Split | None, AugmentSpec, str | None]:
    """(split of n samples, augmentation spec, reason when the case cannot run): random arrays up
    to 64 px unless `small_jpegs`, else the JPEGs of `images`."""
    root.mkdir(parents=True, exist_ok=True)
    small = AugmentSpec(size=size, jitter_strength=0.5, blur_p=0.0)  # the 32x32 recipes' spec
    if size <= 64 and not small_jpegs:
        rng = np.random.default_rng(0)
        split = Split("train", rng.integers(0, 10, n).astype(np.int64),
                      images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), root=root)
        return split, small, None
    files = sorted(str(p) for p in images.glob("*")
                   if p.suffix.lower() in (".jpeg", ".jpg")) if images.is_dir() else []
    if not files:
        return None, AugmentSpec(size=size), (f"no JPEGs in '{images}' for size {size} "
                                              f"(set --images or SIMCLR_IMAGENET_SAMPLE)")
    files = [files[i % len(files)] for i in range(n)]  # a small sample is repeated to fill the run
    split = Split("train", np.zeros(n, dtype=np.int64), files=files, root=root)
    return split, small if size <= 64 else AugmentSpec(size=size), None


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

@dataclasses.dataclass(frozen=True)
class Cell:
    """One timed run of the step on one model: what a fresh process needs to repeat it."""

    arch: str
    size: int
    width: float
    stem_pool: bool
    head_out: int
    batch_size: int
    steps: int
    warmup: int
    micro_batch: int = 0  # images per forward chunk; 0: the plain step
    compile: bool = False
    precision: str = "no"  # Accelerate's mixed_precision: "bf16" (autocast) or "no" (float32)
    device: str = "cpu"
    threads: int = 1  # torch threads (a fresh process takes them from here)

    @property
    def small_stem(self) -> bool:
        return self.size <= 64  # the 3x3 stem of the 32x32 recipes

    def model(self) -> SimCLR:
        return SimCLR(self.arch, width=self.width, small_stem=self.small_stem,
                      stem_pool=True if self.stem_pool else None, head_out=self.head_out)


@dataclasses.dataclass
class Trainer:
    """A cell's model (as stepped: compiled or not), optimizer and step settings."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_impl: str
    temperature: float
    lrs: list[float]
    autocast: Callable[[], contextlib.AbstractContextManager]


def _trainer(cell: Cell, device: torch.device) -> Trainer:
    torch.manual_seed(0)
    model = cell.model().to(device).to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model, 1e-6), lr=0.0, momentum=0.9, eta=0.001)
    model.train()
    return Trainer(
        model=torch.compile(model) if cell.compile else model, optimizer=optimizer,
        loss_impl=resolve_impl("auto", device, cell.head_out, torch.float32),
        temperature=0.5 if cell.small_stem else 0.1,
        lrs=lr_schedule(scaled_lr(0.3, cell.batch_size), cell.warmup + cell.steps,
                        cell.warmup).tolist(),
        autocast=autocast_for(cell.precision, device))


def _time_run(source, t: Trainer, cell: Cell, device: torch.device) -> dict:
    """Seconds waiting for data and computing over the `steps` steps after `warmup` ones, and each
    timed step's wall time."""
    cuda = device.type == "cuda"
    warmup, steps, batch_size = cell.warmup, cell.steps, cell.batch_size
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
            loss = training_step(t.model, t.optimizer, batch, t.lrs[i],
                                 Criterion(t.temperature, t.loss_impl), t.autocast,
                                 micro_batch=cell.micro_batch)
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


def measure_cell(cell: Cell) -> dict:
    """Build the cell's model, optimizer and synthetic views and time its steps (`_time_run`'s
    figures); on CUDA also `peak_mem_mb`, the allocator's peak over all of it less what was
    allocated before."""
    device = torch.device(cell.device)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = _trainer(cell, device)
    source = SyntheticTwoViews(cell.batch_size, cell.size, cell.warmup + cell.steps, device)
    run = _time_run(source, trainer, cell, device)
    if cuda:
        torch.cuda.synchronize(device)
        run["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return run


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text or "alloc_failed" in text)


def _cell_in_process(cell: Cell) -> tuple[dict | None, str | None]:
    """A CUDA cell here: (figures, None), or (None, why it does not fit) when it runs out of
    memory; its memory is released either way."""
    try:
        return measure_cell(cell), None
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuDNN's allocation failure
        if not _is_oom(e):
            raise
        reason = f"does not fit: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return None, reason


def _status_bytes(key: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssPeak:
    """This process's peak resident set from now on, less the resident set now: VmHWM after
    resetting it (writing "5" to /proc/self/clear_refs) less VmRSS; where that cannot be written,
    ru_maxrss (the peak since the process started, imports included) less the resident set."""

    def __init__(self):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_bytes("VmRSS")
            self.method = ("VmHWM - VmRSS after the imports (high-water mark reset through "
                           "/proc/self/clear_refs)")
            self.hwm = True
        except OSError:
            self.hwm = False
            self.base = _status_bytes("VmRSS")
            if self.base is None:
                try:
                    import psutil

                    self.base = psutil.Process().memory_info().rss
                except ImportError:
                    self.base = _max_rss_bytes()  # at least the resident set now
            self.method = ("ru_maxrss - the resident set after the imports (/proc/self/clear_refs "
                           "unavailable: a peak during the imports would count)")

    def peak_mb(self) -> float:
        peak = _status_bytes("VmHWM") if self.hwm else None
        return ((peak if peak is not None else _max_rss_bytes()) - self.base) / 2**20


def _cell_process(cell: Cell, results) -> None:
    """The target of a CPU cell's fresh process: torch threads as the parent's, the resident-set
    peak reset after the imports, the cell, then ("ok", figures with peak_mem_mb and
    memory_method), ("oom", message) or ("error", traceback) on `results`."""
    torch.set_num_threads(cell.threads)
    probe = RssPeak()
    try:
        run = measure_cell(cell)
        run["peak_mem_mb"], run["memory_method"] = probe.peak_mb(), probe.method
        results.put(("ok", run))
    except Exception as e:
        if isinstance(e, RuntimeError) and _is_oom(e):
            results.put(("oom", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        else:
            results.put(("error", traceback.format_exc()))


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        why = " (the OS ran out of memory?)" if -code == signal.SIGKILL else ""
        return f"its process was killed by signal {-code} ({name}){why}, exit code {code}"
    return f"its process ended with exit code {code} and no result"


def _cell_in_fresh_process(cell: Cell) -> tuple[dict | None, str | None]:
    """A CPU cell in a new interpreter (multiprocessing "spawn", target `_cell_process`): its
    figures, or (None, why) when it ran out of memory or its process died. An error in the cell
    is raised here with the child's traceback."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_cell_process, args=(cell, results), name="bench_train cell")
    proc.start()
    message = None
    try:
        while message is None:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():  # a result put just before the end may still be in flight
                    try:
                        message = results.get(timeout=2.0)
                    except queue.Empty:
                        break
    finally:
        proc.join(timeout=None if message is not None else 10.0)
        if proc.is_alive():  # interrupted here: the child goes with us
            proc.kill()
            proc.join()
        results.close()
    if message is None:
        return None, _exit_reason(proc.exitcode)
    kind, payload = message
    if kind == "ok":
        return payload, None
    if kind == "oom":
        return None, f"does not fit: {payload}"
    raise RuntimeError(f"the cell {cell} failed in its process:\n{payload}")


def plain_fit(measured: list[tuple[int, float]], batch: int,
              available_mb: float | None) -> str | None:
    """Why the plain step at `batch` is not tried on the CPU, or None: its peak estimated from the
    largest plain cell measured before, `measured` [(batch, MB)] (that cell's peak per image times
    `batch`), above FIT_FRACTION of `available_mb`."""
    if not measured or available_mb is None:
        return None
    b, mb = max(measured)
    estimate = mb / b * batch
    if estimate <= FIT_FRACTION * available_mb:
        return None
    return (f"does not fit: estimated {estimate:.0f} MB ({mb / b:.2f} MB per image at batch {b} "
            f"x {batch}) > {FIT_FRACTION:.0%} of the {available_mb:.0f} MB available")


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
    if run.get("peak_mem_mb") is not None:
        out["peak_mem_mb"] = run["peak_mem_mb"]
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
    precisions = _precisions(args.precision, cuda)
    if args.micro_batch:  # memory is compared at one precision: the first
        precisions = precisions[:1]
    impls = ([BASELINE] + [f"synthetic-{_precision_name(p)}" for p in precisions[1:]]
             + [b for b in IMPLS if b in backends and b != BASELINE])
    steps = args.steps if args.steps is not None else q.get("steps", 50 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else q.get("warmup", 10 if cuda else 2)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    batches = args.batch_size or (batch_sizes(q["batch_size"]) if "batch_size" in q else None)
    for name, v, lo in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--workers", workers, 1),
                        ("--batch-size", min(batches or [2]), 2),
                        ("--micro-batch", args.micro_batch, 0), ("--head-out", args.head_out, 1)):
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
            "workers": workers, "batch_sizes": batches, "width": args.width,
            "stem_pool": args.stem_pool, "head_out": args.head_out,
            "micro_batch": args.micro_batch, "compile": args.compile,
            "threads": torch.get_num_threads(), "precisions": precisions,
            "images": args.images or benchmark.default_images(),
            "small_jpegs": args.images is not None}


def _precisions(text: str, cuda: bool) -> list[str]:
    """--precision as Accelerate's mixed_precision values ("no", "bf16"), the baseline's first."""
    if text.strip() == "auto":
        first = accelerate_precision("auto", cuda)
        return [first] if cuda else [first, "bf16" if first == "no" else "no"]
    names = _csv(text)
    bad = [n for n in names if n not in ("fp32", "bf16")]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--precision takes fp32 and/or bf16, comma-separated, or auto; got "
                         f"{text!r}")
    return [accelerate_precision(n, cuda) for n in names]


def _precision_name(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else mixed_precision


def _default_batch_size(size: int, cuda: bool) -> int:
    if cuda:
        return 512 if size <= 64 else 256
    return 32 if size <= 64 else 8


def _one_model(cell: Cell, impls: list[str], s: dict, device: torch.device, case: str,
               data: tuple, flops: float, peak: float | None, info: dict,
               skipped: dict) -> dict[str, dict]:
    """Metrics of each data source of `impls` in turn through one model and optimizer (so
    torch.compile compiles once per case), plain step."""
    cuda = device.type == "cuda"
    split, spec, skip = data
    trainer = _trainer(cell, device)
    threads = torch.get_num_threads()
    values: dict[str, dict] = {}
    for impl in impls:
        if impl != BASELINE and impl not in OTHER_PRECISION and skip:
            skipped[f"{case}/{impl}"] = skip
            continue
        try:
            if impl == BASELINE or impl in OTHER_PRECISION:
                source = SyntheticTwoViews(cell.batch_size, cell.size, cell.warmup + cell.steps,
                                           device)
            else:
                source = _real_loader(impl, split, spec, cell.batch_size, device, s["workers"])
            if impl in OTHER_PRECISION:  # a model of its own, from the same initialisation
                other = dataclasses.replace(cell, precision=OTHER_PRECISION[impl])
                run = _time_run(source, _trainer(other, device), other, device)
            else:
                run = _time_run(source, trainer, cell, device)
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
        values[impl] = _metrics(run, cell.steps, cell.batch_size, flops, peak)
        info["final_loss"][impl] = run["final_loss"]
        info["micro_batch"][impl] = 0
        m = values[impl]
        print(f"[{case}] {impl}: {m['images_per_s']:.1f} img/s, wait {m['data_wait_frac']:.0%}",
              flush=True)
    if skip:
        print(f"[{case}] real backends skipped: {skip}", flush=True)
    return values


def _micro_cells(cell: Cell, s: dict, device: torch.device, case: str, flops: float,
                 peak: float | None, info: dict, skipped: dict,
                 plain_measured: list[tuple[int, float]], methods: set) -> dict[str, dict]:
    """Metrics, peak memory included, of the plain and the micro-batched step on synthetic views,
    each cell with a model of its own (CUDA: here; CPU: in a fresh process); `plain_measured`
    gains (batch, MB) of the plain cell."""
    cuda = device.type == "cuda"
    values: dict[str, dict] = {}
    micro = s["micro_batch"]
    for impl, m in ((BASELINE, 0), (MICRO, micro)):
        if impl == MICRO and m >= cell.batch_size:
            info["note"] = (f"{MICRO} not run: the micro-batch {m} is not smaller than the batch "
                            f"{cell.batch_size}, so its step is the plain one ({BASELINE})")
            print(f"[{case}] {info['note']}", flush=True)
            continue
        reason = None
        if impl == BASELINE and not cuda:
            available = benchmark.available_memory_bytes()
            reason = plain_fit(plain_measured, cell.batch_size,
                               None if available is None else available / 2**20)
        if reason is None:
            info["load_average"][impl] = list(os.getloadavg())
            c = dataclasses.replace(cell, micro_batch=m)
            run, reason = _cell_in_process(c) if cuda else _cell_in_fresh_process(c)
        if reason is not None:
            skipped[f"{case}/{impl}"] = reason
            print(f"[{case}] {impl} skipped: {reason}", flush=True)
            continue
        methods.add(run.get("memory_method") or "CUDA: torch.cuda.max_memory_allocated() over "
                    "the cell (statistics reset before it) minus memory_allocated() before it")
        values[impl] = v = _metrics(run, cell.steps, cell.batch_size, flops, peak)
        info["final_loss"][impl] = run["final_loss"]
        info["micro_batch"][impl] = m
        if impl == BASELINE and "peak_mem_mb" in v:
            plain_measured.append((cell.batch_size, v["peak_mem_mb"]))
        print(f"[{case}] {impl}{f' (micro-batch {m})' if m else ''}: "
              f"{v['images_per_s']:.1f} img/s, peak {v.get('peak_mem_mb', math.nan):.0f} MB",
              flush=True)
    return values


def run_group(arch: str, size: int, s: dict, device: torch.device, tmp: Path, skipped: dict,
              case_info: dict, methods: set) -> tuple[list[dict], dict | None]:
    """Result rows of one (arch, size) over its batch sizes (ascending), and with --micro-batch
    the figures of the targets (None without); fills skipped[case/impl] and case_info[case]."""
    cuda = device.type == "cuda"
    batches = s["batch_sizes"] or [_default_batch_size(size, cuda)]
    several, micro = len(batches) > 1, s["micro_batch"]
    reals = [i for i in s["impls"] if i != BASELINE and i not in OTHER_PRECISION]
    base = Cell(arch, size, s["width"], s["stem_pool"], s["head_out"], batches[0], s["steps"],
                s["warmup"], compile=s["compile"], device=device.type, threads=s["threads"],
                precision=s["precisions"][0])
    flops = training_flops_per_image(base.model(), size)
    peak = peak_flops(device, torch.bfloat16 if base.precision == "bf16" else torch.float32)
    loss_impl = resolve_impl("auto", device, s["head_out"], torch.float32)
    values: dict[str, dict[str, dict]] = {}
    plain_measured: list[tuple[int, float]] = []
    for bs in batches:
        case = f"{arch}-{size}-b{bs}" if several else f"{arch}-{size}"
        cell = dataclasses.replace(base, batch_size=bs)
        data = (_dataset(size, (cell.warmup + cell.steps) * bs, tmp / case, s["images"],
                         small_jpegs=s["small_jpegs"]) if reals
                else (None, None, None))
        info = case_info[case] = {
            "batch_size": bs, "width": s["width"], "small_stem": cell.small_stem,
            "stem_pool": s["stem_pool"], "head_out": s["head_out"],
            "augment": dataclasses.asdict(data[1]) if data[1] else None, "loss_impl": loss_impl,
            "data": (None if data[0] is None else "random uint8 arrays" if data[0].files is None
                     else f"JPEGs from {s['images']}"),
            "temperature": 0.5 if cell.small_stem else 0.1, "training_flops_per_image": flops,
            "peak_flops": peak, "micro_batch": {}, "final_loss": {}, "load_average": {}}
        print(f"[{case}] batch {bs}, {flops / 1e9:.2f} GFLOP per image (2 views, fwd+bwd), "
              f"loss {loss_impl}", flush=True)
        if not micro:
            values[case] = _one_model(cell, s["impls"], s, device, case, data, flops, peak, info,
                                      skipped)
            continue
        values[case] = _micro_cells(cell, s, device, case, flops, peak, info, skipped,
                                    plain_measured, methods)
        if reals and BASELINE not in values[case]:
            for impl in reals:
                skipped[f"{case}/{impl}"] = (f"the plain step did not run at batch {bs}: "
                                             f"{skipped.get(f'{case}/{BASELINE}', '?')}")
        elif reals:
            values[case] |= _one_model(cell, reals, s, device, case, data, flops, peak, info,
                                       skipped)

    ref = next(((bs, v[BASELINE]["peak_mem_mb"]) for bs, v in zip(batches, values.values())
                if v.get(BASELINE, {}).get("peak_mem_mb", 0) > 0), None)
    if ref:
        for vals in values.values():
            for m in vals.values():
                if "peak_mem_mb" in m:
                    m["peak_mem_vs_smallest_plain"] = m["peak_mem_mb"] / ref[1]
    rows = []
    for case, vals in values.items():
        for impl, metrics in vals.items():
            base_impl = BASELINE if BASELINE in vals else impl  # no plain step: its own baseline
            rows += [benchmark.row(case, impl, metric, v, base_impl, vals[base_impl].get(metric))
                     for metric, v in metrics.items()]
    if not micro:
        return rows, None
    return rows, micro_targets(f"{arch}-{size}", micro, dict(zip(batches, values.values())),
                               ref[0] if ref else None)


def micro_targets(group: str, micro: int, by_batch: dict[int, dict[str, dict]],
                  ref_batch: int | None) -> dict:
    """The targets' figures for one (arch, size): each micro row's peak memory over the plain
    step's at `ref_batch` and its images/s over the plain step's at its batch (None where that
    did not run), whether each target is met (None: nothing measured), and the verdict lines."""
    memory, speed = {}, {}
    for bs, vals in by_batch.items():
        m = vals.get(MICRO)
        if m is None:
            continue
        if "peak_mem_vs_smallest_plain" in m:
            memory[str(bs)] = m["peak_mem_vs_smallest_plain"]
        plain = vals.get(BASELINE)
        speed[str(bs)] = m["images_per_s"] / plain["images_per_s"] if plain else None

    def verdict(figures: dict, ok) -> tuple[bool | None, str]:
        measured = {b: v for b, v in figures.items() if v is not None}
        met_at = [f"b{b}" for b, v in measured.items() if ok(v)]
        missed = [f"b{b}" for b, v in measured.items() if not ok(v)]
        if not measured:
            return None, "not measured"
        if not missed:
            return True, "met"
        return False, "; ".join(([f"met at {', '.join(met_at)}"] if met_at else [])
                                + [f"MISSED at {', '.join(missed)}"])

    def listing(figures: dict, absent: str) -> str:
        return ", ".join(f"b{b} {v:.2f}x" if v is not None else f"b{b} - ({absent})"
                         for b, v in figures.items()) or "no micro-batched row"

    mem_met, mem_word = verdict(memory, lambda v: v <= MEMORY_TARGET)
    spd_met, spd_word = verdict(speed, lambda v: v >= SPEED_TARGET)
    lines = [f"{group} micro-batch {micro}: peak memory over the plain step's at batch "
             f"{ref_batch if ref_batch else '-'}: {listing(memory, '')} (target <= "
             f"{MEMORY_TARGET:g}x): {mem_word}",
             f"{group} micro-batch {micro}: images/s over the plain step's at equal batch: "
             f"{listing(speed, 'no plain step')} (target >= {SPEED_TARGET:.2f}x): {spd_word}"]
    return {"micro_batch": micro,
            "memory": {"target_max": MEMORY_TARGET, "reference_batch": ref_batch,
                       "by_batch": memory, "met": mem_met},
            "speed": {"target_min": SPEED_TARGET, "by_batch": speed, "met": spd_met},
            "verdicts": lines}


def _loads(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _ratio_rows(results: list[dict], impls: tuple[str, ...] | None = None) -> list[dict]:
    """The rows to show, plus one per ratio worth showing (metric + " ratio", value = the ratio):
    not the ratio of a row that is its own baseline but not the baseline (a micro row whose plain
    step did not fit), which is 1 by construction."""
    out = []
    for r in results:
        if impls and r["impl"] not in impls:
            continue
        out.append(r)
        if r["impl"] == r["baseline"] == BASELINE or r["impl"] != r["baseline"]:
            out.append({**r, "metric": r["metric"] + " ratio", "value": r["ratio"]})
    return out


def headline(report: dict) -> str:
    """gpu_check's line for this report: images/s of every case and data source, TFLOP/s and MFU
    (where the peak is known) of the synthetic ones (and of a micro-batched row without a plain
    step beside it), the others against the plain synthetic row, the peak memory where measured
    (over the plain step's at the smallest batch), the micro-batching targets' verdicts and what
    was skipped. KeyError for a key or metric the report lacks."""
    rows = benchmark.by_key(report, "images_per_s", "achieved_tflops")
    out = []
    for (case, impl, metric), row in rows.items():
        if metric != "images_per_s":
            continue
        text = f"{case} {impl}: {row['value']:.0f} img/s"
        if row["baseline"] == impl:
            text += f", {rows[(case, impl, 'achieved_tflops')]['value']:.1f} TFLOP/s"
            mfu = rows.get((case, impl, "mfu"))  # only on a GPU with a known peak
            if mfu:
                text += f", MFU {100 * mfu['value']:.0f}%"
        elif benchmark.finite(row["ratio"]):
            text += f" ({row['ratio']:.2f}x {row['baseline']})"
        mem = rows.get((case, impl, "peak_mem_mb"))
        if mem:
            text += f", peak {mem['value']:.0f} MB"
            rel = rows.get((case, impl, "peak_mem_vs_smallest_plain"))
            if rel and not (impl == BASELINE and rel["value"] == 1.0):
                text += f" ({rel['value']:.2f}x the smallest batch's plain)"
        out.append(text)
    settings = report["settings"]
    for group, t in settings.get("micro", {}).get("targets", {}).items():
        words = [f"{name} " + {True: "met", False: "MISSED", None: "not measured"}[t[k]["met"]]
                 for k, name in (("memory", f"peak <= {MEMORY_TARGET:g}x"),
                                 ("speed", f"img/s >= {SPEED_TARGET:.2f}x"))]
        out.append(f"{group} micro-batch {t['micro_batch']} targets: {', '.join(words)}")
    return "; ".join(out + [f"{k} skipped" for k in settings["skipped"]])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_train")
    try:
        s = _settings(args, device)
    except ValueError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    results, skipped, case_info, targets, methods = [], {}, {}, {}, set()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmpdir:
        for arch in s["archs"]:
            for size in s["sizes"]:
                rows, t = run_group(arch, size, s, device, Path(tmpdir), skipped, case_info,
                                    methods)
                results += rows
                if t:
                    targets[f"{arch}-{size}"] = t
    cuda = device.type == "cuda"
    settings = {
        "archs": s["archs"], "sizes": s["sizes"], "backends": s["impls"], "width": args.width,
        "stem_pool": s["stem_pool"], "head_out": s["head_out"],
        "batch_sizes": s["batch_sizes"] or "default: CPU 32 at size <= 64, 8 above; CUDA 512/256",
        "micro_batch": s["micro_batch"],
        "steps": s["steps"], "warmup": s["warmup"], "workers": s["workers"], "quick": args.quick,
        "compile": args.compile,
        "precision": {"baseline": _precision_name(s["precisions"][0]),
                      "others": {f"synthetic-{_precision_name(p)}": _precision_name(p)
                                 for p in s["precisions"][1:]},
                      "cpu_native_bf16": None if cuda else cpu_native_bf16(),
                      "note": "bf16 = autocast (convolutions and products in bf16; parameters, "
                              "LARS, BatchNorm statistics and the loss in float32)"},
        "channels_last": True, "optimizer": "LARS (momentum 0.9, eta 0.001, weight decay 1e-6)",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "images": str(s["images"]), "cases": case_info, "skipped": skipped,
        "timing": "per step: data wait = getting the next batch, compute = forward+loss+"
                  "backward+LARS (CUDA synchronised each step); means over the timed steps after "
                  "warm-up; images/s counts images, each two views",
        "flops": "convolution and matmul FLOPs (2 per multiply-add), forward + backward, both "
                 "views, counted by torch.utils.flop_counter (model/flops.py)"}
    if s["micro_batch"]:
        settings["micro"] = {
            "impl": MICRO, "micro_batch": s["micro_batch"],
            "cells": "every (case, step) with a model, optimizer and two batches of views of its "
                     "own; CPU: each in a fresh process (multiprocessing spawn, torch threads as "
                     "the parent's)",
            "peak_memory": sorted(methods),
            "fits": (f"CPU: a plain cell runs when its peak, estimated as the largest plain cell "
                     f"measured's peak per image x the batch, is at most {FIT_FRACTION:.0%} of "
                     f"the memory available (else skipped); CUDA: a plain cell that runs out of "
                     f"memory is skipped"),
            "real_loaders": "the plain step, where it fits",
            "targets": targets}
    print()
    benchmark.print_table(_ratio_rows(results),
                          [(h, m, fmt, "value") for m, (h, fmt) in METRICS.items()
                           if m != "peak_mem_vs_smallest_plain"]
                          + [(f"img/s vs {BASELINE}", "images_per_s ratio", "{:.2f}x", "value")])
    if s["micro_batch"]:
        print()
        benchmark.print_table(
            _ratio_rows(results, (BASELINE, MICRO)),
            [("img/s", "images_per_s", "{:.1f}", "value"),
             ("step ms", "step_ms", "{:.0f}", "value"),
             ("peak MB", "peak_mem_mb", "{:.0f}", "value"),
             ("img/s vs plain", "images_per_s ratio", "{:.2f}x", "value"),
             ("peak vs plain", "peak_mem_mb ratio", "{:.2f}x", "value"),
             ("peak vs smallest plain", "peak_mem_vs_smallest_plain", "{:.2f}x", "value")],
            title=f"micro-batching: {BASELINE} = the plain step, {MICRO} = micro-batch "
                  f"{s['micro_batch']}; 'vs plain' = over the plain step at the same batch, "
                  f"'smallest plain' = at the smallest batch")
    for key, reason in skipped.items():
        print(f"skipped {key}: {reason}")
    for t in targets.values():
        for line in t["verdicts"]:
            print(line)
    print(f"load average (1/5/15 min) before {_loads(load_before)}, after "
          f"{_loads(os.getloadavg())} on {os.cpu_count()} CPU cores")
    benchmark.write_json(args.json, benchmark.report(device, settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
