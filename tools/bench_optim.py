"""Optimizer step time: our LARS against the per-parameter oracle, foreach SGD and peer LARS.

    python -m tools.bench_optim --device cpu --threads 2 --json bench_optim.json
    python -m tools.bench_optim --quick

Parameter sets are the full tensor lists of torchvision ResNets (ResNet-18: 62 tensors, ResNet-50:
161), split by :func:`train.lars.lars_param_groups`, with fixed random gradients. Every
implementation gets its own copy and the same groups; in each round every implementation takes one
timed step, in rotating order, so load from other processes hits all of them alike. Reported per
implementation, after warm-up steps: the median over rounds (metric "step_ms") and the fastest
round ("step_ms_min", the less noisy one on a shared machine). The first warm-up step is reported
apart ("first_step_ms"): on the CPU, lars pays numba's compilation there the first time (numba
caches kernels in train/__pycache__; NUMBA_CACHE_DIR pointing to a new folder shows the cold cost).

Implementations:
    lars               train.lars.LARS (numba kernels on the CPU, foreach ops on CUDA)
    lars_reference     train.lars.LARSReference, the per-parameter oracle
    sgd_foreach        torch.optim.SGD(momentum=0.9, foreach=True), same weight-decay groups: the
                       baseline of every ratio (the same passes over memory minus the trust ratio)
    sgd_foreach_nowd   the same without weight decay: the memory-traffic floor of a momentum step
    timm_lars          timm.optim.Lars, when timm can be imported
    lightly_lars       lightly.utils.lars.LARS, when lightly can be imported

timm and lightly are optional. Both are pure Python, so unpacked wheels on PYTHONPATH are enough,
with no second copy of torch:
    python -m pip download --no-deps timm lightly -d /tmp/peers
    (cd /tmp/peers && for w in *.whl; do unzip -qo "$w" -d "${w%%-*}"; done)
    PYTHONPATH=/tmp/peers/timm:/tmp/peers/lightly python -m tools.bench_optim
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from tools import benchmark
from train.cli import at_least
from train.lars import LARS, LARSReference, lars_param_groups

BASELINE = "sgd_foreach"
PEERS = ("timm_lars", "lightly_lars")
LR, MOMENTUM, WEIGHT_DECAY, ETA = 0.1, 0.9, 1e-6, 1e-3


def build_parser():
    p = benchmark.parser(
        "bench_optim",
        "Time one optimizer step of LARS (ours, the per-parameter reference, timm, lightly) and "
        "torch's foreach SGD on ResNet parameter sets; print a table, optionally write JSON.",
        device="where the parameters live",
        quick="few rounds (finishes in under a minute on 2 CPU cores)")
    p.add_argument("--models", default="resnet18,resnet50",
                   help="comma-separated torchvision model names (default: resnet18,resnet50)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch intra-op threads on CPU (default: torch's current setting)")
    p.add_argument("--rounds", type=at_least(1), default=None,
                   help="timed rounds per case (default: 30, or 3 with --quick)")
    p.add_argument("--warmup", type=at_least(0), default=None,
                   help="untimed steps per implementation first (default: 5, or 1 with --quick)")
    return p


# ---------------------------------------------------------------- implementations

def _peer_status() -> dict[str, str]:
    """Version string of each peer package, or why it cannot be used."""
    out = {}
    for impl, module, attr in (("timm_lars", "timm.optim", "Lars"),
                               ("lightly_lars", "lightly.utils.lars", "LARS")):
        try:
            mod = importlib.import_module(module)
            getattr(mod, attr)
            top = importlib.import_module(module.split(".")[0])
            out[impl] = str(getattr(top, "__version__", "unknown version"))
        except ImportError:
            out[impl] = "not installed"
        except Exception as exc:  # a broken install must not stop the benchmark
            out[impl] = f"unusable: {type(exc).__name__}: {exc}"
    return out


def _factories(peers: dict[str, str]) -> dict[str, Callable[[list[dict]], torch.optim.Optimizer]]:
    f: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
        "lars": lambda g: LARS(g, lr=LR, momentum=MOMENTUM, eta=ETA),
        "lars_reference": lambda g: LARSReference(g, lr=LR, momentum=MOMENTUM, eta=ETA),
        "sgd_foreach": lambda g: torch.optim.SGD(g, lr=LR, momentum=MOMENTUM, foreach=True),
        "sgd_foreach_nowd": lambda g: torch.optim.SGD(
            [{**x, "weight_decay": 0.0} for x in g], lr=LR, momentum=MOMENTUM, foreach=True),
    }
    # peers adapt exactly the groups with weight_decay != 0, like the SimCLR exclusion
    if not peers["timm_lars"].startswith(("not installed", "unusable")):
        from timm.optim import Lars
        f["timm_lars"] = lambda g: Lars(_strip(g), lr=LR, momentum=MOMENTUM, trust_coeff=ETA)
    if not peers["lightly_lars"].startswith(("not installed", "unusable")):
        from lightly.utils.lars import LARS as LightlyLARS
        f["lightly_lars"] = lambda g: LightlyLARS(_strip(g), lr=LR, momentum=MOMENTUM,
                                                  trust_coefficient=ETA)
    return f


def _strip(groups: list[dict]) -> list[dict]:
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]


# ---------------------------------------------------------------- timing

def _param_set(model_name: str, device: torch.device
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)()
    params = [p.detach().to(device) for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(device) for p in params]
    groups = lars_param_groups(model, WEIGHT_DECAY)
    excluded_ids = {id(p) for g in groups if g["lars_exclude"] for p in g["params"]}
    excluded = [id(p) in excluded_ids for p in model.parameters()]
    return params, grads, excluded


def _instance(params, grads, excluded, factory) -> torch.optim.Optimizer:
    copies = [p.clone().requires_grad_() for p in params]
    for c, g in zip(copies, grads, strict=True):
        c.grad = g.clone()
    groups = [
        {"params": [c for c, e in zip(copies, excluded, strict=True) if not e],
         "weight_decay": WEIGHT_DECAY, "lars_exclude": False},
        {"params": [c for c, e in zip(copies, excluded, strict=True) if e],
         "weight_decay": 0.0, "lars_exclude": True},
    ]
    return factory(groups)


def _time_case(params, grads, excluded, factories, device, rounds, warmup
               ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Step times in ms per implementation, and the time of each one's first (warm-up) step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opts = {name: _instance(params, grads, excluded, make) for name, make in factories.items()}
    first: dict[str, float] = {}
    for name, opt in opts.items():
        for i in range(warmup):
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i == 0:
                first[name] = (time.perf_counter() - t0) * 1e3
    samples: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            opts[name].step()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples, first


# ---------------------------------------------------------------- report

def _results(case: str, metric: str, values: dict[str, float]) -> list[dict[str, Any]]:
    rows = benchmark.rows(case, metric, values, BASELINE)
    for peer in PEERS:  # ours against each peer, as extra rows with that peer as the baseline
        if peer in values:
            rows.append(benchmark.row(case, "lars", metric, values["lars"], peer, values[peer]))
    return rows


def _print_table(case: str, info: str, rows: list[dict[str, Any]]) -> None:
    benchmark.print_table(rows, [("median ms", "step_ms", "{:.2f}", "value"),
                                 ("min ms", "step_ms_min", "{:.2f}", "value"),
                                 ("first ms", "first_step_ms", "{:.0f}", "value"),
                                 (f"x {BASELINE}", "step_ms", "{:.2f}", "ratio")],
                          f"{case}  ({info})")
    for r in rows:
        if r["metric"] == "step_ms" and r["baseline"] in PEERS:
            print(f"lars vs {r['baseline']}: {1 / r['ratio']:.2f}x its speed (median step)")
    print("(the ratio column uses medians)")


def headline(report: dict) -> str:
    """gpu_check's line for this report: per case, LARS's median step, against foreach SGD and
    against the per-parameter form. KeyError for a key, metric or row the report lacks."""
    rows = benchmark.by_key(report, "step_ms")
    out = []
    for (case, impl, metric), row in rows.items():
        if (impl, metric) == ("lars", "step_ms"):
            ref = rows[(case, "lars_reference", "step_ms")]
            speed = (f", {ref['value'] / row['value']:.1f}x the per-parameter form"
                     if row["value"] else "")
            out.append(f"{case}: {row['value']:.2f} ms ({row['ratio']:.2f}x foreach SGD{speed})")
    if not out:
        raise KeyError("no 'lars' rows of metric 'step_ms'")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = benchmark.pick_device(args.device, "bench_optim")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    import torchvision

    unknown = [m for m in models if not hasattr(torchvision.models, m)]
    if unknown or not models:
        print(f"bench_optim: error: unknown torchvision model(s) {unknown or models}: choose "
              "among torchvision.models' names, e.g. resnet18,resnet50", file=sys.stderr)
        return 2

    peers = _peer_status()
    factories = _factories(peers)
    cases: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    for name in models:
        params, grads, excluded = _param_set(name, device)
        info = (f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M params, "
                f"{sum(excluded)} excluded")
        cases[name] = {"tensors": len(params), "params": sum(p.numel() for p in params),
                       "excluded_tensors": sum(excluded)}
        samples, first = _time_case(params, grads, excluded, factories, device, rounds, warmup)
        del params, grads
        times = {k: statistics.median(v) for k, v in samples.items()}
        best = {k: min(v) for k, v in samples.items()}
        rows = (_results(name, "step_ms", times) + _results(name, "step_ms_min", best)
                + benchmark.rows(name, "first_step_ms", first, BASELINE))
        _print_table(name, info, rows)
        print(flush=True)
        results += rows

    settings = {
        "device": device.type, "quick": args.quick, "models": models, "cases": cases,
        "threads": torch.get_num_threads(), "rounds": rounds, "warmup": warmup,
        "statistic": "step_ms: median over rounds of one step; step_ms_min: fastest round; "
                     "implementations interleaved per round",
        "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "eta": ETA,
        "grads": "fixed N(0, 1e-2^2), seed 1", "baseline": BASELINE,
        "lars_path": "numba kernel on CPU float32/64, foreach ops elsewhere (chosen by LARS)",
        "peers": {p: peers[p] for p in PEERS},
    }
    benchmark.write_json(args.json, benchmark.report(device, settings, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
