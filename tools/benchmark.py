"""The harness every benchmark (tools/bench_*.py) runs on, and the JSON contract they keep.

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
`NaN`, which Python's json reads) where that value is missing or zero.

Torch is imported inside the functions that need it: gpu_check imports this module for the
contract and must start without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

from train.atomic import write_atomic

CONTRACT_KEYS = ("device", "versions", "settings", "results")
CONTRACT_ROW = {"case", "impl", "metric", "value", "baseline", "ratio"}
# Distributions named in every report; DALI ships as nvidia-dali-cudaXYZ.
PACKAGES = ("torchvision", "numpy", "triton", "numba", "nvidia-dali", "ffcv", "lightly", "timm")


def parser(prog: str, description: str, *, device: str, quick: str,
           epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares; `device` says what lives on the device,
    `quick` what --quick shrinks."""
    p = argparse.ArgumentParser(prog=f"python -m tools.{prog}", description=description,
                                epilog=epilog)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help=f"{device} (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
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
