"""Benchmark NT-Xent: forward+backward time and peak extra memory of each implementation.

    python -m tools.bench_loss --quick
    python -m tools.bench_loss --device cpu --json bench_loss_cpu.json
    python -m tools.bench_loss --device cuda --dtype bfloat16 --json bench_loss_cuda.json

Implementations: reference (the naive 2N x 2N form, the baseline of every ratio), chunked, triton
(CUDA only) and the peer lightly.loss.NTXentLoss when lightly imports. Batch sizes 2N double from
1024 until an implementation runs out of memory (CUDA OOM is caught; on CPU, where running out
kills the process, a size whose memory, extrapolated quadratically from the previous size, would
exceed 80% of MemAvailable is skipped) or its extrapolated step time passes --max-seconds.

Peak extra memory: CUDA, torch.cuda.max_memory_allocated() minus the allocation before the step.
CPU, the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus
VmRSS before the step, with glibc's mmap threshold pinned at 64 KiB so that every freed large
buffer leaves the resident set at once (no reuse of memory an earlier step left behind).
Both include the gradients of z1, z2 and any library workspace.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from model.nt_xent import default_block, nt_xent, nt_xent_reference
from tools import benchmark
from train.cli import above, at_least

BASELINE = "reference"
IMPLS = ("reference", "chunked", "triton", "peer")


def build_parser() -> argparse.ArgumentParser:
    p = benchmark.parser(
        "bench_loss",
        "Time and peak extra memory of NT-Xent forward+backward for the reference, chunked, "
        "triton (CUDA) and peer (lightly) implementations; ratios to reference.",
        device="device to run on",
        quick="small sizes and one timed repeat (under a minute on 2 CPU cores)")
    p.add_argument("--sizes", type=at_least(1), nargs="+", default=None, metavar="2N",
                   help="batch sizes 2N (even; default: 1024 doubling up to --max-size)")
    p.add_argument("--max-size", type=at_least(1), default=None, metavar="2N",
                   help="largest 2N tried (default: 32768 on cpu, 1048576 on cuda)")
    p.add_argument("--dim", type=at_least(1), default=128, help="projection width D (default: 128)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of z1, z2 (default: float32)")
    p.add_argument("--temperature", type=above(0.0), default=0.5, help="tau (default: 0.5)")
    p.add_argument("--block", type=at_least(1), default=None,
                   help="chunked row block (default: model.nt_xent.default_block)")
    p.add_argument("--repeats", type=at_least(1), default=3,
                   help="timed steps per size after one warm-up; median reported (default: 3; "
                        "1 for steps over 5 s)")
    p.add_argument("--max-seconds", type=above(0.0), default=60.0,
                   help="skip a size whose extrapolated step time exceeds this (default: 60)")
    p.add_argument("--time-budget", type=above(0.0), default=None, metavar="S",
                   help="stop growing 2N before a size whose extrapolated steps (every impl still "
                        "running, warm-up and repeats) would end the run past S seconds")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to run (reference always runs: it is the baseline)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal
    return p


# ---------------------------------------------------------------- memory probes

class _CpuPeak:
    """Resident-set high-water mark of this process around one step (Linux only).

    pin=True pins glibc's mmap threshold so that freed large buffers leave the resident set at
    once; that changes allocation speed, so it is only used in the separate memory process.
    """

    method = ("CPU: VmHWM after the step minus VmRSS before it (VmHWM reset via "
              "/proc/self/clear_refs), in a separate process with glibc's mmap threshold pinned at "
              "64 KiB; one warm-up step per impl at 2N <= 1024, then one step per size")

    def __init__(self, pin: bool):
        try:
            if pin:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks mmapped, freed to the OS
                libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
            self._reset()
            self.ok = self._read("VmHWM") is not None
        except OSError:
            self.ok = False

    @staticmethod
    def _read(key: str) -> int | None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def start(self):
        gc.collect()
        self._reset()
        self.base = self._read("VmRSS")

    def stop(self) -> float:
        return float(self._read("VmHWM") - self.base)


class _CudaPeak:
    method = ("CUDA: torch.cuda.max_memory_allocated() after the step minus memory_allocated() "
              "before")
    ok = True

    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> float:
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - self.base)


# ---------------------------------------------------------------- implementations

def _peer() -> tuple[Callable | None, str]:
    try:
        import lightly
        from lightly.loss import NTXentLoss as LightlyNTXent
    except Exception as exc:  # any import failure means: no peer in this run
        return None, f"lightly not importable ({type(exc).__name__}: {exc})"
    return LightlyNTXent, (f"lightly {lightly.__version__} lightly.loss.NTXentLoss "
                           "(full 2N x 2N logits)")


def _losses(args, device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    tau = args.temperature
    fns: dict[str, Callable] = {"reference": lambda a, b: nt_xent_reference(a, b, tau)}
    notes: dict[str, str] = {}
    if "chunked" in args.impls:
        fns["chunked"] = lambda a, b: nt_xent(a, b, tau, impl="chunked", block=args.block,
                                              gather=False)
    if "triton" in args.impls:
        if device.type != "cuda":
            notes["triton"] = "skipped: needs CUDA"
        else:
            try:
                import triton  # noqa: F401

                fns["triton"] = lambda a, b: nt_xent(a, b, tau, impl="triton", gather=False)
            except ImportError as exc:
                notes["triton"] = f"skipped: triton not importable ({exc})"
    if "peer" in args.impls:
        cls, note = _peer()
        notes["peer"] = note
        if cls is not None:
            module = cls(temperature=tau).to(device)
            fns["peer"] = lambda a, b: module(a, b)
    return fns, notes


# ---------------------------------------------------------------- measuring

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, z1, z2) -> float:
    z1.grad = z2.grad = None
    loss = fn(z1, z2)
    loss.backward()
    return loss.item()


def _measure(fn, z1, z2, device, probe, repeats) -> dict:
    """One warm-up step, then `repeats` timed steps; memory is the smallest per-step peak."""
    peaks, times = [], []
    for i in range(1 + repeats):
        if probe.ok:
            probe.start()
        _sync(device)
        t0 = time.perf_counter()
        loss = _step(fn, z1, z2)
        _sync(device)
        dt = time.perf_counter() - t0
        if probe.ok:
            peaks.append(probe.stop())
        if i == 0:
            if dt > 5.0:
                repeats = min(repeats, 1)
            continue
        times.append(dt)
        if len(times) >= repeats:
            break
    z1.grad = z2.grad = None
    return {"time_s": statistics.median(times), "peak_bytes": min(peaks) if peaks else None,
            "loss": loss}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _sizes(args, device: torch.device) -> list[int]:
    if args.sizes:
        bad = [s for s in args.sizes if s % 2]
        if bad:
            raise SystemExit(f"--sizes must be even (2N), got {bad}")
        return sorted(set(args.sizes))
    if args.quick:
        top = 2048 if device.type == "cpu" else 8192
    else:
        top = args.max_size or (32768 if device.type == "cpu" else 1 << 20)
    sizes, m = [], 1024
    while m <= top:
        sizes.append(m)
        m *= 2
    return sizes


def _inputs(m: int, args, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(m)
    z1 = torch.randn(m // 2, args.dim, generator=gen).to(device, dtype).requires_grad_()
    z2 = torch.randn(m // 2, args.dim, generator=gen).to(device, dtype).requires_grad_()
    return z1, z2


def _within_budget(cost: dict[str, float], left: float) -> set[str]:
    """The impls to run at the next size: drop the most expensive until the rest fit in `left`."""
    kept = dict(cost)
    for name in sorted(cost, key=cost.get, reverse=True):
        if sum(kept.values()) <= left:
            break
        del kept[name]
    return set(kept)


def _predicted_cost(prev: tuple[int, dict], m: int, repeats: int) -> float:
    """Seconds one impl would spend at size 2N=m (warm-up + timed steps), from its last size."""
    prev_m, r = prev
    step = r["time_s"] * (m / prev_m) ** 2
    return step * (1 + (1 if step > 5.0 else repeats))


def _memory_child(args) -> int:
    """Hidden entry point: peak extra CPU memory of one step for each (impl, 2N) in the plan."""
    plan = json.loads(args.memory_child)
    probe = _CpuPeak(pin=True)
    if not probe.ok:
        print("MEMORY " + json.dumps({}))
        return 0
    fns, _ = _losses(args, torch.device("cpu"))
    dtype = getattr(torch, args.dtype)
    out: dict[str, dict[str, float]] = {}
    for name, sizes in plan.items():
        out[name] = {}
        for i, m in enumerate([min(min(sizes), 1024)] + sizes):
            z1, z2 = _inputs(m, args, torch.device("cpu"), dtype)
            probe.start()
            _step(fns[name], z1, z2)
            peak = probe.stop()
            if i:  # the first step is a warm-up
                out[name][str(m)] = peak
            del z1, z2
    print("MEMORY " + json.dumps(out))
    return 0


def _cpu_memory(args, argv: list[str], plan: dict[str, list[int]]) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "tools.bench_loss", *argv, "--memory-child", json.dumps(plan)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")]
    if proc.returncode != 0 or not lines:
        return {}, f"memory process failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    peaks = json.loads(lines[-1][len("MEMORY "):])
    return peaks, (_CpuPeak.method if peaks else "unavailable on this platform")


def _metrics(r: dict, flops: float, cuda: bool) -> dict[str, float]:
    out = {"time_ms": r["time_s"] * 1e3}
    if r["peak_bytes"] is not None:
        out["peak_extra_MiB"] = r["peak_bytes"] / 2**20
    if cuda:
        out["tflops"] = flops / r["time_s"] / 1e12
    return out


def run(args, argv: list[str], device: torch.device) -> dict:
    dtype = getattr(torch, args.dtype)
    repeats = 1 if args.quick else args.repeats
    # On CPU this probe (default allocator) only guards against running out of memory; the
    # reported CPU peaks come from a separate process (see _CpuPeak).
    probe = _CudaPeak() if device.type == "cuda" else _CpuPeak(pin=False)
    fns, notes = _losses(args, device)
    order = [name for name in IMPLS if name in fns]
    sizes = _sizes(args, device)

    done: dict[str, str] = {}  # impl -> why it stopped growing
    last: dict[str, tuple[int, dict]] = {}  # impl -> (2N, measurement) at its largest size
    measured: dict[int, dict[str, dict]] = {}
    t_run = time.perf_counter()
    for m in sizes:
        if args.time_budget is not None and last:
            # Drop the slowest impls first until the size's extrapolated steps fit what is left,
            # so the fastest one (the one that can reach the largest 2N) keeps growing longest.
            left = args.time_budget - (time.perf_counter() - t_run)
            cost = {name: _predicted_cost(last[name], m, repeats) for name in order
                    if name in last and name not in done}
            kept = _within_budget(cost, left)
            for name in cost.keys() - kept:
                done[name] = (f"stopped before 2N={m}: its extrapolated steps would end past "
                              f"--time-budget {args.time_budget:g} s")
            if not kept:
                for name in order:
                    done.setdefault(name, f"stopped before 2N={m}: --time-budget "
                                          f"{args.time_budget:g} s spent")
                break
        z1, z2 = _inputs(m, args, device, dtype)
        got: dict[str, dict] = {}
        for name in order:
            if name in done:
                continue
            if name in last:  # extrapolate quadratically from the previous size
                prev_m, prev = last[name]
                grow = (m / prev_m) ** 2
                if prev["time_s"] * grow > args.max_seconds:
                    done[name] = (f"stopped before 2N={m}: extrapolated step time > "
                                  f"{args.max_seconds:g} s")
                    continue
                available = benchmark.available_memory_bytes() or math.inf
                if (device.type == "cpu" and prev["peak_bytes"] is not None
                        and prev["peak_bytes"] * grow > 0.8 * available):
                    done[name] = f"stopped before 2N={m}: extrapolated memory > 80% of MemAvailable"
                    continue
            try:
                got[name] = _measure(fns[name], z1, z2, device, probe, repeats)
            except (RuntimeError, MemoryError) as exc:
                if not _is_oom(exc) and not isinstance(exc, MemoryError):
                    raise
                done[name] = f"out of memory at 2N={m}"
                z1.grad = z2.grad = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            last[name] = (m, got[name])
        measured[m] = got
        del z1, z2

    memory_method = probe.method if probe.ok else "unavailable on this platform"
    if device.type == "cpu":
        plan = {name: [m for m in measured if name in measured[m]] for name in order}
        peaks, memory_method = _cpu_memory(args, argv, {k: v for k, v in plan.items() if v})
        for m, got in measured.items():
            for name, r in got.items():
                r["peak_bytes"] = peaks.get(name, {}).get(str(m))

    rows: list[dict] = []
    loss_gap: dict[str, float] = {}
    cuda = device.type == "cuda"
    for m, got in measured.items():
        base = BASELINE if BASELINE in got else "chunked"
        flops = 6.0 * m * m * args.dim
        base_metrics = _metrics(got[base], flops, cuda) if base in got else {}
        for name, r in got.items():
            if BASELINE in got:
                ref_loss = got[BASELINE]["loss"]
                gap = abs(r["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
                loss_gap[name] = max(loss_gap.get(name, 0.0), gap)
            for metric, value in _metrics(r, flops, cuda).items():
                rows.append(benchmark.row(f"2N={m}", name, metric, value, base,
                                          base_metrics.get(metric)))
    largest = {name: float(last[name][0]) for name in order if name in last}
    rows += benchmark.rows("largest", "largest_2N", largest, BASELINE)
    for name in order:
        done.setdefault(name, f"reached the largest size tried (2N={sizes[-1]})")

    settings = {
        "quick": args.quick, "sizes_2N": sizes, "dim": args.dim, "dtype": args.dtype,
        "temperature": args.temperature, "repeats": repeats, "timing": "median fwd+bwd wall time "
        "after one warm-up step (device synchronised)",
        "chunked_block": {str(m): args.block or default_block(m, device) for m in sizes},
        "memory_method": memory_method,
        "flops_per_step": "6 * (2N)^2 * D: forward S = Z Z^T, backward G Z and G^T Z; the "
                          "backward recomputation of S is not counted",
        "peer": notes.get("peer", "not requested"), "notes": notes, "stopped": done,
        "max_rel_loss_gap_vs_reference": loss_gap, "torch_threads": torch.get_num_threads(),
        "baseline_rule": "reference at each size where it ran, else chunked",
        "time_budget_s": args.time_budget,
    }
    return benchmark.report(device, settings, rows)


def _print_table(report: dict):
    settings = report["settings"]
    title = (f"NT-Xent forward+backward on {report['device']} ({settings['dtype']}, "
             f"D={settings['dim']}); baseline = {BASELINE}")
    columns = [(metric if field == "value" else "x base", metric, "{:.3f}", field)
               for metric in ("time_ms", "peak_extra_MiB", "tflops")
               for field in ("value", "ratio")]
    benchmark.print_table(report["results"], columns, title)
    largest = {r["impl"]: int(r["value"]) for r in report["results"] if r["case"] == "largest"}
    for impl, why in settings["stopped"].items():
        print(f"{impl:>10}: largest 2N = {largest.get(impl, 0)}; {why}")
    for impl, note in settings["notes"].items():
        print(f"{impl:>10}: {note}")
    print("loss agreement (max relative gap to reference): "
          + ", ".join(f"{k} {v:.2e}" for k, v in settings["max_rel_loss_gap_vs_reference"].items()))
    print(f"memory: {settings['memory_method']}")


def headline(report: dict) -> str:
    """gpu_check's line for this report: the largest 2N of the fast implementations and of the
    reference, and the fastest one's speed and memory against the reference at the largest size
    up to 32768 where both ran. KeyError for a key or metric the report lacks."""
    rows = benchmark.by_key(report, "largest_2N", "time_ms")
    largest = {impl: int(r["value"]) for (case, impl, metric), r in rows.items()
               if (case, metric) == ("largest", "largest_2N")}
    parts = [f"{impl} largest 2N={largest[impl]:,}" for impl in ("triton", "chunked")
             if impl in largest]
    if BASELINE in largest:
        parts.append(f"reference {largest[BASELINE]:,}")
    impl = "triton" if any(k[1] == "triton" for k in rows) else "chunked"
    for m in (32768, 16384, 8192, 4096, 2048, 1024):
        t = rows.get((f"2N={m}", impl, "time_ms"))
        if t and t["baseline"] == BASELINE and benchmark.finite(t["ratio"]):
            text = f"at 2N={m:,}: {impl} {1 / t['ratio']:.2f}x the reference's speed"
            mem = rows.get((f"2N={m}", impl, "peak_extra_MiB"))  # absent where unmeasurable
            if mem and benchmark.finite(mem["ratio"]):
                text += f", 1/{1 / mem['ratio']:.0f} of its memory"
            parts.append(text)
            break
    return "; ".join(parts) or "no sizes measured"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.memory_child:
        return _memory_child(args)
    report = run(args, argv, benchmark.pick_device(args.device, "bench_loss"))
    _print_table(report)
    benchmark.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
