"""The paper's ablation studies on this machine, or spread over a cluster.

    python -m tools.study NAME --data DS [--config RECIPE] --out DIR [--budget-s S | --epochs E]
                          [--quick] [--cell I] [--set KEY=VALUE ...]
    python -m tools.study report DIR

NAME: augment-pairs, colour-strength, head, loss, temperature, batch-size (train/studies.py
describes each grid). Every cell pretrains the recipe with its own overrides, the same seed and
the same budget, through `accelerate launch -m train.pretrain` (every local GPU, or one CPU
process with --threads threads), then gets the run's kNN top-1 and contrastive accuracy and a
linear probe of its final checkpoint. Cells run one after another; a rerun keeps the finished
ones and resumes an interrupted one's pretraining from its last checkpoint. `--cell I` runs
cell I only (a cluster's array job: one task per cell), and `report DIR` merges whatever cells
are done. Writes into DIR: study.json (one row per cell), study.md (the table and the findings)
and NAME.png (the paper's kind of figure; its plotted values ride in the PNG as the text chunk
`simclr-study`, JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from train.atomic import write_atomic
from train.cells import Budget, CellInterrupted
from train.cli import above, at_least
from train.config import ConfigError, load_config
from train.studies import (
    STUDIES,
    STUDY_JSON,
    Context,
    StudyError,
    default_threads,
    merge,
    number,
    plan_of,
    run_cell,
    run_study,
    untrained_row,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "train/configs/fashion_mnist_demo.yaml"
FIGURE_KEY = "simclr-study"  # the PNG text chunk holding the plotted values
# --quick on the demo recipe (2 CPU cores): smaller batches so a short budget takes a few hundred
# steps, a warm-up that fits in it, a smaller kNN bank and a probe on seeded subsets; the budget
# per cell is each study's `quick_budget`
QUICK = {"set": ["data.batch_size=128", "optim.warmup_epochs=0.05",
                 "train.knn_train_samples=2000"], "probe": (2000, 2000)}
COLUMNS = (("kNN", "knn_top1", "pct"), ("linear", "linear_top1", "pct"),
           ("linear g(h)", "linear_top1_g", "pct"), ("contrastive", "contrastive_acc", "pct"),
           ("img/s", "images_per_s", "{:.0f}"), ("train s", "train_s", "{:.1f}"),
           ("wall s", "wall_s", "{:.0f}"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.split("\n\n")[0],
                                epilog="--quick: " + ", ".join(QUICK["set"]) + f", probe on "
                                f"{QUICK['probe'][0]}/{QUICK['probe'][1]} images, each study's "
                                "own budget per cell (" + ", ".join(
                                    f"{s.name} {s.quick_budget:g} s" for s in STUDIES.values())
                                + "); options given explicitly override these.")
    p.add_argument("name", choices=[*STUDIES, "report"], metavar="NAME",
                   help=f"the study ({', '.join(STUDIES)}) or 'report'")
    p.add_argument("dir", nargs="?", type=Path, default=None, metavar="DIR",
                   help="report: the study's folder (its --out)")
    p.add_argument("--out", type=Path, default=None, help="the study's folder")
    p.add_argument("--data", default=None,
                   help="dataset directory from tools.convert (default: the recipe's data.path)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"the recipe every cell varies (default {DEFAULT_CONFIG})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--budget-s", type=above(0.0), default=None, metavar="S",
                        help="seconds of training per cell (default: the recipe's "
                             "train.time_budget_s, else its epochs)")
    length.add_argument("--epochs", type=at_least(1), default=None, metavar="E",
                        help="epochs per cell instead of a time budget")
    length.add_argument("--max-steps", type=at_least(1), default=None, metavar="N",
                        help="steps per cell instead of a time budget")
    p.add_argument("--quick", action="store_true", help="a small study for 2 CPU cores (below)")
    p.add_argument("--cell", type=at_least(0), default=None, metavar="I",
                   help="run cell I only (0-based; --list shows them), e.g. "
                        "--cell $SLURM_ARRAY_TASK_ID")
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where cells train and probe (default: cuda when available)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="CPU threads of each pretraining and probe (default: the usable cores)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="a config override for every cell, e.g. model.width=0.25 (repeatable)")
    p.add_argument("--probe-train", type=at_least(0), default=None, metavar="N",
                   help="train images of the linear probe, a seeded subset (default: all; 0: all)")
    p.add_argument("--probe-eval", type=at_least(0), default=None, metavar="N",
                   help="evaluation images of the linear probe (default: all; 0: all)")
    p.add_argument("--micro-batch", type=at_least(1), default=None, metavar="M",
                   help="batch-size: forward batches above M in chunks of M (train.micro_batch)")
    return p


# ---------------------------------------------------------------- settings

def settings(args) -> tuple[dict, list]:
    """(the plan's settings, the cells): every cell's config checked before any work."""
    from pipelines.sources import open_dataset

    study = STUDIES[args.name]
    if args.out is None:
        raise StudyError(f"{args.name}: pass --out DIR, the study's folder")
    q = QUICK if args.quick else {}
    sets = [*q.get("set", []), *(args.set or [])]
    bad = [x for x in sets if "=" not in x]
    if bad:
        raise StudyError(f"--set '{bad[0]}' is not KEY=VALUE: write e.g. --set model.width=0.25")
    config = str(Path(args.config).resolve())
    overrides = [f"--{x}" for x in sets]
    cfg = load_config(config, [*overrides, *([f"--data.path={args.data}"] if args.data else [])])
    open_dataset(cfg.data.path)  # one line when it is not a dataset
    data = str(Path(cfg.data.path).resolve())
    overrides += [f"--data.path={data}", "--train.knn_every=0", "--train.knn_every_s=0"]
    if args.budget_s or args.epochs or args.max_steps:
        budget = Budget(args.budget_s or 0.0, args.epochs or 0, args.max_steps or 0)
    elif args.quick:
        budget = Budget(study.quick_budget)
    else:
        budget = Budget(cfg.train.time_budget_s)
    cfg = load_config(config, overrides)
    cells = study.cells(cfg, args.quick, args.micro_batch or 0)
    for cell in cells:  # a bad key or value in any cell stops here, before the first one trains
        try:
            load_config(config, [*overrides, *budget.overrides(), *cell.overrides])
        except ConfigError as e:
            raise StudyError(f"cell {cell.index} ({cell.name}): {e}") from None
    probe = (args.probe_train if args.probe_train is not None else q.get("probe", (0, 0))[0],
             args.probe_eval if args.probe_eval is not None else q.get("probe", (0, 0))[1])
    return {"config": config, "data": data, "quick": args.quick,
            "budget": {"seconds": budget.seconds, "epochs": budget.epochs,
                       "max_steps": budget.max_steps, "describe": budget.describe()},
            "overrides": overrides, "probe": list(probe), "features": list(study.features),
            "micro_batch": args.micro_batch}, cells


def context(plan: dict, device_type: str, threads: int) -> Context:
    b = plan["budget"]
    budget = Budget(b["seconds"], b["epochs"], b["max_steps"])
    # a hung pretraining is stopped (its checkpoint kept) well after its budget
    timeout = 4 * budget.seconds + 1800 if budget.seconds else None
    return Context(plan["config"], tuple(plan["overrides"]), budget, tuple(plan["probe"]),
                   tuple(plan["features"]), device_type, threads, timeout)


# ---------------------------------------------------------------- report

def fmt(value, how: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{100 * value:.1f}%" if how == "pct" else how.format(value)


def table_lines(result: dict) -> list[str]:
    """The study as a markdown table, then the paper's finding and ours."""
    rows = result["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    head = ["cell", "settings", *[c[0] for c in cols], "budget", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r.get("budget") or {}
        budget = ("-" if b.get("ok") is None else
                  f"{100 * b['ratio']:.0f}%{'' if b['ok'] else ' (!)'}" if b.get("ratio")
                  else "unknown (!)")
        lines.append("| " + " | ".join([str(r["cell"]), r["name"],
                                        *[fmt(r.get(key), how) for _, key, how in cols],
                                        budget, r["status"]]) + " |")
    lines += ["", f"{result['title']} ({result['reference']}): {result['done']} of "
              f"{result['cells']} cells done"
              + (f"; missing {result['missing']}" if result["missing"] else "")
              + (f"; failed {result['failed']}" if result["failed"] else ""),
              f"paper: {result['paper']}"]
    lines += [result[k] for k in ("over_untrained", "pace_warning") if result.get(k)]
    lines += [f"ours:  {line}" for line in result["ours"]]
    verdict = {True: "ours agrees with the paper", False: "ours DIFFERS from the paper",
               None: "no conclusion yet (too few cells, or every difference is within the "
                     "probe's noise)"}[result["agrees"]]
    lines.append(f"=> {verdict}")
    return lines


def draw(figure: dict):
    """The figure described by `figure` (train.studies' figure data): a matplotlib Figure."""
    from tools.plot import pyplot

    plt = pyplot()
    if figure["kind"] == "heatmap":
        return _heatmap(plt, figure)
    panels = figure["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=100,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        series = panel["series"]
        if figure["kind"] == "bars":
            groups = list(dict.fromkeys(x for s in series.values() for x in s["x"]))
            width = 0.8 / max(1, len(series))
            for i, (name, s) in enumerate(series.items()):
                got = dict(zip(s["x"], s["y"], strict=True))
                kept = [(g, 100 * number(got[x])) for g, x in enumerate(groups)
                        if x in got and got[x] is not None]
                bars = ax.bar([g + (i - (len(series) - 1) / 2) * width for g, _ in kept],
                              [v for _, v in kept], width, label=name, color=f"C{i}")
                ax.bar_label(bars, fmt="%.1f", fontsize=8)
            ax.set_xticks(range(len(groups)), groups, rotation=20)
        else:
            for i, (name, s) in enumerate(series.items()):
                pts = [(x, 100 * number(y)) for x, y in zip(s["x"], s["y"], strict=True)
                       if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                            color=f"C{i}", label=name)
            if panel.get("xscale"):
                ax.set_xscale(panel["xscale"])
        ax.set_title(panel["title"])
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _heatmap(plt, figure: dict):
    import numpy as np

    labels = figure["labels"]
    n = len(labels)
    values = np.array([[100 * number(v) for v in row] for row in figure["values"]])
    means = np.array([[100 * number(v)] for v in figure["row_mean"]])
    fig = plt.figure(figsize=(8.4, 6.6), dpi=100)
    grid = fig.add_gridspec(1, 2, width_ratios=[n, 1.4], wspace=0.08)
    ax, mx = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    known = values[np.isfinite(values)]
    lo, hi = (known.min(), known.max()) if known.size else (0.0, 100.0)
    for axis, data in ((ax, values), (mx, means)):
        axis.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        for (i, j), v in np.ndenumerate(data):
            axis.text(j, i, "-" if not np.isfinite(v) else f"{v:.1f}", ha="center",
                      va="center", fontsize=8,
                      color="white" if np.isfinite(v) and v < (lo + hi) / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=30)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("2nd transformation")
    ax.set_ylabel("1st transformation")
    mx.set_xticks([0], ["row mean"])
    mx.set_yticks([])
    ax.set_title(figure["title"], fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.93)
    return fig


def save_figure(fig, path: Path, figure: dict) -> None:
    """The PNG, atomically, with the plotted values as its `simclr-study` text chunk (JSON)."""
    from tools.plot import pyplot

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi,
                metadata={"Software": "simclr-fast tools.study",
                          FIGURE_KEY: json.dumps(figure, allow_nan=False)})
    pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def report(out: Path, say=print) -> dict:
    """Merge the finished cells of the study in `out`: study.json, study.md, NAME.png."""
    result = merge(out)
    write_atomic(out / STUDY_JSON, json.dumps(result, indent=1) + "\n")
    lines = table_lines(result)
    write_atomic(out / "study.md", f"# {result['title']}\n\n" + "\n".join(lines) + "\n")
    png = out / f"{result['study']}.png"
    if result["done"]:
        save_figure(draw(result["figure"]), png, result["figure"])
    for line in lines:
        say(line)
    say(f"wrote {out / STUDY_JSON}, {out / 'study.md'}" + (f", {png}" if result["done"] else ""))
    return result


# ---------------------------------------------------------------- the command

def main(argv: list[str] | None = None, runner=None, baseline=None) -> int:
    """`runner(cell, cell_dir, ctx)` runs one cell (tests pass their own; default run_cell);
    `baseline(ctx)` evaluates the untrained network (default untrained_row, none with a
    runner given)."""
    args = build_parser().parse_args(argv)
    try:
        if args.name == "report":
            out = args.dir or args.out
            if out is None:
                raise StudyError("report: pass the study's folder: python -m tools.study report "
                                 "DIR")
            report(out)
            return 0
        if args.dir is not None:
            raise StudyError(f"unexpected '{args.dir}': a study's folder is --out DIR")
        plan_settings, cells = settings(args)
        args.out = args.out.resolve()  # the pretraining runs in the repository
        if args.list:
            for c in cells:
                print(f"{c.index:3d}  {c.name:<20} {' '.join(c.overrides)}")
            return 0
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise StudyError("--device cuda but CUDA is not available: run with --device cpu")
        threads = args.threads or default_threads()
        torch.set_num_threads(threads)
        plan = plan_of(STUDIES[args.name], cells, plan_settings)
        ctx = context(plan, device, threads)
        run = runner or run_cell
        print(f"study {args.name}: {len(cells)} cells, {plan['budget']['describe']} each, on "
              f"{device} ({threads} threads), into {args.out}", flush=True)
        base = baseline or (None if runner else untrained_row)
        run_study(args.out, plan, lambda cell, cell_dir: run(cell, cell_dir, ctx),
                  only=args.cell, say=lambda s: print(s, flush=True),
                  baseline=(lambda: base(ctx)) if base else None)
        if args.cell is not None:
            print(f"cell {args.cell} done; merge the finished cells with: python -m tools.study "
                  f"report {args.out}")
            return 0
        report(args.out)
        return 0
    except CellInterrupted as e:
        print(f"study: stopped: {e}; the finished cells are kept", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("study: stopped (Ctrl-C): the finished cells are kept; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    except (StudyError, ConfigError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DatasetError, CheckpointError: one line naming the fix
        from pipelines.sources import DatasetError
        from train.checkpoint import CheckpointError

        if isinstance(e, (DatasetError, CheckpointError)):
            print(f"study: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
