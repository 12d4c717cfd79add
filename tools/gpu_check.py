"""Does this installation work on this GPU, and how fast is it: one unattended self-test and report.

    python3 -m tools.gpu_check --data DIR --images DIR --json gpu_check.json
    python3 -m tools.gpu_check --device cpu --quick            # every step at toy sizes (CI)
    make gpu-check ARGS="--data DIR --images DIR"

Steps, each in its own subprocess with its own time limit (a share of --budget-s; the time a
step leaves unused passes to the steps after it). A failing or hanging step is killed, reported
with the last lines of its log, and the next step runs:

    env            tools.benchmark: GPU, memory, driver, CUDA, versions; which optional backends
                   import, and why not
    tests          pytest -m gpu: Triton and chunked NT-Xent against the reference (fp32, bf16,
                   ragged tiles, the masked diagonal, offset anchor rows), LARS's CUDA step against
                   its reference, each loader's CUDA path against its CPU path, a CUDA training run
    loss-fp32      tools.bench_loss in float32: 2N doubles until memory, time or the step's share
                   ends
    loss-bf16      the same in bfloat16 (the aim: 2N >= 1,048,576 on one GPU)
    optim          tools.bench_optim: the LARS step against its per-parameter form and foreach SGD
    train          tools.bench_train: ResNet-50 at 224, bf16, channels_last, synthetic views:
                   images/s, TFLOP/s, MFU
    train-micro    tools.bench_train --micro-batch 512: the same at batches 1024, 2048 and 4096,
                   the micro-batched step beside the plain one where that fits: peak memory and
                   images/s of each
    loader         tools.bench_loader on --images: two-view images/s of each importable loader
    train-loaders  tools.bench_train with each importable loader on --images against synthetic views
    quality        tools.quality_check: Fashion-MNIST (--data, the four .gz files) pretrained for
                   a fixed time with train/configs/fashion_mnist_gpu.yaml, then linear top-1 beside
                   raw pixels, fine-tuning on 1% of the labels (beside from scratch) and the test
                   split's embeddings with a nearest-neighbour query

It needs only a python3 with torch (no virtual environment): run it from the project root.
Optional backends (DALI, FFCV, lightly) that do not import are skipped with the reason. Nothing is
downloaded. The report is one table (step, status, headline figure, seconds) and one JSON file
holding every step's results and the tail of its log; a headline is the `headline()` of the module
the step ran, and a step whose results it cannot read fails. Exit status: 0 when no step failed or
timed out, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.benchmark import contract_problems, environment_headline, json_safe
from tools.quality_check import FMNIST_FILES, default_data, has_fashion_mnist
from train.atomic import write_atomic
from train.cli import above, at_least, writable_file

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("pass", "fail", "timeout", "skip")
STEP_NAMES = ("env", "tests", "loss-fp32", "loss-bf16", "optim", "train", "train-micro", "loader",
              "train-loaders", "quality")
# train-micro on a GPU: ResNet-50 at 224 (bf16) at these batches, micro-batch 512 (~25-30 MB of
# activations per view: ~30 GB per chunk), 1 warm-up + 2 timed steps per cell (estimated, not yet
# measured: ~30 s on an H100; its 40 s weight is taken from the quality step's). --quick: a
# quarter-width ResNet-18 at 16x16, batch 8, micro-batch 4, one step per cell (each CPU cell is a
# fresh process: its imports are most of the step's seconds)
MICRO_BATCHES, MICRO_BATCH = "1024,2048,4096", "512"
MICRO_QUICK = ["--width", "0.25", "--sizes", "16", "--steps", "1", "--warmup", "0",
               "--micro-batch", "4"]
TAIL_LINES = 40
KILL_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m tools.gpu_check",
        description="Self-test and benchmark report for a GPU machine: environment, GPU "
                    "correctness tests, every benchmark on the GPU and a short quality run; "
                    "one table and one JSON.",
        epilog="Each step runs in its own subprocess under a share of --budget-s. --device cpu "
               "--quick runs every step at toy sizes (about 90 s on 2 cores).",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes for every step")
    p.add_argument("--budget-s", type=above(0.0), default=480.0,
                   help="seconds for the whole run, shared among the steps (default 480)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with the four Fashion-MNIST .gz files (default: $SIMCLR_DATA, "
                        "the folder tools/setup.sh found, or /usr/share/datasets/fashion-mnist); "
                        "without it the quality step is skipped")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEGs for the loader steps (default: $SIMCLR_IMAGENET_SAMPLE); "
                        "without it those steps are skipped")
    p.add_argument("--json", type=writable_file, default=None,
                   help="write the report here (default: OUT/gpu_check.json)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="folder for step logs, step JSON and the quality run (default %(default)s)")
    p.add_argument("--steps", default=None,
                   help="comma-separated steps to run (default: all): " + ",".join(STEP_NAMES))
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="loader workers (default: every CPU core, at most 16)")
    return p


# ---------------------------------------------------------------- the plan

def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Step:
    """One row of the plan: a subprocess (`argv`, or a function of the env step's record giving
    it; None when `skip` says why not), its weight in the budget, the file its results land in
    and their `headline`: a module name (its headline(), imported when read) or a function."""

    name: str
    title: str
    weight: float
    argv: list[str] | Callable[[dict], list[str]] | None = None
    result_file: Path | None = None
    skip: str | None = None
    note: Callable[[dict], str | None] | None = None  # beside the headline, from the env record
    budget_args: Callable[[float], list[str]] | None = None  # the step's own time knob
    headline: str | Callable[[dict], str] | None = None
    read: Callable[[Path], dict | None] = _load_json
    status: Callable[[dict], str] | None = None  # of a step whose headline was read; None: pass
    contract: bool = True  # the results keep tools/benchmark.py's JSON contract

    def command(self, env: dict | None, limit_s: float) -> list[str]:
        argv = self.argv(env or {}) if callable(self.argv) else list(self.argv)
        return argv + (self.budget_args(limit_s) if self.budget_args else [])


def _importable(env: dict, ffcv: bool = True) -> list[str]:
    """The loaders to run: torchvision, and DALI and FFCV where the env step saw them import
    (FFCV only with `ffcv`: the quick training step leaves its compilation out)."""
    opt = env.get("optional", {})
    return ["torchvision"] + [b for b in ("dali", "ffcv")
                              if opt.get(b, {}).get("ok") and (ffcv or b != "ffcv")]


def _loader_note(env: dict) -> str | None:
    opt = env.get("optional", {})
    missing = [f"{b}: {opt.get(b, {}).get('error', 'not checked')}" for b in ("dali", "ffcv")
               if b not in _importable(env)]
    return f"not run: {'; '.join(missing)}" if missing else None


def _pytest(py: str, junit: Path, cuda: bool) -> list[str]:
    # Triton compiles each kernel variant on a fresh machine (CPU-bound): spread the tests over
    # processes where pytest-xdist is installed.
    xdist = (["-n", str(min(8, os.cpu_count() or 1))]
             if cuda and importlib.util.find_spec("xdist") else [])
    return [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", *xdist,
            f"--junitxml={junit}", "tests"]


def _loss_budget(limit_s: float) -> list[str]:
    return ["--time-budget", f"{max(5.0, 0.8 * limit_s - 10):.0f}"]


def plan_steps(args, out: Path) -> list[Step]:
    """The plan, made once per run: every step for this device, mode and data, in order. The
    loader steps' commands follow what the env step saw import (functions of its record)."""
    py, quick, cuda = sys.executable, args.quick, args.device == "cuda"
    q, real = (["--quick"] if quick else []), ["--archs", "resnet50", "--sizes", "224"]
    workers = ["--workers", str(args.workers or min(16, os.cpu_count() or 1))]
    jpegs = args.images is not None and args.images.is_dir() and any(
        p.suffix.lower() in (".jpg", ".jpeg") for p in args.images.iterdir())
    images = ["--images", str(args.images)] if jpegs else []
    no_images = None if jpegs or quick else (f"no JPEGs in '{args.images}'" if args.images
                                             else "no --images DIR (a folder of JPEGs) given")
    no_data = None if args.data else ("no --data DIR with the four Fashion-MNIST .gz files "
                                      f"({', '.join(FMNIST_FILES)})")

    def w(gpu: float, cpu_quick: float) -> float:  # shares of the budget (seconds at 480)
        return cpu_quick if quick and not cuda else gpu

    def tool(module: str, name: str, *extra: str) -> list[str]:
        return [py, "-m", f"tools.{module}", *extra, "--json", str(out / f"{name}.json")]

    def bench(module: str, name: str, *extra: str) -> list[str]:
        return tool(module, name, "--device", args.device, *extra)

    loss_sizes, junit = q or ["--max-size", str(1 << 20)], out / "tests.xml"
    steps = [
        Step("env", "environment and optional backends", w(10, 15), tool("benchmark", "env"),
             headline=environment_headline, contract=False),
        Step("tests", "GPU correctness tests (pytest -m gpu)", w(80, 60), _pytest(py, junit, cuda),
             junit, headline=tests_headline, read=summarise_tests, status=tests_status,
             contract=False),
        Step("loss-fp32", "NT-Xent fwd+bwd, float32, growing 2N", w(30, 30),
             bench("bench_loss", "loss-fp32", "--dtype", "float32", *loss_sizes),
             budget_args=_loss_budget, headline="tools.bench_loss"),
        Step("loss-bf16", "NT-Xent fwd+bwd, bfloat16, growing 2N", w(45, 30),
             bench("bench_loss", "loss-bf16", "--dtype", "bfloat16", *loss_sizes),
             budget_args=_loss_budget, headline="tools.bench_loss"),
        Step("optim", "LARS step vs per-parameter form and foreach SGD", w(15, 40),
             bench("bench_optim", "optim", *q), headline="tools.bench_optim"),
        Step("train", ("" if quick else "ResNet-50 ") + "training step, synthetic views", w(35, 40),
             bench("bench_train", "train", *(q or real), "--backends", "synthetic"),
             headline="tools.bench_train"),
        Step("train-micro", ("" if quick else "ResNet-50 ") + "micro-batched step beside the plain "
             "one: peak memory, images/s", w(40, 30),
             bench("bench_train", "train-micro", "--backends", "synthetic",
                   *([*q, *MICRO_QUICK] if quick else
                     [*real, "--batch-size", MICRO_BATCHES, "--micro-batch", MICRO_BATCH,
                      "--steps", "2", "--warmup", "1"])),
             headline="tools.bench_train"),
        Step("loader", "two-view " + ("" if quick else "JPEG ") + "loader images/s", w(25, 80),
             None if no_images else bench("bench_loader", "loader", *q, *workers, *images),
             skip=no_images, note=_loader_note, headline="tools.bench_loader"),
        Step("train-loaders", ("" if quick else "ResNet-50 ") + "training step with each real "
             "loader vs synthetic", w(35, 60), None if no_images else lambda env: bench(
                 "bench_train", "train-loaders", *(q or real), *workers, *([] if quick else images),
                 "--backends", ",".join(["synthetic", *_importable(env, ffcv=not quick)])),
             skip=no_images, note=_loader_note, headline="tools.bench_train"),
        Step("quality", "Fashion-MNIST: timed pretraining, then linear evaluation", w(165, 120),
             None if no_data else tool("quality_check", "quality", "--device", args.device,
                                       "--out", str(out), *workers, *q, "--data", str(args.data)),
             skip=no_data, budget_args=lambda limit: ["--time-limit", f"{limit:.0f}"],
             headline="tools.quality_check", contract=False),
    ]
    for s in steps:
        s.result_file = s.result_file or out / f"{s.name}.json"
    if not quick:  # a larger budget goes to the quality step, whose pretraining improves with time
        steps[-1].weight = max(steps[-1].weight, args.budget_s - sum(s.weight for s in steps[:-1]))
    return steps


# ---------------------------------------------------------------- running a step

def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    # progress bars rewrite their line with \r: keep what the line says last
    return [line.split("\r")[-1] for line in text.splitlines()][-lines:]


def run_step(step: Step, limit_s: float, log_path: Path, env: dict | None = None) -> dict:
    """Run one step's subprocess for at most `limit_s` seconds; its record (without the parsed
    results). `env`: the env step's record, for the commands that follow it."""
    argv = step.command(env, limit_s)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if step.result_file is not None and step.result_file.exists():
        step.result_file.unlink()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _kill_group(proc)
    seconds = time.perf_counter() - t0
    return {"command": argv, "returncode": rc, "timed_out": timed_out, "seconds": seconds,
            "limit_s": limit_s, "log": str(log_path), "log_tail": _tail(log_path)}


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGTERM the step's whole process group (loader workers included), SIGKILL what outlives
    the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.returncode if proc.returncode is not None else -9


def share_of_budget(weights: list[float], remaining_s: float) -> float:
    """The first step's limit: its weight's share of what is left for it and the steps after."""
    total = sum(weights)
    return remaining_s * weights[0] / total if total > 0 else 0.0


# ---------------------------------------------------------------- reading results

def summarise_tests(xml_path: Path) -> dict | None:
    """Counts and failures from pytest's JUnit XML."""
    if not xml_path.is_file():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], {}
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failed.append({"test": name, "kind": tag, "message": msg[0][:300] if msg else ""})
        for el in case.findall("skipped"):
            reason = (el.get("message") or "").strip()[:200]
            skipped[reason] = skipped.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skipped}


def tests_status(summary: dict) -> str:
    """fail on a failure or error; skip when no test passed (no GPU: every test skips)."""
    if summary["failures"] + summary["errors"]:
        return "fail"
    return "skip" if summary["passed"] == 0 else "pass"


def tests_headline(summary: dict) -> str:
    text = (f"{summary['passed']} passed, {summary['failures'] + summary['errors']} failed, "
            f"{summary['skipped']} skipped")
    if tests_status(summary) == "skip":
        text += f" ({'; '.join(summary['skip_reasons']) or 'no GPU test ran'})"
    return text


def _verdict(step: Step, rec: dict) -> tuple[str, str]:
    """Status and headline from the step's results (parsed into rec["results"])."""
    rec["results"] = results = step.read(step.result_file) if step.result_file else None
    if results is None:
        return ("pass", "") if rec["timed_out"] else ("fail", "the step wrote no results")
    if step.contract and (problems := contract_problems(results)):
        return "fail", "benchmark JSON breaks the contract: " + "; ".join(problems)
    if step.headline is None:
        return "pass", ""
    fn, where = step.headline, getattr(step.headline, "__name__", "")
    try:
        if isinstance(fn, str):
            fn, where = importlib.import_module(fn).headline, f"{fn}.headline"
        headline = fn(results)
    except Exception as e:  # a key the headline reads is missing or renamed: say which
        return "fail", (f"headline failed: {where} could not read the results: "
                        f"{type(e).__name__}: {e}")
    return (step.status(results) if step.status else "pass"), headline


def finish_record(step: Step, rec: dict, env: dict | None = None) -> dict:
    """Status, headline and parsed results of a step that ran."""
    rec["status"], rec["headline"] = _verdict(step, rec)
    rc = rec["returncode"]
    if rec["timed_out"]:
        rec["status"] = "timeout"
        rec["headline"] = "; ".join(x for x in (f"killed after its {rec['limit_s']:.0f} s share",
                                                rec["headline"]) if x)
    elif rc != 0 and rec["status"] != "fail":
        rec["status"] = "fail"
        rec["headline"] = "; ".join(x for x in (f"exit status {rc}", rec["headline"]) if x)
    if step.note and (note := step.note(env or {})):
        rec["note"], rec["headline"] = note, rec["headline"] + f" [{note}]"
    if rec["status"] in ("fail", "timeout"):
        last = next((line for line in reversed(rec["log_tail"]) if line.strip()), "")
        rec["headline"] += f" | last log line: {last.strip()[:160]}"
    return rec


# ---------------------------------------------------------------- driver

def print_table(records: list[dict], file=sys.stdout) -> None:
    width = max(len(r["name"]) for r in records)
    print(f"\n{'step':<{width}}  {'status':<7} {'seconds':>7}  headline", file=file)
    print("-" * (width + 80), file=file)
    for r in records:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        print(f"{r['name']:<{width}}  {r['status']:<7} {secs:>7}  {r['headline']}", file=file)


def run_all(args) -> dict:
    """Walk the plan: run each wanted step under its share of what is left of the budget."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    wanted = set([s.strip() for s in args.steps.split(",") if s.strip()] if args.steps
                 else STEP_NAMES)
    if wanted - set(STEP_NAMES):
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(sorted(wanted - set(STEP_NAMES)))}"
                         f": choose among {', '.join(STEP_NAMES)}")
    print(f"gpu_check: device {args.device}{' (quick)' if args.quick else ''}, "
          f"budget {args.budget_s:.0f} s, logs in {out}", flush=True)
    steps = plan_steps(args, out)
    records, env = [], None  # env: the env step's record
    for i, step in enumerate(steps):
        if step.name not in wanted:
            continue
        remaining = args.budget_s - (time.perf_counter() - t_start)
        rec = {"name": step.name, "title": step.title, "seconds": None, "limit_s": None}
        if step.argv is None:
            rec.update(status="skip", headline=step.skip)
        elif remaining < 5:
            rec.update(status="skip", headline=f"the --budget-s of {args.budget_s:.0f} s is spent")
        else:
            todo = [s.weight for s in steps[i:] if s.name in wanted and s.argv is not None]
            limit = share_of_budget(todo, remaining)
            print(f"[{len(records) + 1}/{len(steps)}] {step.name}: {step.title} "
                  f"(limit {limit:.0f} s)", flush=True)
            rec.update(run_step(step, limit, out / f"{step.name}.log", env))
            finish_record(step, rec, env)
        print(f"    {rec['status']}: {rec['headline']}", flush=True)
        records.append(rec)
        if step.name == "env" and rec.get("results"):
            env = rec["results"]

    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    return json_safe({"tool": "gpu_check", "device": args.device, "quick": args.quick,
                      "budget_s": args.budget_s, "seconds": time.perf_counter() - t_start,
                      "command": [sys.executable, "-m", "tools.gpu_check", *sys.argv[1:]],
                      "data": str(args.data) if args.data else None,
                      "images": str(args.images) if args.images else None,
                      "environment": env, "counts": counts, "steps": records})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no CUDA device: check the driver and "
              "CUDA_VISIBLE_DEVICES, or run --device cpu --quick", file=sys.stderr)
        return 2
    if args.data is None:
        args.data = default_data()
    elif not has_fashion_mnist(args.data):
        print(f"gpu_check: error: --data '{args.data}' lacks the Fashion-MNIST files "
              f"({', '.join(FMNIST_FILES)})", file=sys.stderr)
        return 2
    if args.images is None and os.environ.get("SIMCLR_IMAGENET_SAMPLE"):
        args.images = Path(os.environ["SIMCLR_IMAGENET_SAMPLE"])
    report = run_all(args)
    print_table(report["steps"])
    path = args.json or args.out / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=1, allow_nan=False) + "\n")
    c = report["counts"]
    print(f"\n{c['pass']} passed, {c['fail']} failed, {c['timeout']} timed out, "
          f"{c['skip']} skipped in {report['seconds']:.0f} s; report: {path}")
    return 0 if c["fail"] == 0 and c["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
