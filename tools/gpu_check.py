"""Does this installation work on this GPU, and how fast is it: one unattended self-test and report.

    python3 -m tools.gpu_check --data DIR --images DIR --json gpu_check.json
    python3 -m tools.gpu_check --device cpu --quick            # every step at toy sizes (CI)
    make gpu-check ARGS="--data DIR --images DIR"

Steps, each in its own subprocess with its own time limit (a share of --budget-s; the time a
step leaves unused passes to the steps after it). A failing or hanging step is killed, reported
with the last lines of its log, and the next step runs:

    env            GPU, memory, driver, CUDA, versions; which optional backends import, and why not
    tests          pytest -m gpu: Triton and chunked NT-Xent against the reference (fp32, bf16,
                   ragged tiles, the masked diagonal, offset anchor rows), LARS's CUDA step against
                   its reference, each loader's CUDA path against its CPU path, a CUDA training run
    loss-fp32      tools.bench_loss in float32: 2N doubles until memory, time or the step's share
                   ends
    loss-bf16      the same in bfloat16 (the aim: 2N >= 1,048,576 on one GPU)
    optim          tools.bench_optim: the LARS step against its per-parameter form and foreach SGD
    train          tools.bench_train: ResNet-50 at 224, bf16, channels_last, synthetic views:
                   images/s, TFLOP/s, MFU
    loader         tools.bench_loader on --images: two-view images/s of each importable loader
    train-loaders  tools.bench_train with each importable loader on --images against synthetic views
    quality        Fashion-MNIST (--data, the four .gz files, converted on the spot), pretrained
                   for a fixed time with train/configs/fashion_mnist_gpu.yaml, then linear
                   evaluation: top-1 beside raw pixels; then what follows pretraining on this
                   device: fine-tuning on 1% of the labels (beside from scratch) and the test
                   split's embeddings with a nearest-neighbour query

It needs only a python3 with torch (no virtual environment): run it from the project root.
Optional backends (DALI, FFCV, lightly) that do not import are skipped with the reason. Nothing is
downloaded. The report is one table (step, status, headline figure, seconds) and one JSON file
holding every step's results and the tail of its log. Exit status: 0 when no step failed or
timed out, 1 otherwise.
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
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tools.benchmark import contract_problems, cpu_model
from train.atomic import write_atomic
from train.cli import above, at_least

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("pass", "fail", "timeout", "skip")
OPTIONAL = {"dali": "nvidia.dali", "ffcv": "ffcv", "lightly": "lightly"}
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
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
    p.add_argument("--json", type=Path, default=None,
                   help="write the report here (default: OUT/gpu_check.json)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="folder for step logs, step JSON and the quality run "
                        "(default runs/gpu-check)")
    p.add_argument("--steps", default=None,
                   help="comma-separated steps to run (default: all): " + ",".join(STEP_NAMES))
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="loader workers (default: every CPU core, at most 16)")
    # hidden entry points of the child processes
    p.add_argument("--env-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quality-child", type=float, default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------- steps

@dataclass
class Step:
    """One subprocess: `argv` (None when `skip` says why not), its weight in the budget, and the
    file its results land in."""

    name: str
    title: str
    weight: float
    argv: list[str] | None = None
    result_file: Path | None = None
    skip: str | None = None
    note: str | None = None  # shown beside the headline, e.g. which loaders could not run
    # the step's own time knob: a function of its limit that returns extra argv
    budget_args: object = None


STEP_NAMES = ("env", "tests", "loss-fp32", "loss-bf16", "optim", "train", "loader", "train-loaders",
              "quality")
# Shares of the budget on a GPU (seconds at the default 480; a larger budget goes to the quality
# step, whose pretraining is the part that improves with time) and in --quick mode on a CPU.
WEIGHTS = {"env": 10, "tests": 80, "loss-fp32": 30, "loss-bf16": 45, "optim": 15, "train": 35,
           "loader": 25, "train-loaders": 35, "quality": 205}
QUICK_WEIGHTS = {"env": 15, "tests": 60, "loss-fp32": 30, "loss-bf16": 30, "optim": 40, "train": 40,
                 "loader": 80, "train-loaders": 60, "quality": 120}


def _default_data() -> Path | None:
    recorded = ROOT / "data" / ".fashion-mnist-path"  # where tools/setup.sh found it
    recorded = recorded.read_text().strip() if recorded.is_file() else None
    for cand in (os.environ.get("SIMCLR_DATA"), recorded, "/usr/share/datasets/fashion-mnist"):
        if cand and all((Path(cand) / f).is_file() for f in FMNIST_FILES):
            return Path(cand)
    return None


def _default_images() -> Path | None:
    env = os.environ.get("SIMCLR_IMAGENET_SAMPLE")
    return Path(env) if env else None


def _jpegs(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def plan_steps(args, env: dict | None, out: Path) -> list[Step]:
    """Every step's command for this device, mode and data (env: the env step's results)."""
    py = sys.executable
    cuda = args.device == "cuda"
    quick = args.quick
    dev = ["--device", args.device]
    importable = {k for k, v in (env or {}).get("optional", {}).items() if v.get("ok")}
    workers = args.workers or min(16, os.cpu_count() or 1)
    weights = dict(QUICK_WEIGHTS if quick and not cuda else WEIGHTS)
    if not quick:
        weights["quality"] = max(weights["quality"],
                                 args.budget_s - sum(weights.values()) + weights["quality"])
    steps: list[Step] = []

    def add(name, title, argv=None, result=True, skip=None, budget_args=None, note=None):
        rf = out / f"{name}.json" if result else None
        if argv is not None and rf is not None:
            argv = [*argv, "--json", str(rf)]
        steps.append(Step(name, title, weights[name], argv, rf, skip, note, budget_args))

    add("env", "environment and optional backends", [py, "-m", "tools.gpu_check", "--env-child"],
        result=False)

    junit = out / "tests.xml"
    # Triton compiles each kernel variant on a fresh machine (CPU-bound): spread the tests over
    # processes where pytest-xdist is installed.
    xdist = (["-n", str(min(8, os.cpu_count() or 1))]
             if cuda and importlib.util.find_spec("xdist") else [])
    add("tests", "GPU correctness tests (pytest -m gpu)",
        [py, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", *xdist,
         f"--junitxml={junit}", "tests"], result=False)
    steps[-1].result_file = junit

    loss_sizes = ["--quick"] if quick else ["--max-size", str(1 << 20)]
    for dtype in ("float32", "bfloat16"):
        name = "loss-fp32" if dtype == "float32" else "loss-bf16"
        add(name, f"NT-Xent fwd+bwd, {dtype}, growing 2N",
            [py, "-m", "tools.bench_loss", *dev, "--dtype", dtype, *loss_sizes],
            budget_args=lambda limit: ["--time-budget", f"{max(5.0, 0.8 * limit - 10):.0f}"])

    add("optim", "LARS step vs per-parameter form and foreach SGD",
        [py, "-m", "tools.bench_optim", *dev, *(["--quick"] if quick else [])])

    if quick:
        train_argv = ["--quick", "--backends", "synthetic"]
    else:
        train_argv = ["--archs", "resnet50", "--sizes", "224", "--backends", "synthetic"]
    add("train", "training step, synthetic views" if quick
        else "ResNet-50 training step, synthetic views",
        [py, "-m", "tools.bench_train", *dev, *train_argv])

    n_jpeg = _jpegs(args.images)
    no_images = None if n_jpeg else (f"no JPEGs in '{args.images}'" if args.images else
                                     "no --images DIR (a folder of JPEGs) given")
    loaders = ["torchvision"] + [b for b in ("dali", "ffcv") if b in importable]
    missing = [f"{b}: {(env or {}).get('optional', {}).get(b, {}).get('error', 'not checked')}"
               for b in ("dali", "ffcv") if b not in importable]
    loader_note = f"not run: {'; '.join(missing)}" if missing else None
    if quick:
        add("loader", "two-view loader images/s",
            [py, "-m", "tools.bench_loader", *dev, "--quick", "--workers", str(workers),
             *(["--images", str(args.images)] if n_jpeg else [])], note=loader_note)
        add("train-loaders", "training step with each real loader vs synthetic",
            [py, "-m", "tools.bench_train", *dev, "--quick", "--workers", str(workers),
             "--backends", ",".join(["synthetic", *[b for b in loaders if b != "ffcv"]])],
            note=loader_note)
    else:
        add("loader", "two-view JPEG loader images/s",
            None if no_images else [py, "-m", "tools.bench_loader", *dev, "--workers", str(workers),
                                    "--images", str(args.images)],
            skip=no_images, note=loader_note)
        add("train-loaders", "ResNet-50 training step with each real loader vs synthetic",
            None if no_images else [py, "-m", "tools.bench_train", *dev, "--archs", "resnet50",
                                    "--sizes", "224", "--workers", str(workers),
                                    "--images", str(args.images),
                                    "--backends", ",".join(["synthetic", *loaders])],
            skip=no_images, note=loader_note)

    no_data = None if args.data else ("no --data DIR with the four Fashion-MNIST .gz files "
                                      f"({', '.join(FMNIST_FILES)})")
    quality = [py, "-m", "tools.gpu_check", *dev, "--out", str(out), "--workers", str(workers),
               *(["--quick"] if quick else []), *(["--data", str(args.data)] if args.data else [])]
    add("quality", "Fashion-MNIST: timed pretraining, then linear evaluation",
        None if no_data else quality, skip=no_data,
        budget_args=lambda limit: ["--quality-child", f"{limit:.0f}"])
    return steps


# ---------------------------------------------------------------- running a step

def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    # progress bars rewrite their line with \r: keep what the line says last
    return [line.split("\r")[-1] for line in text.splitlines()][-lines:]


def run_step(step: Step, limit_s: float, log_path: Path) -> dict:
    """Run one step's subprocess for at most `limit_s` seconds; its record (without the parsed
    results)."""
    argv = list(step.argv)
    if step.budget_args is not None:
        argv += step.budget_args(limit_s)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if step.result_file is not None and step.result_file.exists():
        step.result_file.unlink()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
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
    """The first step's limit: its weight's share of the seconds left for it and the steps after
    it."""
    total = sum(weights)
    return remaining_s * weights[0] / total if total > 0 else 0.0


# ---------------------------------------------------------------- reading results

def _load_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(report: dict) -> dict[tuple[str, str, str], dict]:
    """Rows by (case, impl, metric); bench_optim adds rows of lars against each peer after the
    one against its main baseline: the first row is that one."""
    rows: dict[tuple[str, str, str], dict] = {}
    for r in report.get("results", []):
        rows.setdefault((r["case"], r["impl"], r["metric"]), r)
    return rows


def _num(x) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def headline_env(env: dict) -> str:
    t = env.get("torch", {})
    gpus = env.get("gpus") or []
    if gpus:
        g = gpus[0]
        dev = f"{g['name']} ({g['memory_gib']:.0f} GiB, sm_{g['capability'].replace('.', '')})"
        if len(gpus) > 1:
            dev = f"{len(gpus)} x {dev}"
    else:
        dev = f"no CUDA device ({env.get('cpu', {}).get('cores')} CPU cores)"
    driver = env.get("driver") or "-"
    opt = env.get("optional", {})
    have = [k for k, v in opt.items() if v.get("ok")]
    return (f"{dev}; driver {driver}, CUDA {t.get('cuda') or '-'}, torch {t.get('version')}; "
            f"optional: {', '.join(have) if have else 'none'}")


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


def headline_loss(r: dict) -> str:
    rows = _rows(r)
    parts = []
    for impl in ("triton", "chunked"):
        big = rows.get(("largest", impl, "largest_2N"))
        if big:
            parts.append(f"{impl} largest 2N={int(big['value']):,}")
    ref = rows.get(("largest", "reference", "largest_2N"))
    if ref:
        parts.append(f"reference {int(ref['value']):,}")
    impl = "triton" if any(k[1] == "triton" for k in rows) else "chunked"
    for m in (32768, 16384, 8192, 4096, 2048, 1024):
        t = rows.get((f"2N={m}", impl, "time_ms"))
        if t and t["baseline"] == "reference" and _num(t["ratio"]):
            mem = rows.get((f"2N={m}", impl, "peak_extra_MiB"))
            text = f"at 2N={m:,}: {impl} {1 / t['ratio']:.2f}x the reference's speed"
            if mem and _num(mem["ratio"]):
                text += f", 1/{1 / mem['ratio']:.0f} of its memory"
            parts.append(text)
            break
    return "; ".join(parts) or "no sizes measured"


def headline_optim(r: dict) -> str:
    out = []
    for (case, impl, metric), row in _rows(r).items():
        if impl == "lars" and metric == "step_ms":
            ref = _rows(r).get((case, "lars_reference", "step_ms"))
            speed = (f", {ref['value'] / row['value']:.1f}x the per-parameter form"
                     if ref and row["value"] else "")
            out.append(f"{case}: {row['value']:.2f} ms ({row['ratio']:.2f}x foreach SGD{speed})")
    return "; ".join(out) or "no LARS rows"


def headline_train(r: dict) -> str:
    out = []
    for (case, impl, metric), row in _rows(r).items():
        if metric != "images_per_s":
            continue
        rows = _rows(r)
        text = f"{case} {impl}: {row['value']:.0f} img/s"
        if impl == "synthetic":
            tf = rows.get((case, impl, "achieved_tflops"))
            mfu = rows.get((case, impl, "mfu"))
            if tf:
                text += f", {tf['value']:.1f} TFLOP/s"
            if mfu:
                text += f", MFU {100 * mfu['value']:.0f}%"
        elif _num(row.get("ratio")) is not None:
            text += f" ({row['ratio']:.2f}x synthetic)"
        out.append(text)
    skipped = (r.get("settings") or {}).get("skipped") or {}
    out += [f"{k} skipped" for k in skipped]
    return "; ".join(out) or "no rows"


def headline_loader(r: dict) -> str:
    out, rows = [], _rows(r)
    for (case, impl, metric), row in rows.items():
        if metric == "images_per_s":
            ratio = (f" ({row['ratio']:.2f}x {row['baseline']})"
                     if impl != row["baseline"] and _num(row.get("ratio")) else "")
            first = [rows.get((case, impl, m), {}).get("value")
                     for m in ("first_batch_s_cold", "first_batch_s_warm")]
            if all(_num(x) is not None for x in first):
                ratio += f", first batch {first[0]:.1f} s cold / {first[1]:.1f} s warm"
            out.append(f"{case} {impl}: {row['value']:.0f} img/s{ratio}")
    out += [f"{k} skipped" for k in (r.get("settings") or {}).get("skipped") or {}]
    return "; ".join(out) or "no rows"


def headline_quality(r: dict) -> str:
    enc, raw = r.get("encoder_top1"), r.get("raw_pixels_top1")
    text = f"linear top-1 {100 * enc:.2f}%" if enc is not None else "no accuracy"
    if raw is not None:
        text += f" (raw pixels {100 * raw:.2f}%)"
    p = r.get("pretraining") or {}
    if p:
        text += (f" after {p.get('wall_s', 0):.0f} s, {p.get('epochs', 0):.1f} epochs at "
                 f"{p.get('images_per_s', 0):.0f} img/s")
    ft, scratch = r.get("finetune_1pct_top1"), r.get("finetune_1pct_scratch_top1")
    if ft is not None:
        text += f"; 1% labels fine-tuned {100 * ft:.2f}%"
        text += f" (scratch {100 * scratch:.2f}%)" if scratch is not None else ""
    return text


HEADLINES = {"loss-fp32": headline_loss, "loss-bf16": headline_loss, "optim": headline_optim,
             "train": headline_train, "train-loaders": headline_train, "loader": headline_loader,
             "quality": headline_quality}


def finish_record(step: Step, rec: dict) -> dict:
    """Status, headline and parsed results of a step that ran."""
    rc, timed_out = rec["returncode"], rec["timed_out"]
    rec["status"], rec["headline"], rec["results"] = "pass", "", None
    if step.name == "env":
        env = _env_from_log(Path(rec["log"]))
        rec["results"] = env
        if env is None:
            rec["status"], rec["headline"] = "fail", "no environment record"
        else:
            rec["headline"] = headline_env(env)
    elif step.name == "tests":
        summary = summarise_tests(step.result_file)
        rec["results"] = summary
        if summary is None:
            rec["status"], rec["headline"] = "fail", "pytest wrote no report"
        else:
            rec["headline"] = (f"{summary['passed']} passed, "
                               f"{summary['failures'] + summary['errors']} failed, "
                               f"{summary['skipped']} skipped")
            if summary["failures"] + summary["errors"]:
                rec["status"] = "fail"
            elif summary["passed"] == 0:
                rec["status"] = "skip"
                reasons = "; ".join(summary["skip_reasons"]) or "no GPU test ran"
                rec["headline"] += f" ({reasons})"
    else:
        result = _load_json(step.result_file)
        rec["results"] = result
        if result is not None:
            problems = contract_problems(result) if step.name != "quality" else []
            if problems:
                rec["status"] = "fail"
                rec["headline"] = "benchmark JSON breaks the contract: " + "; ".join(problems)
            else:
                try:
                    rec["headline"] = HEADLINES[step.name](result)
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                    rec["headline"] = f"(no headline: {type(e).__name__}: {e})"
        elif not timed_out:
            rec["status"], rec["headline"] = "fail", "the step wrote no results"
    if timed_out:
        rec["status"] = "timeout"
        rec["headline"] = (f"killed after its {rec['limit_s']:.0f} s share"
                           + (f"; {rec['headline']}" if rec["headline"] else ""))
    elif rc != 0 and rec["status"] != "fail":
        rec["status"] = "fail"
        rec["headline"] = f"exit status {rc}" + (f"; {rec['headline']}" if rec["headline"] else "")
    if step.note:
        rec["note"] = step.note
        rec["headline"] += f" [{step.note}]"
    if rec["status"] in ("fail", "timeout"):
        last = next((line for line in reversed(rec["log_tail"]) if line.strip()), "")
        rec["headline"] += f" | last log line: {last.strip()[:160]}"
    return rec


def _env_from_log(path: Path) -> dict | None:
    for line in reversed(_tail(path, 400)):
        if line.startswith("ENV "):
            try:
                return json.loads(line[4:])
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------- child: environment

def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _try_import(module: str, timeout: float = 120.0) -> dict:
    """Import `module` in a fresh interpreter (a broken install can crash or hang it)."""
    code = (f"import {module} as m; print('VERSION', getattr(m, '__version__', '?'))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"import {module} hung for {timeout:.0f} s"}
    if proc.returncode == 0:
        version = next((x.split()[1] for x in proc.stdout.splitlines()
                        if x.startswith("VERSION ")), "?")
        return {"ok": True, "version": version}
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    return {"ok": False, "error": lines[-1][:300] if lines else f"exit status {proc.returncode}"}


def environment() -> dict:
    import torch

    env: dict = {"python": platform.python_version(), "executable": sys.executable,
                 "platform": platform.platform(),
                 "time_utc": dt.datetime.now(dt.timezone.utc).isoformat()}
    mem_gib = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    env["cpu"] = {"model": cpu_model(), "cores": os.cpu_count(), "memory_gib": mem_gib,
                  "torch_threads": torch.get_num_threads()}
    env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                    "cudnn": (torch.backends.cudnn.version()
                              if torch.backends.cudnn.is_available() else None),
                    "cuda_available": torch.cuda.is_available(), "bf16_supported": None}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2**30,
                         "capability": f"{p.major}.{p.minor}",
                         "multiprocessors": p.multi_processor_count})
        env["torch"]["bf16_supported"] = torch.cuda.is_bf16_supported()
    env["gpus"] = gpus
    env["driver"] = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.split()
            env["driver"] = out[0] if out else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    from model.flops import peak_flops

    peak = peak_flops("cuda", torch.bfloat16) if gpus else None
    # the MFU denominator; None: GPU not in the table
    env["peak_tflops_bf16"] = peak / 1e12 if peak else None
    env["versions"] = {d: _version(d) for d in ("torch", "torchvision", "triton", "accelerate",
                                                 "numba", "numpy", "pillow", "pyyaml", "tqdm",
                                                 "rich", "tensorboard", "pytest")}
    env["versions"]["nvidia-dali"] = next(
        (_version(d) for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
         if _version(d)), None)
    env["versions"]["ffcv"] = _version("ffcv")
    env["versions"]["lightly"] = _version("lightly")
    env["triton_importable"] = importlib.util.find_spec("triton") is not None
    env["optional"] = {name: _try_import(module) for name, module in OPTIONAL.items()}
    env["env_vars"] = {k: os.environ[k]
                       for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET", "OMP_NUM_THREADS")
                       if k in os.environ}
    return env


# ---------------------------------------------------------------- child: quality

def quality(args, limit_s: float) -> dict:
    """Convert Fashion-MNIST, pretrain for what the limit leaves, evaluate; the results as a
    dict."""
    t0 = time.perf_counter()
    out = args.out.resolve()
    data_dir, run_dir = out / "fashion-mnist", out / "quality-run"
    from tools.convert import main as convert_main

    if convert_main([str(args.data), str(data_dir), "--overwrite"]) != 0:
        raise SystemExit("quality: converting --data failed (see the log above)")
    t_convert = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)

    # Linear evaluation, fine-tuning, embeddings and process start-ups need time too: the rest
    # goes to pretraining.
    reserve = 105.0 if args.device == "cuda" else 80.0
    budget = max(10.0, limit_s - t_convert - reserve - 10.0)
    if args.quick:  # about 30 steps: the plan is fixed at step 30 (see train.time_budget_s)
        budget = min(budget, 5.0)
    workers = args.workers or min(16, os.cpu_count() or 1)
    overrides = [f"--train.out_dir={run_dir}", f"--data.path={data_dir}",
                 f"--train.time_budget_s={budget:.0f}", f"--data.num_workers={workers}",
                 "--train.knn_every=-1", "--train.checkpoint_every=0"]
    # The recipe's DALI when it imports, else the torchvision reference loader.
    overrides.append("--data.backend="
                     + ("dali" if _try_import("nvidia.dali")["ok"] else "torchvision"))
    if args.quick:  # a toy network and batch: this checks the path, not the accuracy
        overrides += ["--model.width=0.125", "--model.head_out=16", "--data.batch_size=64",
                      "--optim.epochs=1", "--optim.warmup_epochs=0.1", "--train.log_every=5"]
    if args.device == "cpu":
        overrides.append("--train.mixed_precision=fp32")
    from train.pretrain import main as pretrain_main

    recipe = str(ROOT / "train" / "configs" / "fashion_mnist_gpu.yaml")
    print(f"[quality] pretraining for {budget:.0f} s: {recipe} {' '.join(overrides)}", flush=True)
    if pretrain_main(["--config", recipe, *overrides]) != 0:
        raise SystemExit("quality: pretraining failed (see the log above)")
    t_pretrain = time.perf_counter() - t0 - t_convert

    from train.linear_eval import main as eval_main

    eval_json = out / "quality-linear-eval.json"
    eval_args = ["--checkpoint", str(run_dir), "--json", str(eval_json), "--device", args.device]
    if args.quick:
        eval_args += ["--train-samples", "2000", "--eval-samples", "1000"]
    if eval_main(eval_args) != 0:
        raise SystemExit("quality: linear evaluation failed (see the log above)")
    ev = json.loads(eval_json.read_text())
    t_eval = time.perf_counter() - t0 - t_convert - t_pretrain
    after = after_pretraining(args, run_dir, data_dir, out)
    return {"encoder_top1": ev["encoder"]["top1"], "encoder_top5": ev["encoder"]["top5"],
            "raw_pixels_top1": ev.get("raw_pixels", {}).get("top1"),
            "train_count": ev["train_count"], "eval_count": ev["eval_count"],
            "pretraining": ev.get("pretraining"), "recipe": recipe, "overrides": overrides,
            "time_budget_s": budget, **after,
            "seconds": {"convert": t_convert, "pretrain": t_pretrain, "evaluate": t_eval,
                        "after": time.perf_counter() - t0 - t_convert - t_pretrain - t_eval}}


def after_pretraining(args, run_dir: Path, data_dir: Path, out: Path) -> dict:
    """train.finetune on 1% of the labels and tools.embed of the test split with a query, each
    in its own process (each builds its own Accelerator / device state), on this device."""
    ft_dir, prefix = out / "quality-finetune", out / "quality-embed" / "test"
    shutil.rmtree(ft_dir, ignore_errors=True)
    ft = [sys.executable, "-m", "train.finetune", "--checkpoint", str(run_dir), "--labels", "0.01",
          "--out", str(ft_dir)]
    if args.quick:
        ft += ["--epochs", "1", "--min-steps", "0", "--batch-size", "64", "--no-scratch"]
    embed = [sys.executable, "-m", "tools.embed", "--checkpoint", str(run_dir), str(data_dir),
             "--split", "test", "--out", str(prefix), "--device", args.device,
             "--query", "test/0", "--k", "5"]
    for what, cmd in (("fine-tuning", ft), ("embeddings", embed)):
        print(f"[quality] {what}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"quality: {what} failed (see the log above)")
    r = json.loads((ft_dir / "finetune.json").read_text())
    emb = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    hits = json.loads(prefix.with_name(prefix.name + ".query.json").read_text())
    return {"finetune_1pct_top1": r["pretrained"]["top1"],
            "finetune_1pct_scratch_top1": r.get("scratch", {}).get("top1"),
            "finetune_images_per_s": r["pretrained"]["images_per_s"],
            "embed_images_per_s": emb.get("images_per_s"), "embed_count": emb.get("count"),
            "embed_query": hits}


# ---------------------------------------------------------------- driver

def _clean(x):
    """JSON-safe: NaN and infinities become null (the report is strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def print_table(records: list[dict], file=sys.stdout) -> None:
    width = max(len(r["name"]) for r in records)
    print(f"\n{'step':<{width}}  {'status':<7} {'seconds':>7}  headline", file=file)
    print("-" * (width + 80), file=file)
    for r in records:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        print(f"{r['name']:<{width}}  {r['status']:<7} {secs:>7}  {r['headline']}", file=file)


def run_all(args) -> dict:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    wanted = set(STEP_NAMES if not args.steps
                 else [s.strip() for s in args.steps.split(",") if s.strip()])
    unknown = wanted - set(STEP_NAMES)
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(sorted(unknown))}: choose among "
                         f"{', '.join(STEP_NAMES)}")
    print(f"gpu_check: device {args.device}{' (quick)' if args.quick else ''}, "
          f"budget {args.budget_s:.0f} s, logs in {out}", flush=True)

    records: list[dict] = []
    env: dict | None = None
    steps = plan_steps(args, None, out)
    i = 0
    while i < len(steps):
        step = steps[i]
        if step.name not in wanted:
            i += 1
            continue
        todo = [s for s in steps[i:] if s.name in wanted and s.argv is not None]
        remaining = args.budget_s - (time.perf_counter() - t_start)
        rec = {"name": step.name, "title": step.title, "seconds": None, "limit_s": None}
        if step.argv is None:
            rec.update(status="skip", headline=step.skip)
        elif remaining < 5:
            rec.update(status="skip", headline=f"the --budget-s of {args.budget_s:.0f} s is spent")
        else:
            limit = share_of_budget([s.weight for s in todo], remaining)
            print(f"[{len(records) + 1}/{len(steps)}] {step.name}: {step.title} "
                  f"(limit {limit:.0f} s)", flush=True)
            rec.update(run_step(step, limit, out / f"{step.name}.log"))
            finish_record(step, rec)
        print(f"    {rec['status']}: {rec['headline']}", flush=True)
        records.append(rec)
        if step.name == "env" and rec.get("results"):
            env = rec["results"]
            # the loaders follow what imports
            steps = steps[:i + 1] + plan_steps(args, env, out)[i + 1:]
        i += 1

    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    report = {"tool": "gpu_check", "device": args.device, "quick": args.quick,
              "budget_s": args.budget_s, "seconds": time.perf_counter() - t_start,
              "command": [sys.executable, "-m", "tools.gpu_check", *sys.argv[1:]],
              "data": str(args.data) if args.data else None,
              "images": str(args.images) if args.images else None,
              "environment": env, "counts": counts, "steps": records}
    return _clean(report)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.env_child:
        print("ENV " + json.dumps(_clean(environment())), flush=True)
        return 0
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch sees no CUDA device: check the driver and "
              "CUDA_VISIBLE_DEVICES, or run --device cpu --quick", file=sys.stderr)
        return 2
    if args.data is None:
        args.data = _default_data()
    elif not all((args.data / f).is_file() for f in FMNIST_FILES):
        print(f"gpu_check: error: --data '{args.data}' lacks the Fashion-MNIST files "
              f"({', '.join(FMNIST_FILES)})", file=sys.stderr)
        return 2
    if args.images is None:
        args.images = _default_images()
    if args.quality_child is not None:
        result = quality(args, args.quality_child)
        path = args.json or (args.out / "quality.json")
        write_atomic(path, json.dumps(_clean(result), indent=1) + "\n")
        print(f"[quality] {headline_quality(result)}")
        return 0
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
