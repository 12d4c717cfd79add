"""Pictures of a pretraining run's curves and evaluations.

    python -m tools.plot RUN_DIR [--out DIR]

Writes into DIR (default RUN_DIR/plots/):
  training.png    loss, learning rate, images/s and data-wait share against the step (the step
                  records of RUN_DIR/log.jsonl), and kNN top-1 when the run evaluated it
  evaluation.png  when RUN_DIR/linear_eval.json (train.linear_eval) or fine-tuning results
                  RUN_DIR/finetune/<tag>/finetune.json exist: linear top-1/top-5 of the encoder
                  beside its baselines, fine-tuned top-1 of the pretrained encoder beside one
                  trained from scratch, per tag
Panels without data are left out. Log lines that are not JSON (a run killed mid-write) are
skipped with a warning; where a resumed run logged a step again, its last record is drawn.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from pipelines.sources import show_path
from train.atomic import write_atomic
from train.commands import run_command

LOG = "log.jsonl"
# step-record key -> (panel title, scale to the drawn unit)
STEP_PANELS = {"loss": ("loss", 1.0), "lr": ("learning rate", 1.0),
               "images_per_s": ("images/s", 1.0), "data_wait_frac": ("data-wait share (%)", 100.0)}
KNN_PANEL = "kNN top-1 (%)"
LINEAR = {"encoder": "SimCLR encoder", "random_init": "random-init encoder",
          "raw_pixels": "raw pixels"}


class NotARun(ValueError):
    """RUN_DIR holds nothing to draw; the message says what to pass."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a run directory written by train.pretrain")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder of the PNGs (default RUN_DIR/plots)")
    return p


def pyplot():
    """matplotlib.pyplot on the Agg backend: pictures are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """The figure as a PNG at `path`, written atomically (never a half-written picture)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- reading

def read_log(path: Path) -> tuple[list[dict], int]:
    """(the records of a log.jsonl, the number of lines that are not a JSON object)."""
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(r, dict):
            records.append(r)
        else:
            bad += 1
    return records, bad


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curves(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Panel title -> (steps, values), only the panels with data, in drawing order."""
    by_step = {}
    for r in records:  # a resumed run logs the steps after its checkpoint again: the last wins
        if "event" not in r and _number(r.get("step")):
            by_step[int(r["step"])] = r
    knn = {}
    for r in records:
        if r.get("event") == "knn" and _number(r.get("step")) and _number(r.get("knn_top1")):
            knn[int(r["step"])] = 100.0 * r["knn_top1"]
    out = {}
    for key, (title, scale) in STEP_PANELS.items():
        points = [(s, scale * r[key]) for s, r in sorted(by_step.items()) if _number(r.get(key))]
        if points:
            out[title] = ([s for s, _ in points], [v for _, v in points])
    if knn:
        steps = sorted(knn)
        out[KNN_PANEL] = (steps, [knn[s] for s in steps])
    return out


def _read_json(path: Path, warn) -> dict | None:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warn(f"skipped '{show_path(path)}': {getattr(e, 'strerror', None) or e}")
        return None
    return r if isinstance(r, dict) else None


def linear_results(run_dir: Path, warn) -> dict[str, dict]:
    """Feature set -> {"top1", "top5"} of RUN_DIR/linear_eval.json (empty: none)."""
    path = run_dir / "linear_eval.json"
    r = _read_json(path, warn) if path.is_file() else None
    if not r:
        return {}
    return {name: {k: r[name][k] for k in ("top1", "top5") if _number(r[name].get(k))}
            for name in LINEAR if isinstance(r.get(name), dict)}


def finetune_results(run_dir: Path, warn) -> dict[str, dict]:
    """Tag -> {"label_fraction", "pretrained": {"top1", ...}, "scratch": {...} or absent} of
    RUN_DIR/finetune/<tag>/finetune.json (written by train.finetune), by tag."""
    out = {}
    for path in sorted((run_dir / "finetune").glob("*/finetune.json")):
        r = _read_json(path, warn)
        if r and _number((r.get("pretrained") or {}).get("top1")):
            out[path.parent.name] = r
    return out


# ---------------------------------------------------------------- drawing

def training_figure(panels: dict[str, tuple[list, list]]):
    """One panel a curve, against the step; panel titles are `curves`' keys."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 0.6), dpi=100,
                             sharex=True, squeeze=False)
    for ax, (title, (steps, values)) in zip(axes[:, 0], panels.items(), strict=True):
        ax.plot(steps, values, marker="o" if title == KNN_PANEL or len(steps) < 30 else None,
                markersize=3, color="C3" if title == KNN_PANEL else "C0")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.align_ylabels(axes[:, 0])
    fig.tight_layout()
    return fig


def evaluation_figure(linear: dict[str, dict], finetune: dict[str, dict]):
    """Bars of linear top-1/top-5 per feature set and of fine-tuned top-1 per tag."""
    plt = pyplot()
    n = bool(linear) + bool(finetune)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), dpi=100, squeeze=False)
    axes = list(axes[0])
    if linear:
        _bars(axes.pop(0), "linear evaluation", [LINEAR[k] for k in linear],
              {"top-1": [linear[k].get("top1") for k in linear],
               "top-5": [linear[k].get("top5") for k in linear]})
    if finetune:
        groups = [f"{tag}\n({r['label_fraction']:.0%} labels)" if _number(r.get("label_fraction"))
                  else tag for tag, r in finetune.items()]
        series = {"pretrained": [r["pretrained"]["top1"] for r in finetune.values()]}
        scratch = [(r.get("scratch") or {}).get("top1") for r in finetune.values()]
        if any(_number(v) for v in scratch):
            series["from scratch"] = scratch
        _bars(axes.pop(0), "fine-tuning (top-1)", groups, series)
    fig.tight_layout()
    return fig


def _bars(ax, title: str, groups: list[str], series: dict[str, list]) -> None:
    """Grouped bars in %, a series a colour; a missing value is no bar."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        kept = [(x, 100 * v) for x, v in zip(xs, values, strict=True) if _number(v)]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=name,
                      color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 120)  # room for the legend above bars near 100%
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(series))
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------- the command

def plot(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the run's pictures; their paths."""
    def warn(text: str) -> None:
        print(f"plot: warning: {text}", file=sys.stderr)

    log = run_dir / LOG
    if not log.is_file():
        raise NotARun(f"no '{show_path(log)}': pass a run directory written by train.pretrain")
    out = run_dir / "plots" if out is None else out
    records, bad = read_log(log)
    if bad:
        warn(f"skipped {bad} line(s) of '{show_path(log)}' that are not JSON records (a run "
             f"killed mid-write)")
    written = []
    panels = curves(records)
    if panels:
        written.append(out / "training.png")
        save_png(training_figure(panels), written[-1])
    linear, finetune = linear_results(run_dir, warn), finetune_results(run_dir, warn)
    if linear or finetune:
        written.append(out / "evaluation.png")
        save_png(evaluation_figure(linear, finetune), written[-1])
    if not written:
        raise NotARun(f"'{show_path(log)}' holds no step or kNN record yet and the run has no "
                      f"evaluation: plot it after train.pretrain has logged (train.log_every)")
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        for path in plot(args.run_dir, args.out):
            print(f"wrote {show_path(path)}")

    return run_command("plot", work, errors=(NotARun,))


if __name__ == "__main__":
    sys.exit(main())
