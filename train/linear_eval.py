"""Linear evaluation of a pretrained encoder (Chen et al., 2020, Sec. 4: linear evaluation
protocol).

    python -m train.linear_eval --checkpoint runs/fashion-mnist-demo [--features h|g] [--json PATH]

Features of the frozen network are extracted once from the evaluation view of each image (above
32 px the official centre crop of 0.875, bicubic): h = f(x), the encoder's output before the
projection head (the default: the representation the paper keeps), or with --features g the head's
output g(h), the paper's comparison (Sec. 4.2, Table 3; a model trained without a head,
model.head_layers 0, has g(h) = h, so g evaluates h and warns). A multinomial logistic regression
is fitted by L-BFGS, its L2 penalty picked on a held-out part of the train split from a log-spaced
grid (eval.l2_search coarse: every other value, then the best one's two neighbours; full: every
value), each fit warm-started from the nearest stronger one. The three probes run side by side,
one per core. The same
classifier on raw pixels and on a randomly initialised network of the same architecture is fitted
beside it, so the reader sees what pretraining bought. Top-1/top-5 go to JSON: --json, else
linear_eval.json in the run directory that owns the checkpoint (with the run's summary.json
when that describes this checkpoint), else <step dir>.linear_eval.json beside a checkpoint that
is not inside a run's checkpoints/ folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.sources import DatasetError, open_dataset
from train.atomic import unwritable, write_atomic
from train.checkpoint import load_pretrained, run_dir_of, run_output
from train.cli import add_checkpoint, at_least
from train.commands import print_report, run_command
from train.config import ConfigError
from train.features import eval_bf16, eval_views, extract_features
from train.precision import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.linear_eval",
                                description=__doc__.split("\n\n")[0])
    add_checkpoint(p)
    p.add_argument("--data", help="dataset directory (default: the one the encoder was trained on)")
    p.add_argument("--train-split", default=None,
                   help="split to fit the classifier on (default: data.train_split)")
    p.add_argument("--eval-split", default=None,
                   help="split to report accuracy on (default: data.eval_split)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default: <run dir>/linear_eval.json, or "
                   "<step dir>.linear_eval.json for a checkpoint outside a run directory)")
    p.add_argument("--features", choices=("h", "g"), default="h",
                   help="h: the encoder's output, before the projection head (default); g: the "
                   "head's output g(h) (with model.head_layers 0 there is no head and g = h, "
                   "evaluated with a warning); the random-init baseline takes the same features "
                   "of the untrained network")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the baselines (raw pixels and a randomly initialised network)")
    p.add_argument("--train-samples", type=at_least(1), default=None, metavar="N",
                   help="fit on a seeded random subset of N train images (default: all), for a "
                   "quick estimate")
    p.add_argument("--eval-samples", type=at_least(1), default=None, metavar="N",
                   help="report on a seeded random subset of N evaluation images (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where features are extracted and classifiers fitted (default: cuda when "
                   "available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="of the feature extraction: auto (the default) is bf16 autocast on a GPU "
                   "and on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16), as training's "
                   "auto, else float32; fp32 or bf16 force one. The classifiers always fit in "
                   "float32")
    return p


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All of range(n), or a seeded random `limit` of them in increasing order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int,
                 init: torch.nn.Linear | None = None,
                 xt: torch.Tensor | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression with an L2 penalty on the weights, full-batch L-BFGS,
    starting from zero or from `init`'s weights (a warm start along an L2 path).

    The loss, mean cross-entropy + l2/2 |W|^2, and its gradient are computed in closed form
    (softmax - one-hot), with no autograd graph: the logits as W x^T + b from `xt`, x^T
    stored contiguous (x.T.contiguous() when not given: pass it to share it across fits), and
    the gradient as (softmax - one-hot) x: the demo's fits took 0.7 of the time they took with
    F.cross_entropy and autograd, on the CPU (README, "Linear evaluation")."""
    n, dim = x.shape
    xt = x.T.contiguous() if xt is None else xt
    w = torch.nn.Parameter(init.weight.detach().clone() if init is not None
                           else x.new_zeros(classes, dim))
    b = torch.nn.Parameter(init.bias.detach().clone() if init is not None
                           else x.new_zeros(classes))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")
    rows = y.view(1, n)
    minus_one = x.new_full((1, n), -1.0)

    @torch.no_grad()
    def closure():
        z = torch.addmm(b[:, None], w, xt)  # logits [classes, n]
        lse = z.logsumexp(0, keepdim=True)
        # per-image differences first: a difference of two sums would cancel in float32
        loss = (lse - z.gather(0, rows)).mean() + 0.5 * l2 * w.pow(2).sum()
        p = z.sub_(lse).exp_().scatter_add_(0, rows, minus_one).div_(n)  # softmax - one-hot
        w.grad = torch.addmm(w, p, x, beta=l2)
        b.grad = p.sum(1)
        return loss

    opt.step(closure)
    clf = torch.nn.Linear(dim, classes, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        clf.weight.copy_(w)
        clf.bias.copy_(b)
    return clf


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict:
    # [M, kmax]; top-k of k classes = 1
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return {f"top{k}": (top[:, :k] == y[:, None]).any(1).float().mean().item() for k in ks}


def _coarse(grid_len: int, search: str) -> bool:
    """Whether the coarse search runs (on three values or fewer it is the full one)."""
    return search != "full" and grid_len > 3


def search_fits(grid_len: int, search: str) -> int:
    """How many fits `linear_probe` makes at most: the L2 search's and the refit."""
    if not _coarse(grid_len, search):
        return grid_len + 1
    return (grid_len + 1) // 2 + 2 + 1  # every other value, two neighbours, the refit


def accuracy_margin(*scored: tuple[float, int]) -> float:
    """Two standard errors of the difference of accuracies, each `(accuracy, images)` a binomial
    share of its images: the probe's sampling noise on a comparison."""
    return 2 * math.sqrt(sum(p * (1 - p) / n for p, n in scored))


def edge_rising(scores: dict, n_val: int) -> bool:
    """Whether the best of the penalties fitted, `scores` ({l2: validation top-1}), is an end of
    them and beats the nearest fitted penalty by more than two standard errors of the difference
    of two accuracies over `n_val` images: validation accuracy still rising at the grid's end,
    where a wider grid may find better. An end best only within that noise, as on a curve flat at
    the weak penalties, is not (a wider grid would pick at random among equals)."""
    order = sorted(scores)
    if len(order) < 2:
        return False
    best = max(sorted(scores, reverse=True), key=scores.get)  # ties: the stronger penalty
    if best not in (order[0], order[-1]):
        return False
    near = order[1] if best == order[0] else order[-2]
    p, q = scores[best], scores[near]
    return p - q > accuracy_margin((p, n_val), (q, n_val))


def linear_probe(train_x, train_y, test_x, test_y, *, l2_grid, val_fraction, max_iter, seed=0,
                 search="coarse", progress=None, device="cpu") -> dict:
    """Standardise, pick the L2 penalty on a held-out part of train, refit on all of train, test.

    The penalties are fitted strongest first, each starting from the solution of the nearest
    stronger one fitted (a warm-started L2 path). search "full" fits every value of `l2_grid`;
    "coarse" fits every other value, then the two grid neighbours of the best of those, and picks
    the best of all it fitted (on the demo: the same accuracies to 0.1 points with 9 fits of 14;
    README, "Linear evaluation"). The fits run on `device` (full-batch L-BFGS: seconds on a
    GPU)."""
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(train_x))).to(device)
    n_val = max(1, int(val_fraction * len(train_x)))
    val, fit = perm[:n_val], perm[n_val:]
    fit_x, fit_y, val_x, val_y = train_x[fit], train_y[fit], train_x[val], train_y[val]
    fit_xt = fit_x.T.contiguous()  # shared by the search's fits
    grid = sorted(set(l2_grid), reverse=True)  # strongest first
    scores, fits = {}, {}

    def fit_one(i: int) -> None:
        stronger = [fits[g] for g in grid[:i] if g in fits]
        clf = fit_logistic(fit_x, fit_y, classes, grid[i], max_iter,
                           init=stronger[-1] if stronger else None, xt=fit_xt)
        fits[grid[i]] = clf
        with torch.no_grad():
            scores[grid[i]] = topk_accuracy(clf(val_x), val_y)["top1"]
        if progress is not None:
            progress(1)

    def best() -> float:  # ties: the stronger penalty
        return max(sorted(scores, reverse=True), key=scores.get)

    coarse = _coarse(len(grid), search)
    for i in range(0, len(grid), 2 if coarse else 1):
        fit_one(i)
    if coarse:
        i = grid.index(best())
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid) and grid[j] not in fits:
                fit_one(j)
        if progress is not None:  # the bar counted two neighbours
            progress(search_fits(len(grid), search) - 1 - len(fits))
    chosen = best()
    at_edge = len(grid) > 1 and chosen in (grid[0], grid[-1])
    rising = at_edge and edge_rising(scores, n_val)
    clf = fit_logistic(train_x, train_y, classes, chosen, max_iter, init=fits[chosen])
    if progress is not None:
        progress(1)
    with torch.no_grad():
        result = topk_accuracy(clf(test_x), test_y)
    return {**result, "l2": chosen, "l2_at_edge": at_edge, "l2_edge_rising": rising,
            "l2_search": search,
            "val_top1_by_l2": {str(k): v for k, v in sorted(scores.items())}}


def run_probes(jobs: dict, progress=None, device="cpu", **probe) -> dict:
    """`linear_probe` of each {name: (train_x, train_y, test_x, test_y)}. On the CPU the probes
    run side by side, one per core, largest first: the fits are memory-bound matrix products with
    ten columns, which run faster in total one thread per probe than with every core on one probe
    at a time; a probe left running alone takes the freed cores at its next fit."""
    threads = torch.get_num_threads()
    workers = min(len(jobs), threads) if torch.device(device).type == "cpu" else 1
    if workers <= 1:
        return {name: linear_probe(*job, progress=progress, device=device, **probe)
                for name, job in jobs.items()}
    from concurrent.futures import ThreadPoolExecutor

    lock, left = threading.Lock(), [len(jobs)]

    def share() -> None:  # this thread's torch threads: the cores over the probes still running
        with lock:
            torch.set_num_threads(max(1, threads // min(left[0], workers)))

    def one(name: str) -> dict:
        def step(n: int) -> None:
            if progress is not None:
                progress(n)
            share()

        share()
        try:
            return linear_probe(*jobs[name], progress=step, device=device, **probe)
        finally:
            with lock:
                left[0] -= 1

    order = sorted(jobs, key=lambda n: -jobs[n][0].numel())
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {n: pool.submit(one, n) for n in order}
            return {name: futures[name].result() for name in jobs}
    finally:
        torch.set_num_threads(threads)


def raw_pixels(split, spec, batch_size: int,
               indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, un-augmented pixels at the training resolution (one channel for grayscale
    data)."""
    indices = np.arange(len(split)) if indices is None else indices
    gray = split.images is not None and split.images.shape[-1] == 1
    chunks = [x[:, :1] if gray else x for x in eval_views(split, spec, indices, batch_size)]
    return torch.cat(chunks).flatten(1), torch.from_numpy(np.asarray(split.labels)[indices]).long()


def check_device(text: str) -> str:
    """`text` if it names a device this machine has, else a one-line ConfigError."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{text}' is not a device: pass cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: no CUDA device is available here: pass --device cpu")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text}: this machine has {count} CUDA "
                          f"device(s): pass --device cuda:0")
    return text


def output_path(ckpt: Path, json_arg: str | None) -> Path:
    return Path(json_arg) if json_arg else run_output(ckpt, "linear_eval.json")


def run_summary(ckpt: Path) -> dict | None:
    """The owning run's summary.json, when it is the summary of this very checkpoint."""
    run_dir = run_dir_of(ckpt)
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or Path(str(summary.get("checkpoint", ""))).name != ckpt.name:
        return None
    return summary


def evaluate(args) -> dict:
    t0 = time.perf_counter()
    check_device(args.device)
    ckpt, cfg, model = load_pretrained(args.checkpoint)
    ds = open_dataset(args.data or cfg.data.path)
    train_split = ds.split(args.train_split or cfg.data.train_split)
    test_split = ds.split(args.eval_split or cfg.data.eval_split)
    for s in (train_split, test_split):
        if (s.labels < 0).any():
            raise DatasetError(f"split '{s.name}' is unlabelled: linear evaluation needs labels "
                               f"(convert a labelled dataset)")
    classes = len(np.unique(train_split.labels))
    if classes < 2:
        raise DatasetError(f"split '{train_split.name}' holds a single class: every classifier "
                           f"scores 100% on it; evaluate on a dataset with two classes or more")
    if classes <= 5:
        print(f"linear_eval: warning: split '{train_split.name}' has {classes} classes: top-5 "
              f"counts every image as right", file=sys.stderr)

    out = output_path(ckpt, args.json)
    problem = unwritable(out)
    if problem:  # before the features and fits, not after them
        raise ConfigError(f"--json: the results cannot be written: {problem}: pass another "
                          f"--json path")
    if args.features == "g" and cfg.model.head_layers == 0:
        print("linear_eval: warning: the model has no projection head (model.head_layers 0), so "
              "g(h) = h: --features g evaluates h", file=sys.stderr)
    train_idx = subset(len(train_split), args.train_samples, cfg.train.seed)
    test_idx = subset(len(test_split), args.eval_samples, cfg.train.seed + 1)
    feats = _features(args, cfg, model, (train_split, train_idx), (test_split, test_idx))
    probe = dict(l2_grid=cfg.eval.l2_grid, val_fraction=cfg.eval.val_fraction,
                 max_iter=cfg.eval.max_iter, seed=cfg.train.seed, search=cfg.eval.l2_search)
    fits = (search_fits(len(set(cfg.eval.l2_grid)), cfg.eval.l2_search)
            * (1 if args.no_baseline else 3))
    result = {"checkpoint": str(ckpt), "dataset": str(ds.root), "train_split": train_split.name,
              "eval_split": test_split.name, "features": args.features,
              "head": model.head_kind, "head_layers": cfg.model.head_layers,
              "train_count": len(train_idx),
              "eval_count": len(test_idx), "device": str(args.device),
              "precision": "bf16" if eval_bf16(args.precision, args.device) else "fp32"}
    from tqdm import tqdm

    jobs = {name: (train_h, train_y, test_h, test_y)
            for name, ((train_h, train_y), (test_h, test_y)) in feats.items()}
    if not args.no_baseline:
        spec, bs = cfg.augment, cfg.eval.batch_size
        jobs["raw_pixels"] = (*raw_pixels(train_split, spec, bs, train_idx),
                              *raw_pixels(test_split, spec, bs, test_idx))
    with tqdm(total=fits, desc="classifier fits", unit="fit") as bar:
        probes = run_probes(jobs, progress=bar.update, device=args.device, **probe)
    for name, job in jobs.items():
        result[name] = {"feature_dim": job[0].shape[1], **probes[name]}
    result["wall_s"] = time.perf_counter() - t0
    summary = run_summary(ckpt)
    if summary is not None:
        result["pretraining"] = summary
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=1))
    except OSError:
        _print_table(result, None)  # the results are shown even when they cannot be saved
        raise
    _print_table(result, out)
    _warn_at_edge(result, cfg.eval.l2_grid)
    return result


def _features(args, cfg, model, train: tuple, test: tuple) -> dict:
    """{name: ((train features, labels), (test features, labels))} of the pretrained network
    (the encoder, or encoder and head for --features g) and, unless --no-baseline, of the same
    network randomly initialised; `train` and `test` are (split, indices)."""
    from tqdm import tqdm

    from model.simclr import build_simclr

    torch.manual_seed(cfg.train.seed)
    # the baseline: the same network, no training
    random_net = build_simclr(cfg.model).features(args.features)
    encoders = {"encoder": model.features(args.features)}
    if not args.no_baseline:
        encoders["random_init"] = random_net
    kw = dict(batch_size=cfg.eval.batch_size, device=args.device,
              num_workers=cfg.data.num_workers, precision=args.precision)
    feats = {}
    with tqdm(total=len(encoders) * (len(train[1]) + len(test[1])), desc="features",
              unit="img") as bar:
        for name, enc in encoders.items():
            enc = enc.to(args.device).to(memory_format=torch.channels_last)
            feats[name] = tuple(extract_features(enc, split, cfg.augment, indices=idx,
                                                 progress=bar.update, **kw)
                                for split, idx in (train, test))
    return feats


def _warn_at_edge(result: dict, grid) -> None:
    for name in ("encoder", "random_init", "raw_pixels"):
        r = result.get(name)
        if r and r["l2_edge_rising"]:
            print(f"linear_eval: warning: the best L2 penalty for {name} ({r['l2']:g}) is at the "
                  f"edge of eval.l2_grid ({min(grid):g}..{max(grid):g}) and validation accuracy "
                  f"still rises there beyond its noise: widen the grid", file=sys.stderr)


def _print_table(r: dict, out: Path | None) -> None:
    from rich.table import Table

    g, headless = r.get("features") == "g", r.get("head") == "none"
    what = ("g(h) = h (no projection head)" if g and headless
            else "g(h), the projection head's output" if g else "h, the encoder's output")
    t = Table(title=f"Linear evaluation of {what} on '{r['eval_split']}' "
              f"({r['eval_count']} images, {r['precision']} features)")
    for col in ("features", "dim", "top-1", "top-5", "L2"):
        t.add_column(col, justify="right")
    net = "encoder + head" if g and not headless else "encoder"
    rows = [(f"SimCLR {net} (frozen)", r["encoder"])]
    if "random_init" in r:
        rows.append((f"random-init {net} (baseline)", r["random_init"]))
    if "raw_pixels" in r:
        rows.append(("raw pixels (baseline)", r["raw_pixels"]))
    for name, m in rows:
        t.add_row(name, str(m["feature_dim"]), f"{100 * m['top1']:.2f}%",
                  f"{100 * m['top5']:.2f}%", f"{m['l2']:g}")
    tables = [t]
    p = r.get("pretraining")
    if p:
        t = Table(title="Run")
        for col in ("steps", "epochs", "processes", "images/s", "pretrain", "evaluation", "loader"):
            t.add_column(col, justify="right")
        t.add_row(str(p["steps"]), f"{p['epochs']:.1f}", f"{p['world']} x {p['device']}",
                  f"{p['images_per_s']:.0f}", f"{p['wall_s']:.0f} s", f"{r['wall_s']:.0f} s",
                  p["backend"])
        tables.append(t)
    print_report(tables, [f"results: {out}" if out else "results: not saved (see the error)"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("linear_eval", lambda: evaluate(args), out_option="--json")


if __name__ == "__main__":
    sys.exit(main())
