"""Accuracy against wall-clock time: simclr-fast (each loader backend) against lightly's SimCLR,
on the same dataset directory, encoder, batch size, augmentation and temperature, for the same
training budget on the same cores.

    python -m tools.bench_quality --quick
    python -m tools.bench_quality --budget 600 --json quality.json        # and quality.png

Contenders, each in a fresh process with --threads torch threads and loader workers:
    simclr-fast/<backend>  accelerate launch -m train.pretrain with --train.time_budget_s and
                           --train.knn_every_s (train.cells.pretrain, the runner of
                           tools.study's cells); its kNN curve is read from the run's log.jsonl
    lightly                tools.peer_lightly: lightly's transform, loss and projection head on
                           our encoder, SGD as lightly's CIFAR-10 benchmark, the same kNN curve
Baselines on the same evaluation, computed here: raw pixels and a randomly initialised encoder.

kNN top-1 (train/features.py, train.knn_k neighbours over a seeded bank of
train.knn_train_samples train images, the whole data.eval_split) is measured every --every
seconds of training, the clock paused while it runs, and at the end. Each final encoder (and each
baseline) gets the linear probe of train.linear_eval on --probe-train / --probe-eval images.
Rows: case "t=<S>s" holds each contender's evaluation nearest that time (at most half an
interval after it), "final" the last evaluation, linear top-1, images/s and the training seconds
to reach the peer's final kNN top-1 (a row only where reached); every ratio is against lightly
at the same case. Without lightly those ratios are NaN and the reason is in settings.skipped.
Every contender must train its whole budget: each one's training seconds (its training clock at
the end, evaluations excluded) are the rows of metric "train_s", the JSON's `train_seconds`, and
`budget_check` says whether each lies within 2% of --budget (a warning names any that does not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.loader import BACKENDS, BackendUnavailable, require_backend
from pipelines.sources import DatasetError, open_dataset
from tools import benchmark
from train.cells import (
    BUDGET_TOLERANCE,
    Budget,
    CellFailed,
    PretrainJob,
    budget_check,
    budget_warning,
    pretrain,
    probe_top1,
)
from train.checkpoint import CheckpointError, load_pretrained
from train.cli import above, at_least
from train.config import ConfigError, build_config, load_config, load_yaml
from train.features import extract_features, knn_accuracy, knn_bank, knn_top1
from train.linear_eval import raw_pixels

REPO = Path(__file__).resolve().parent.parent
PEER = "lightly"
FLAT = ("raw-pixels", "random-init")
DEFAULT_CONFIG = "train/configs/fashion_mnist_demo.yaml"
# --quick: a check of the whole path, not a measurement (10 s per contender)
QUICK = {"budget": 10.0, "every": 5.0, "backends": "torchvision", "probe_train": 1000,
         "probe_eval": 500, "set": ["model.width=0.125", "data.batch_size=64",
                                    "train.knn_train_samples=500", "train.log_every=1"]}
METRICS = [("kNN top-1", "knn_top1", "{:.2%}", "value"),
           ("kNN vs lightly", "knn_top1", "{:.2f}x", "ratio"),
           ("linear top-1", "linear_top1", "{:.2%}", "value"),
           ("img/s", "images_per_s", "{:.0f}", "value"),
           ("s to peer final", "time_to_peer_final_s", "{:.0f}", "value"),
           ("train s", "train_s", "{:.1f}", "value")]


class Failed(RuntimeError):
    """A contender that could not run; the message says why."""


def build_parser():
    p = benchmark.parser(
        "bench_quality",
        "kNN top-1 against training time and final linear top-1 of simclr-fast (each loader "
        "backend) and lightly's SimCLR, with raw-pixel and random-encoder baselines; print a "
        "table, optionally write JSON and a PNG of the curves.",
        device="where every contender trains and evaluates", quick="a small run; see below",
        epilog=f"--quick: budget {QUICK['budget']:g} s, kNN every {QUICK['every']:g} s, backend "
               f"{QUICK['backends']} and lightly, {' '.join(QUICK['set'])}, linear probe on "
               f"{QUICK['probe_train']}/{QUICK['probe_eval']} images (minutes on 2 CPU cores); "
               f"options given explicitly override these.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"the recipe every contender follows (default {DEFAULT_CONFIG})")
    p.add_argument("--data", default=None,
                   help="dataset directory from tools.convert (default: the config's data.path)")
    p.add_argument("--budget", type=above(0.0), default=None,
                   help="seconds of training per contender (default 600)")
    p.add_argument("--every", type=above(0.0), default=None,
                   help="seconds of training between kNN evaluations (default budget/10)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated simclr-fast loaders among {','.join(BACKENDS)} "
                        f"(default: every one that imports)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch threads and loader workers of every contender (default: the "
                        "CPU cores)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="a config override for every contender, e.g. model.width=0.25 "
                        "(repeatable)")
    p.add_argument("--probe-train", type=at_least(0), default=None, metavar="N",
                   help="train images of the linear probe, a seeded subset (default 10000; 0: all)")
    p.add_argument("--probe-eval", type=at_least(0), default=None, metavar="N",
                   help="evaluation images of the linear probe (default 0: all)")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="PNG of the kNN curves (default: --json's path with .png, else none)")
    return p


# ---------------------------------------------------------------- curves

def read_curve(log: Path) -> list[dict]:
    """The {"seconds", "images", "epoch", "knn_top1"} points of a run's log.jsonl ("knn" events),
    by training seconds."""
    points = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(r, dict) and r.get("event") == "knn":
            points.append({"seconds": float(r["train_s"]), "images": int(r["images"]),
                           "epoch": float(r["epoch"]), "knn_top1": float(r["knn_top1"])})
    return sorted(points, key=lambda p: p["seconds"])


def value_at(curve: list[dict], t: float, every: float) -> float | None:
    """kNN top-1 at time t: the last evaluation up to half an interval after t (evaluations fall
    just after each multiple of --every, the last one where the budget ends); None before any."""
    before = [p["knn_top1"] for p in curve if p["seconds"] <= t + every / 2]
    return before[-1] if before else None


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds of the first evaluation at or above `target` (None: never)."""
    return next((p["seconds"] for p in curve if p["knn_top1"] >= target), None)


def images_per_s(curve: list[dict]) -> float | None:
    """Images over training seconds where the last images were reached: a final evaluation
    logged after the last step (e.g. after the final checkpoint) adds no training time."""
    if not curve:
        return None
    last = curve[-1]["images"]
    seconds = min(p["seconds"] for p in curve if p["images"] == last)
    return last / seconds if seconds > 0 else None


def grid(budget: float, every: float) -> list[float]:
    return [every * k for k in range(1, max(1, round(budget / every)) + 1)]


# ---------------------------------------------------------------- evaluation

def raw_pixel_knn(cfg, train_split, eval_split) -> float:
    bs = cfg.eval.batch_size
    th, ty = raw_pixels(train_split, cfg.augment, bs, knn_bank(cfg, len(train_split)))
    eh, ey = raw_pixels(eval_split, cfg.augment, bs)
    return knn_accuracy(th, ty, eh, ey, k=cfg.train.knn_k)


def linear_top1(cfg, features, train_split, eval_split, probe: tuple,
                device="cpu") -> float:
    """Linear-probe top-1 of `features(split, indices) -> (x, y)` (0 in `probe`: all images)."""
    return probe_top1(cfg, features, train_split, eval_split, probe, device)


def encoder_features(cfg, encoder, device):
    kw = dict(batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers)
    return lambda split, idx: extract_features(encoder, split, cfg.augment, indices=idx, **kw)


def trained_encoder(run_dir: Path):
    """The encoder of simclr-fast's final checkpoint in `run_dir`, or of the peer's encoder.pt."""
    from model.simclr import build_simclr

    if (run_dir / "encoder.pt").is_file():
        cfg = build_config(load_yaml(run_dir / "config.yaml"))
        encoder = build_simclr(cfg.model).encoder
        encoder.load_state_dict(torch.load(run_dir / "encoder.pt", weights_only=True))
        return encoder
    return load_pretrained(run_dir)[2].encoder


# ---------------------------------------------------------------- contenders

def run_contender(name: str, cmd: list[str], env: dict, log: Path, timeout: float) -> None:
    """Run one contender's process, its output into `log`; Failed with its last line."""
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            raise Failed(f"still running after {timeout:.0f} s: see a run by hand") from None
    if rc != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        raise Failed(f"exit code {rc}: {lines[-1].strip() if lines else 'no output'}")


def contender_jobs(s: dict, work: Path) -> dict[str, PretrainJob | tuple[list[str], Path]]:
    """name -> the PretrainJob of each simclr-fast contender (launched as every pretraining is,
    train.cells), and the peer's (command, output folder)."""
    out: dict = {}
    for b in s["backends"]:
        out[f"simclr-fast/{b}"] = PretrainJob(
            s["config"], (f"--train.knn_every_s={s['every']:g}", "--train.knn_every=0",
                          f"--data.backend={b}", "--train.checkpoint_every=0", *s["overrides"]),
            work / b, Budget(seconds=s["budget"]), s["device"].type, s["threads"],
            timeout=4 * s["budget"] + 900, processes=1)  # one device, as the peer
    out[PEER] = ([sys.executable, "-m", "tools.peer_lightly", "--config", s["config"], "--out",
                  str(work / PEER), "--budget", f"{s['budget']:g}", "--every", f"{s['every']:g}",
                  "--threads", str(s["threads"]), *s["overrides"]], work / PEER)
    return out


def peer_train_seconds(out: Path, curve: list[dict]) -> float | None:
    """The peer's training seconds: its summary.json's, else its last kNN point's."""
    try:
        return float(json.loads((out / "summary.json").read_text())["train_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return curve[-1]["seconds"] if curve else None


def _env(s: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(s["threads"]),
           "MKL_NUM_THREADS": str(s["threads"])}
    if s["device"].type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
    return env


# ---------------------------------------------------------------- driver

def _settings(args, device) -> dict:
    q = QUICK if args.quick else {}
    budget = args.budget or q.get("budget", 600.0)
    every = args.every or q.get("every", budget / 10)
    if every > budget:
        raise ValueError(f"--every {every:g} exceeds --budget {budget:g}: lower --every")
    names = [b.strip() for b in (args.backends or q.get("backends", ",".join(BACKENDS)))
             .split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"unknown backend(s) '{','.join(unknown)}': choose among "
                         f"{','.join(BACKENDS)}")
    sets = [*q.get("set", []), *(args.set or [])]
    bad = [x for x in sets if "=" not in x]
    if bad:
        raise ValueError(f"--set '{bad[0]}' is not KEY=VALUE: write e.g. --set model.width=0.25")
    threads = args.threads or os.cpu_count() or 1
    overrides = [f"--{x}" for x in sets] + [f"--data.num_workers={threads}"]
    data = [f"--data.path={args.data}"] if args.data else []
    cfg = load_config(args.config, overrides + data)  # a bad key fails here, not per contender
    open_dataset(cfg.data.path)
    # the contenders run in the repository: a path relative to here is passed absolute
    cfg.data.path = str(Path(cfg.data.path).resolve())
    overrides.append(f"--data.path={cfg.data.path}")
    skipped = {}
    backends = []
    for b in names:
        try:
            require_backend(b)
            backends.append(b)
        except BackendUnavailable as e:
            skipped[f"simclr-fast/{b}"] = str(e)
    probe = (args.probe_train if args.probe_train is not None else q.get("probe_train", 10000),
             args.probe_eval if args.probe_eval is not None else q.get("probe_eval", 0))
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    return {"cfg": cfg, "config": str(Path(args.config).resolve()), "budget": budget,
            "every": every, "backends": backends, "threads": threads, "overrides": overrides,
            "probe": probe, "skipped": skipped, "device": device, "plot": plot}


def evaluate_all(s: dict, runs: dict[str, Path]) -> tuple[dict, dict]:
    """(final kNN top-1 of the baselines, linear top-1 of every contender and baseline)."""
    cfg, device = s["cfg"], s["device"]
    ds = open_dataset(cfg.data.path)
    train_split, eval_split = ds.split(cfg.data.train_split), ds.split(cfg.data.eval_split)
    from model.simclr import build_simclr

    torch.manual_seed(cfg.train.seed)
    random_encoder = build_simclr(cfg.model).encoder.to(device)
    bs = cfg.eval.batch_size
    flat = {"raw-pixels": raw_pixel_knn(cfg, train_split, eval_split),
            "random-init": knn_top1(cfg, random_encoder, train_split, eval_split, device)}
    def probe(features) -> float:
        return linear_top1(cfg, features, train_split, eval_split, s["probe"], device)

    linear = {name: probe(encoder_features(cfg, trained_encoder(run_dir).to(device), device))
              for name, run_dir in runs.items()}
    linear["raw-pixels"] = probe(lambda split, idx: raw_pixels(split, cfg.augment, bs, idx))
    linear["random-init"] = probe(encoder_features(cfg, random_encoder, device))
    return flat, linear


def result_rows(curves: dict, flat: dict, linear: dict, budget: float, every: float,
                seconds: dict | None = None) -> tuple[list[dict], dict]:
    """The JSON rows and each contender's seconds to reach the peer's final kNN top-1;
    `seconds`: each contender's training seconds (rows of metric train_s)."""
    rows = []
    for t in grid(budget, every):
        values = {n: value_at(c, t, every) for n, c in curves.items()}
        rows += benchmark.rows(f"t={t:g}s", "knn_top1",
                               {n: v for n, v in values.items() if v is not None}, PEER)
    final = {n: c[-1]["knn_top1"] for n, c in curves.items() if c}
    rows += benchmark.rows("final", "knn_top1", {**final, **flat}, PEER)
    rows += benchmark.rows("final", "linear_top1", linear, PEER)
    speed = {n: v for n, v in ((n, images_per_s(c)) for n, c in curves.items()) if v}
    rows += benchmark.rows("final", "images_per_s", speed, PEER)
    target = final.get(PEER)
    reach = {n: None if target is None else time_to_reach(c, target) for n, c in curves.items()}
    rows += benchmark.rows("final", "time_to_peer_final_s",
                           {n: v for n, v in reach.items() if v is not None}, PEER)
    rows += benchmark.rows("final", "train_s",
                           {n: v for n, v in (seconds or {}).items() if v is not None}, PEER)
    return rows, reach


def plot_curves(path: Path, curves: dict, flat: dict, title: str) -> None:
    """kNN top-1 against training minutes, a line per contender, dashed flat baselines."""
    from tools.plot import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(8, 5), dpi=100)
    for i, (name, c) in enumerate(curves.items()):
        ax.plot([p["seconds"] / 60 for p in c], [100 * p["knn_top1"] for p in c], marker="o",
                color=f"C{i}", label=name)
    for i, (name, v) in enumerate(flat.items(), start=len(curves)):
        ax.axhline(100 * v, linestyle="--", color=f"C{i}", label=f"{name} (baseline)")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(title)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    save_png(fig, path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_quality")
    try:
        s = _settings(args, device)
    except (ValueError, ConfigError, DatasetError) as e:  # ConfigError is a ValueError
        print(f"bench_quality: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(s["threads"])  # importing ffcv (require_backend) sets 1
    from tools.peer_lightly import unavailable

    t0 = time.perf_counter()
    skipped, curves, runs, seconds = s["skipped"], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        work = Path(tmp)
        for name, job in contender_jobs(s, work).items():
            reason = unavailable() if name == PEER else None
            log = work / f"{name.replace('/', '-')}.log"
            try:
                if reason:
                    raise Failed(reason)
                if name == PEER:
                    cmd, run_dir = job
                    run_contender(name, cmd, _env(s), log, timeout=4 * s["budget"] + 900)
                else:
                    run_dir = job.run_dir
                    print(f"[{name}] {' '.join(job.command()[1:])}", flush=True)
                    try:
                        seconds[name] = pretrain(job, log)["train_s"]
                    except CellFailed as e:
                        raise Failed(str(e)) from None
                curves[name] = read_curve(run_dir / "log.jsonl")
                if not curves[name]:
                    raise Failed(f"no kNN evaluation in {run_dir / 'log.jsonl'}")
                if name == PEER:
                    seconds[name] = peer_train_seconds(run_dir, curves[name])
                runs[name] = run_dir
            except Failed as e:
                curves.pop(name, None)
                seconds.pop(name, None)
                skipped[name] = str(e)
                print(f"[{name}] skipped: {e}", file=sys.stderr, flush=True)
                continue
            last = curves[name][-1]
            print(f"[{name}] kNN top-1 {100 * last['knn_top1']:.2f}% after "
                  f"{last['seconds']:.0f} s ({len(curves[name])} evaluations)", flush=True)
        try:
            flat, linear = evaluate_all(s, runs)
        except (ConfigError, DatasetError, CheckpointError) as e:
            print(f"bench_quality: error: {e}", file=sys.stderr)
            return 2
    rows, reach = result_rows(curves, flat, linear, s["budget"], s["every"], seconds)
    checks = {n: budget_check(v, s["budget"]) for n, v in seconds.items()}
    cfg = s["cfg"]
    settings = {
        "quick": args.quick, "config": s["config"], "data": cfg.data.path,
        "budget_s": s["budget"], "every_s": s["every"], "threads": s["threads"],
        "overrides": s["overrides"], "backends": s["backends"], "peer": PEER,
        "arch": cfg.model.arch, "width": cfg.model.width, "batch_size": cfg.data.batch_size,
        "temperature": cfg.loss.temperature, "knn_k": cfg.train.knn_k,
        "knn_train_samples": cfg.train.knn_train_samples, "eval_split": cfg.data.eval_split,
        "probe_train": s["probe"][0], "probe_eval": s["probe"][1], "skipped": skipped,
        "wall_s": time.perf_counter() - t0, "cpu_count": os.cpu_count(),
        "peer_optimizer": "SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4, cosine "
                          "(lightly's CIFAR-10 benchmark)",
        "budget_tolerance": BUDGET_TOLERANCE,
        "time_points": "case t=<S>s: each contender's last kNN evaluation up to half an "
                       "interval after S seconds of training (evaluation time excluded)"}
    print()
    benchmark.print_table(rows, METRICS)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for name, check in checks.items():
        warning = budget_warning(name, check)
        if warning:
            print(f"bench_quality: warning: {warning}: the equal-time comparison is off by that "
                  f"much", file=sys.stderr)
    report = benchmark.report(device, settings, rows)
    report.update({"curves": curves, "linear_top1": linear, "time_to_peer_final_s": reach,
                   "train_seconds": seconds, "budget_check": checks})
    benchmark.write_json(args.json, report)
    if s["plot"]:
        plot_curves(s["plot"], curves, flat, f"kNN top-1 on '{cfg.data.eval_split}', "
                                             f"{s['budget']:g} s budget, {s['threads']} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
