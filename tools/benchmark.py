"""The harness every benchmark (tools/bench_*.py) runs on, the JSON contract they keep, and the
machine's environment record.

    p = benchmark.parser("bench_x", "What it times.", device="where it runs", quick="...")
    args = p.parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_x")
    rows = benchmark.rows(case, metric, {impl: value, ...}, baseline="impl_a")
    benchmark.print_table(rows, [("ms", "time_ms", "{:.1f}", "value"), ...])
    benchmark.write_json(args.json, benchmark.report(device, settings, rows))

The JSON: {"device", "versions", "settings", "results": [{"case", "impl", "metric", "value",
"baseline", "ratio"}]}. `device` is the torch device type ("cpu" or "cuda"); the hardware is named
in `versions` ("cpu": the CPU model; "gpu" and "cuda" on CUDA). `ratio` is `value` over the
baseline impl's value for the same case and metric in the same run, and NaN (written as JSON
`NaN`, which Python's json reads) where that value is missing or zero. Each benchmark's
`headline(report)` turns its JSON into gpu_check's one line, reading the rows through `by_key`.

    python -m tools.benchmark --json env.json    # gpu_check's env step: GPU, memory, driver,
                                                  # CUDA, versions, which optional backends import

Torch is imported inside the functions that need it: gpu_check imports this module for the
contract and must start without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from train.atomic import write_atomic
from train.cli import writable_file

CONTRACT_KEYS = ("device", "versions", "settings", "results")
CONTRACT_ROW = {"case", "impl", "metric", "value", "baseline", "ratio"}
# Distributions named in every report; DALI ships as nvidia-dali-cudaXYZ.
PACKAGES = ("torchvision", "numpy", "triton", "numba", "nvidia-dali", "ffcv", "lightly", "timm")
# Optional backends whose import the environment record tries (name -> module).
OPTIONAL = {"dali": "nvidia.dali", "ffcv": "ffcv", "lightly": "lightly"}


def parser(prog: str, description: str, *, device: str, quick: str,
           epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares; `device` says what lives on the device,
    `quick` what --quick shrinks."""
    p = argparse.ArgumentParser(prog=f"python -m tools.{prog}", description=description,
                                epilog=epilog)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help=f"{device} (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="write the results as JSON here")
    return p


def pick_device(name: str | None, prog: str):
    """--device, or cuda when available, else cpu; a one-line error (exit 2) for an absent GPU."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda but CUDA is not available: run with --device cpu",
              file=sys.stderr)
        raise SystemExit(2)
    return torch.device(name)


def default_images() -> Path:
    """The JPEG folder of the 224 cases: $SIMCLR_IMAGENET_SAMPLE, else
    ../shared/data/imagenet-sample beside the repository."""
    env = os.environ.get("SIMCLR_IMAGENET_SAMPLE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-sample"


def cpu_model() -> str:
    """The CPU's model name (gpu_check's environment record uses it too)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(device) -> dict:
    """Python, torch, PACKAGES (None: not installed) and the hardware. Read from distribution
    metadata, not imports: importing ffcv or DALI only to ask takes seconds."""
    from importlib import metadata

    import torch

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        for package in PACKAGES:
            if name == package or name.startswith(package + "-cuda"):
                found[package] = dist.version
    out = {"python": platform.python_version(), "torch": torch.__version__,
           **{package: found.get(package) for package in PACKAGES}, "cpu": cpu_model()}
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def row(case: str, impl: str, metric: str, value: float, baseline: str,
        base_value: float | None) -> dict:
    """One result row; ratio = value / base_value, NaN when base_value is missing or zero."""
    ratio = float(value) / float(base_value) if base_value else math.nan
    return {"case": case, "impl": impl, "metric": metric, "value": float(value),
            "baseline": baseline, "ratio": ratio}


def rows(case: str, metric: str, values: dict[str, float], baseline: str) -> list[dict]:
    """One row per impl of `values` (impl -> value of one case and metric), against `baseline`."""
    base = values.get(baseline)
    return [row(case, impl, metric, v, baseline, base) for impl, v in values.items()]


def print_table(results: list[dict], columns: list[tuple[str, str, str, str]],
                title: str | None = None) -> None:
    """One line per (case, impl), in the order of `results`. A column (header, metric, format,
    "value" or "ratio") shows that field of the metric's row, '-' without one; where a case, impl
    and metric has rows against several baselines, the first. Columns whose metric no row has
    are left out, and so are lines with no cell."""
    first: dict[tuple[str, str, str], dict] = {}
    for r in results:
        first.setdefault((r["case"], r["impl"], r["metric"]), r)
    columns = [c for c in columns if any(k[2] == c[1] for k in first)]
    lines = []
    for case, impl in dict.fromkeys((r["case"], r["impl"]) for r in results):
        cells = [first.get((case, impl, metric)) for _, metric, _, _ in columns]
        if any(cells):
            lines.append((case, impl, [fmt.format(c[field]) if c else "-"
                                       for c, (_, _, fmt, field) in zip(cells, columns)]))
    if title:
        print(title)
    cw = max([4] + [len(c) for c, _, _ in lines])
    iw = max([4] + [len(i) for _, i, _ in lines])
    widths = [max(len(h), 9) for h, _, _, _ in columns]
    head = f"{'case':<{cw}} {'impl':<{iw}} " + " ".join(
        f"{h:>{w}}" for (h, _, _, _), w in zip(columns, widths))
    print(head)
    print("-" * len(head))
    for case, impl, cells in lines:
        print(f"{case:<{cw}} {impl:<{iw}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def report(device, settings: dict, results: list[dict]) -> dict:
    return {"device": device.type, "versions": versions(device), "settings": settings,
            "results": results}


def write_json(path: Path | None, data: dict) -> None:
    """Write the report atomically (a reader never sees half a file); nothing without a path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def contract_problems(data: dict | None) -> list[str]:
    """What a benchmark JSON lacks of the contract above: [] when it complies."""
    if not isinstance(data, dict):
        return ["no JSON written"]
    problems = [f"missing '{k}'" for k in CONTRACT_KEYS if k not in data]
    results = data.get("results")
    if not isinstance(results, list) or not results:
        return problems + ["'results' is empty"]
    for r in results:
        missing = CONTRACT_ROW - set(r) if isinstance(r, dict) else CONTRACT_ROW
        if missing:
            problems.append(f"a result row lacks {sorted(missing)}")
            break
    return problems


def by_key(report: dict, *metrics: str) -> dict[tuple[str, str, str], dict]:
    """The report's rows by (case, impl, metric), the first of each (bench_optim adds rows of lars
    against each peer after the one against its main baseline). KeyError for a metric of
    `metrics` that no row has, so that a headline reading a renamed metric fails loudly."""
    rows: dict[tuple[str, str, str], dict] = {}
    for r in report["results"]:
        rows.setdefault((r["case"], r["impl"], r["metric"]), r)
    missing = [m for m in metrics if not any(k[2] == m for k in rows)]
    if missing:
        raise KeyError(f"no rows of metric {', '.join(map(repr, missing))}")
    return rows


def available_memory_bytes() -> float | None:
    """Memory available to a new process (psutil, else /proc/meminfo's MemAvailable); None when
    neither says."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def json_safe(x):
    """Strict JSON: NaN and infinities become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------- the environment record

def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def try_import(module: str, timeout: float = 120.0) -> dict:
    """Import `module` in a fresh interpreter (a broken install can crash or hang it)."""
    code = f"import {module} as m; print('VERSION', getattr(m, '__version__', '?'))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"import {module} hung for {timeout:.0f} s"}
    if proc.returncode == 0:
        version = next((x.split()[1] for x in proc.stdout.splitlines()
                        if x.startswith("VERSION ")), "?")
        return {"ok": True, "version": version}
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    return {"ok": False, "error": lines[-1][:300] if lines else f"exit status {proc.returncode}"}


def _gpus(torch) -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2**30,
                     "capability": f"{p.major}.{p.minor}",
                     "multiprocessors": p.multi_processor_count})
    return gpus


def _driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def environment() -> dict:
    """GPU, memory, driver, CUDA and package versions, and which optional backends import (each
    tried in a fresh interpreter) or why not."""
    import torch

    from model.flops import peak_flops

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    gpus = _gpus(torch)
    peak = peak_flops("cuda", torch.bfloat16) if gpus else None
    versions = {d: _version(d) for d in ("torch", "torchvision", "triton", "accelerate", "numba",
                                          "numpy", "pillow", "pyyaml", "tqdm", "rich",
                                          "tensorboard", "pytest")}
    versions["nvidia-dali"] = next(
        (_version(d) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
         if _version(d)), None)
    versions.update({d: _version(d) for d in ("ffcv", "lightly")})
    return {
        "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "memory_gib": mem_gib,
                "torch_threads": torch.get_num_threads()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": (torch.backends.cudnn.version()
                            if torch.backends.cudnn.is_available() else None),
                  "cuda_available": torch.cuda.is_available(),
                  "bf16_supported": torch.cuda.is_bf16_supported() if gpus else None},
        "gpus": gpus, "driver": _driver(),
        "peak_tflops_bf16": peak / 1e12 if peak else None,  # the MFU denominator; None: unknown
        "versions": versions, "triton_importable": importlib.util.find_spec("triton") is not None,
        "optional": {name: try_import(module) for name, module in OPTIONAL.items()},
        "env_vars": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                                                "OMP_NUM_THREADS") if k in os.environ},
    }


def environment_headline(env: dict) -> str:
    """gpu_check's line for the environment record; KeyError for a key it lacks."""
    gpus = env["gpus"]
    if gpus:
        g = gpus[0]
        dev = f"{g['name']} ({g['memory_gib']:.0f} GiB, sm_{g['capability'].replace('.', '')})"
        if len(gpus) > 1:
            dev = f"{len(gpus)} x {dev}"
    else:
        dev = f"no CUDA device ({env['cpu']['cores']} CPU cores)"
    t = env["torch"]
    have = [k for k, v in env["optional"].items() if v["ok"]]
    return (f"{dev}; driver {env['driver'] or '-'}, CUDA {t['cuda'] or '-'}, torch {t['version']}; "
            f"optional: {', '.join(have) if have else 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.benchmark",
        description="This machine's environment record (gpu_check's env step): GPU, memory, "
                    "driver, CUDA, package versions, and which optional backends (DALI, FFCV, "
                    "lightly) import, or why not.")
    p.add_argument("--json", type=writable_file, default=None, metavar="PATH",
                   help="write the record here (default: print it)")
    args = p.parse_args(argv)
    env = json_safe(environment())
    if args.json is None:
        print(json.dumps(env, indent=1))
        return 0
    write_json(args.json, env)
    print(environment_headline(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
