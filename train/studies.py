"""The paper's ablation studies as grids of cells (`tools.study` is their command line).

Each study is a list of `Cell`s: config overrides of one recipe; every cell pretrains with the same
seed for the same budget (`train.cells`), then gets its kNN top-1, contrastive accuracy and a
linear probe. A study directory holds:

    plan.json            the study, its settings and every cell's overrides (a rerun must match)
    cells/NN-name/       the cell's run (run/), its pretraining log and row.json once it ended
    study.json           every finished row, the paper's finding and ours (`merge`)

`run_study` runs the cells not yet finished, one after another (or one, `only`), writing each
row atomically when its cell ends; a killed study run again keeps its finished cells and resumes
the interrupted one's pretraining from its last checkpoint (`train.cells.pretrain`). `merge`
reads whatever rows exist, so `--cell I` jobs on a cluster and one `report` give the study.

The studies (Chen et al., 2020): augment-pairs (Sec. 3.1, Fig. 5), colour-strength (Sec. 3.2,
Table 1), head (Sec. 4.2, Fig. 8 and Table 3's h vs g(h)), loss (Sec. 5.1, Tables 2 and 4),
temperature (Sec. 5.1, Table 5) and batch-size (Sec. 5.2, Fig. 9). The figures are described by
`figure_data` (pure data, drawn by tools.study and stored in the PNG beside the picture).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from train.atomic import fault_point, write_atomic
from train.cells import (
    Budget,
    CellFailed,
    PretrainJob,
    budget_warning,
    cell_row,
    network_features,
    pretrain,
    probe_eval_count,
    probe_run,
    probe_top1,
)
from train.linear_eval import accuracy_margin

PLAN, STUDY_JSON, ROW, BASELINE = "plan.json", "study.json", "row.json", "baseline.json"
# the paper's seven operations of Fig. 5, in its order
OPS = ("crop", "cutout", "colour", "sobel", "noise", "blur", "rotate")
OP_LABELS = {"crop": "Crop", "cutout": "Cutout", "colour": "Colour", "sobel": "Sobel",
             "noise": "Noise", "blur": "Blur", "rotate": "Rotate"}
# the ops a recipe's base view must not apply in the augment-pairs study (the identity branch)
_OFF = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "rotate_p", "sobel_p", "noise_p",
        "cutout_p")


class StudyError(ValueError):
    """A study that cannot run as asked; one line naming the fix."""


@dataclass(frozen=True)
class Cell:
    index: int
    name: str
    settings: dict  # what this cell varies, for the table and the figure
    overrides: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"

    def plan(self) -> dict:
        return {"cell": self.index, "name": self.name, "settings": self.settings,
                "overrides": list(self.overrides)}


def _num(x: float) -> str:
    return repr(float(x))


def _pair(v) -> str:
    return f"[{_num(v[0])}, {_num(v[1])}]"


# ---------------------------------------------------------------- the grids

def augment_pairs_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Fig. 5: both branches see the whole image resized (the identity; the paper crops both
    first, to bring ImageNet's sizes to one), and ONE branch (view 2) gets the targeted
    operation(s): op i then op j on the upper triangle (i < j), op i alone on the diagonal. The
    renderers apply the operations in one fixed order (pipelines/spec.py), so (i, j) and (j, i) are
    the same views: 28 cells, the heatmap mirrored."""
    a = cfg.augment
    if a.view1.items() or a.view2.items():
        raise StudyError("the recipe sets augment.view1/view2 overrides, which augment-pairs sets "
                         "itself: use a recipe without them")
    base = ["--augment.crop_area=[1.0, 1.0]", "--augment.crop_ratio=[1.0, 1.0]",
            *[f"--augment.{k}=0.0" for k in _OFF]]
    v = "--augment.view2."
    op = {"crop": [f"{v}crop_area={_pair(a.crop_area)}", f"{v}crop_ratio={_pair(a.crop_ratio)}"],
          "cutout": [f"{v}cutout_p=1.0"],
          "colour": [f"{v}jitter_p={_num(a.jitter_p or 0.8)}",
                     f"{v}grayscale_p={_num(a.grayscale_p or 0.2)}"],
          "sobel": [f"{v}sobel_p=1.0"], "noise": [f"{v}noise_p=1.0"],
          "blur": [f"{v}blur_p=1.0"], "rotate": [f"{v}rotate_p=1.0"]}
    cells = []
    for i, first in enumerate(OPS):
        for second in OPS[i:]:
            ops = [first] if first == second else [first, second]
            over = base + [o for name in ops for o in op[name]]
            cells.append(Cell(len(cells), "+".join(ops), {"ops": ops}, tuple(over)))
    return cells


def colour_strength_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Table 1: colour jitter of strength 1/8 .. 1 (brightness, contrast, saturation 0.8 s, hue
    0.2 s), then strength 1 with blur; both views as the recipe draws them otherwise."""
    grid = [(s, False) for s in (0.125, 0.25, 0.5, 1.0)] + [(1.0, True)]
    return [Cell(i, f"s{s:g}" + ("+blur" if blur else ""), {"strength": s, "blur": blur},
                 (f"--augment.jitter_strength={_num(s)}",
                  f"--augment.blur_p={0.5 if blur else 0.0}"))
            for i, (s, blur) in enumerate(grid)]


def head_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Sec. 4.2: no head, a linear head, the non-linear head; each probed on h and on g(h)."""
    cells = []
    for layers, kind in ((0, "none"), (1, "linear"), (2, "non-linear")):
        over = [f"--model.head_layers={layers}"]
        if layers == 0:  # settings of a head that is not there
            over += ["--model.head_out_bn=false", "--model.head_hidden=0"]
        cells.append(Cell(len(cells), kind, {"head": kind, "head_layers": layers}, tuple(over)))
    return cells


LOSS_GRID = (("nt_xent", False), ("nt_logistic", False), ("margin_triplet", False),
             ("nt_logistic", True), ("margin_triplet", True))


def loss_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Table 4: NT-Xent, NT-Logistic and the margin triplet loss, the last two also with
    semi-hard negative mining; cosine similarity (l2-normalised projections), the recipe's
    temperature and margin."""
    return [Cell(i, name + ("-sh" if sh else ""), {"loss": name, "semi_hard": sh},
                 (f"--loss.name={name}", f"--loss.semi_hard={str(sh).lower()}",
                  "--loss.similarity=cosine"))
            for i, (name, sh) in enumerate(LOSS_GRID)]


TEMPERATURES = {"cosine": (0.05, 0.1, 0.5, 1.0), "dot": (1.0, 10.0, 100.0)}


def temperature_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Table 5: NT-Xent with l2 normalisation (cosine) at tau 0.05 .. 1 and without it (dot) at
    tau 1 .. 100 (raw dot products are far larger than cosines)."""
    cells = []
    for sim, taus in TEMPERATURES.items():
        for tau in taus:
            cells.append(Cell(len(cells), f"{sim}-t{tau:g}", {"similarity": sim,
                                                              "temperature": tau},
                              ("--loss.name=nt_xent", f"--loss.similarity={sim}",
                               f"--loss.temperature={_num(tau)}")))
    return cells


BATCHES = {"quick": (64, 128, 256, 512), "full": (256, 512, 1024, 2048, 4096)}


def batch_size_cells(cfg, quick: bool, micro_batch: int) -> list[Cell]:
    """Fig. 9: the global batch (the learning rate scaled by the recipe's rule); a batch above
    `micro_batch` (when set) is forwarded in chunks of that many images (train.micro_batch:
    the same step in less memory)."""
    cells = []
    for b in BATCHES["quick" if quick else "full"]:
        over = [f"--data.batch_size={b}"]
        if micro_batch and b > micro_batch:
            over.append(f"--train.micro_batch={micro_batch}")
        cells.append(Cell(len(cells), f"b{b}", {"batch_size": b}, tuple(over)))
    return cells


# ---------------------------------------------------------------- our findings

def score(row: dict | None) -> float | None:
    """The figure a study compares: linear top-1, else kNN top-1 (None: no result)."""
    if not row or row.get("status") != "done":
        return None
    for key in ("linear_top1", "knn_top1"):
        if row.get(key) is not None:
            return float(row[key])
    return None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _find(rows: list[dict], **settings) -> dict | None:
    return next((r for r in rows if all(r["settings"].get(k) == v for k, v in settings.items())),
                None)


def noise(*rows: dict | None) -> float:
    """Two standard errors of the difference of the rows' linear top-1 (the probe's sampling
    noise: each accuracy a binomial share of its `linear_n` evaluation images); 0 when a row does
    not say how many images it scored. Seed-to-seed noise of the pretraining comes on top."""
    scored = [(score(r), (r or {}).get("linear_n")) for r in rows]
    if any(p is None or not n for p, n in scored):
        return 0.0
    return accuracy_margin(*scored)


def _beyond(diff: float, margin: float, text: str) -> tuple[str, bool | None]:
    """A claim that holds when `diff` > 0, undecided when |diff| is within `margin`."""
    if abs(diff) <= margin:
        return f"{text}: within the probe's noise ({_pts(margin).replace('+', '+-')})", None
    return text, diff > 0


def _verdict(claims: list[tuple[str, bool | None]]) -> tuple[list[str], bool | None]:
    lines, known = [], [ok for _, ok in claims if ok is not None]
    for text, ok in claims:
        lines.append(f"{'agrees' if ok else 'differs' if ok is not None else 'unclear'}: {text}")
    return lines, (all(known) if known else None)


def augment_pairs_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    done = [r for r in rows if score(r) is not None]
    single = {r["settings"]["ops"][0]: r for r in done if len(r["settings"]["ops"]) == 1}
    pairs = {tuple(r["settings"]["ops"]): r for r in done if len(r["settings"]["ops"]) == 2}
    if not single or not pairs:
        return _verdict([("too few cells to compare", None)])
    bs = max(single, key=lambda k: score(single[k]))
    bp = max(pairs, key=lambda k: score(pairs[k]))
    s, p = score(single[bs]), score(pairs[bp])
    claims = [_beyond(p - s, noise(single[bs], pairs[bp]),
                      f"best single operation {bs} {_pct(s)}, best pair {' + '.join(bp)} "
                      f"{_pct(p)} ({_pts(p - s)})")]
    cc_row = pairs.get(("crop", "colour"))
    if cc_row is None:
        claims.append(("crop + colour has not run", None))
    elif bp == ("crop", "colour"):
        claims.append((f"crop + colour {_pct(p)} is the best of {len(pairs)} pairs", True))
    else:
        cc = score(cc_row)
        rank = sorted((score(r) for r in pairs.values()), reverse=True).index(cc) + 1
        claims.append(_beyond(cc - p, noise(cc_row, pairs[bp]),
                              f"crop + colour {_pct(cc)} is pair {rank} of {len(pairs)}; "
                              f"{' + '.join(bp)} beats it by {_pts(p - cc)}"))
    return _verdict(claims)


def colour_strength_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    plain = sorted(((r["settings"]["strength"], score(r), r) for r in rows
                    if not r["settings"]["blur"] and score(r) is not None), key=lambda c: c[0])
    blur = score(_find(rows, strength=1.0, blur=True))
    if len(plain) < 2:
        return _verdict([("too few cells to compare", None)])
    seq = ", ".join(f"{s:g}: {_pct(v)}" for s, v, _ in plain)
    (lo, vlo, rlo), (hi, vhi, rhi) = plain[0], plain[-1]
    claims = [_beyond(vhi - vlo, noise(rlo, rhi),
                      f"strength {seq}; {hi:g} vs {lo:g}: {_pts(vhi - vlo)}")]
    if blur is not None:
        claims.append((f"strength 1 with blur {_pct(blur)} ({_pts(blur - vhi)} over without)",
                       None))
    return _verdict(claims)


def head_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    get = {r["settings"]["head"]: r for r in rows if score(r) is not None}
    h = {k: r.get("linear_top1") for k, r in get.items()}
    claims = []
    nl = h.get("non-linear")
    for other, paper in (("linear", "+3%"), ("none", ">10%")):
        if nl is not None and h.get(other) is not None:
            claims.append(_beyond(nl - h[other], noise(get["non-linear"], get[other]),
                                  f"non-linear {_pct(nl)} vs {other} {_pct(h[other])}: "
                                  f"{_pts(nl - h[other])} (paper {paper})"))
    for kind in ("linear", "non-linear"):
        g = get.get(kind, {}).get("linear_top1_g")
        if h.get(kind) is not None and g is not None:
            as_g = {**get[kind], "linear_top1": g}  # g(h) scored on the same images
            claims.append(_beyond(h[kind] - g, noise(get[kind], as_g),
                                  f"{kind} head: h {_pct(h[kind])} vs g(h) {_pct(g)}: "
                                  f"{_pts(h[kind] - g)}"))
    return _verdict(claims or [("too few cells to compare", None)])


def loss_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    got = {(r["settings"]["loss"], r["settings"]["semi_hard"]): r for r in rows
           if score(r) is not None}
    ntx = got.get(("nt_xent", False))
    if ntx is None or len(got) < 2:
        return _verdict([("too few cells to compare", None)])
    claims = []
    for (name, sh), r in got.items():
        if name != "nt_xent":
            claims.append(_beyond(score(ntx) - score(r), noise(ntx, r),
                                  f"NT-Xent {_pct(score(ntx))} vs {name}"
                                  f"{' (semi-hard)' if sh else ''} {_pct(score(r))}: "
                                  f"{_pts(score(ntx) - score(r))}"))
    return _verdict(claims)


def temperature_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    claims = []
    cos = sorted(((r["settings"]["temperature"], score(r), r.get("contrastive_acc"), r)
                  for r in rows if r["settings"]["similarity"] == "cosine"
                  and score(r) is not None), key=lambda c: c[0])
    dot = [r for r in rows if r["settings"]["similarity"] == "dot" and score(r) is not None]
    if cos:
        best_t, best_v, _, best_r = max(cos, key=lambda c: c[1])
        claims.append((f"with l2 normalisation the best tau is {best_t:g} ({_pct(best_v)}; "
                       f"paper: 0.1-0.5)", 0.1 <= best_t <= 0.5))
        if dot:
            best_dot = max(dot, key=score)
            claims.append(_beyond(best_v - score(best_dot), noise(best_r, best_dot),
                                  f"with normalisation {_pct(best_v)} vs without "
                                  f"{_pct(score(best_dot))}: {_pts(best_v - score(best_dot))}"))
        accs = [(t, a) for t, _, a, _ in cos if a is not None]
        if len(accs) >= 2:
            rising = all(a1 >= a2 for (_, a1), (_, a2) in zip(accs, accs[1:]))
            claims.append(("contrastive accuracy as tau falls: "
                           + ", ".join(f"{t:g}: {_pct(a)}" for t, a in accs)
                           + ("" if rising else " (not monotone)"), rising))
            claims.append((f"the lowest tau {accs[0][0]:g} is not the best linear one "
                           f"({best_t:g})", best_t != accs[0][0]))
    return _verdict(claims or [("too few cells to compare", None)])


def batch_size_ours(rows: list[dict]) -> tuple[list[str], bool | None]:
    got = sorted((r["settings"]["batch_size"], score(r)) for r in rows if score(r) is not None)
    if len(got) < 2:
        return _verdict([("too few cells to compare", None)])
    best = max(got, key=lambda g: g[1])
    seq = ", ".join(f"{b}: {_pct(v)}" for b, v in got)
    return _verdict([(f"batch {seq}; the best is {best[0]}", best[0] == got[-1][0])])


# ---------------------------------------------------------------- figures (data)

def _series(rows, x_key, y_key, where=None, transform=float):
    pts = sorted((r["settings"][x_key], r.get(y_key)) for r in rows
                 if r.get("status") == "done" and (where is None or where(r)))
    return {"x": [transform(x) for x, _ in pts], "y": [y for _, y in pts]}


def augment_pairs_figure(rows: list[dict]) -> dict:
    """The heatmap of Fig. 5: linear top-1 by first (row) and second (column) operation, the
    diagonal one operation alone, mirrored (the order is fixed), each row's mean beside it."""
    n = len(OPS)
    values: list[list[float | None]] = [[None] * n for _ in range(n)]
    for r in rows:
        ops = r["settings"]["ops"]
        i, j = OPS.index(ops[0]), OPS.index(ops[-1])
        values[i][j] = values[j][i] = score(r)
    means = []
    for line in values:
        known = [v for v in line if v is not None]
        means.append(sum(known) / len(known) if known else None)
    return {"kind": "heatmap", "metric": "linear_top1", "labels": [OP_LABELS[o] for o in OPS],
            "values": values, "row_mean": means,
            "title": "linear top-1 (%): 1st transformation (row), 2nd (column)"}


def colour_strength_figure(rows: list[dict]) -> dict:
    no_blur = lambda r: not r["settings"]["blur"]  # noqa: E731
    blur = lambda r: r["settings"]["blur"]  # noqa: E731
    return {"kind": "lines", "panels": [{
        "title": "colour distortion strength", "xlabel": "jitter strength s",
        "ylabel": "top-1 (%)", "xscale": "log",
        "series": {"linear": _series(rows, "strength", "linear_top1", no_blur),
                   "kNN": _series(rows, "strength", "knn_top1", no_blur),
                   "linear, with blur": _series(rows, "strength", "linear_top1", blur)}}]}


def head_figure(rows: list[dict]) -> dict:
    order = ["none", "linear", "non-linear"]
    done = {r["settings"]["head"]: r for r in rows if r.get("status") == "done"}
    kinds = [k for k in order if k in done]
    return {"kind": "bars", "panels": [{
        "title": "projection head", "xlabel": "head", "ylabel": "linear top-1 (%)",
        "series": {"h": {"x": kinds, "y": [done[k].get("linear_top1") for k in kinds]},
                   "g(h)": {"x": kinds, "y": [done[k].get("linear_top1_g") for k in kinds]}}}]}


def loss_figure(rows: list[dict]) -> dict:
    done = [r for r in rows if r.get("status") == "done"]
    names = [r["name"] for r in done]
    return {"kind": "bars", "panels": [{
        "title": "contrastive loss", "xlabel": "loss", "ylabel": "top-1 (%)",
        "series": {"linear": {"x": names, "y": [r.get("linear_top1") for r in done]},
                   "kNN": {"x": names, "y": [r.get("knn_top1") for r in done]}}}]}


def temperature_figure(rows: list[dict]) -> dict:
    def sim(s):
        return lambda r: r["settings"]["similarity"] == s

    return {"kind": "lines", "panels": [
        {"title": "linear top-1", "xlabel": "temperature", "ylabel": "top-1 (%)",
         "xscale": "log",
         "series": {f"linear, {s}": _series(rows, "temperature", "linear_top1", sim(s))
                    for s in TEMPERATURES}},
        {"title": "contrastive accuracy", "xlabel": "temperature",
         "ylabel": "contrastive accuracy (%)", "xscale": "log",
         "series": {f"contrastive, {s}": _series(rows, "temperature", "contrastive_acc", sim(s))
                    for s in TEMPERATURES}}]}


def batch_size_figure(rows: list[dict]) -> dict:
    return {"kind": "lines", "panels": [{
        "title": "batch size", "xlabel": "global batch", "ylabel": "top-1 (%)", "xscale": "log",
        "series": {"linear": _series(rows, "batch_size", "linear_top1"),
                   "kNN": _series(rows, "batch_size", "knn_top1")}}]}


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    reference: str
    paper: str  # the paper's finding, printed beside ours
    cells: Callable  # (cfg, quick, micro_batch) -> list[Cell]
    ours: Callable  # rows -> (lines, agrees)
    figure: Callable  # rows -> figure data
    quick_budget: float  # seconds of training per cell with --quick (2 CPU cores)
    features: tuple[str, ...] = ("h",)  # what the probe evaluates


STUDIES = {s.name: s for s in (
    Study("augment-pairs", "Composition of data augmentation operations", "Sec. 3.1, Fig. 5",
          "no single transformation suffices to learn good representations; crop + colour "
          "distortion is the strongest pair", augment_pairs_cells, augment_pairs_ours,
          augment_pairs_figure, quick_budget=45.0),
    Study("colour-strength", "Strength of colour distortion", "Sec. 3.2, Table 1",
          "stronger colour distortion helps SimCLR (unlike supervised training); blur adds a "
          "little more", colour_strength_cells, colour_strength_ours, colour_strength_figure,
          quick_budget=90.0),
    Study("head", "Projection head", "Sec. 4.2, Fig. 8, Table 3",
          "a non-linear head beats a linear one (+3%) and no head (>10%); the representation h "
          "before the head is better than g(h) (>10%)", head_cells, head_ours, head_figure,
          quick_budget=90.0, features=("h", "g")),
    Study("loss", "Contrastive loss functions", "Sec. 5.1, Tables 2 and 4",
          "NT-Xent beats NT-Logistic and the margin triplet loss, even with semi-hard negative "
          "mining; l2 normalisation (cosine) with a suitable temperature matters", loss_cells,
          loss_ours, loss_figure, quick_budget=100.0),
    Study("temperature", "Temperature and l2 normalisation", "Sec. 5.1, Table 5",
          "with l2 normalisation tau 0.1-0.5 is best and beats no normalisation; contrastive "
          "accuracy rises as tau falls but linear accuracy does not follow",
          temperature_cells, temperature_ours, temperature_figure, quick_budget=90.0),
    Study("batch-size", "Batch size", "Sec. 5.2, Fig. 9",
          "larger batches help, most in short training", batch_size_cells, batch_size_ours,
          batch_size_figure, quick_budget=90.0),
)}


# ---------------------------------------------------------------- running

@dataclass(frozen=True)
class Context:
    """What every cell of a study shares."""

    config: str  # the recipe's absolute path
    overrides: tuple[str, ...]  # every cell's (data path, --set, --quick's), before the cell's
    budget: Budget
    probe: tuple[int, int]
    features: tuple[str, ...] = ("h",)
    device_type: str = "cpu"
    threads: int = 1
    timeout: float | None = None


def run_cell(cell: Cell, cell_dir: Path, ctx: Context) -> dict:
    """Pretrain the cell (resuming an interrupted one), probe its final checkpoint: its figures."""
    from train.config import load_config

    overrides = (*ctx.overrides, *cell.overrides)
    batch = load_config(ctx.config, list(overrides)).data.batch_size
    job = PretrainJob(ctx.config, overrides, cell_dir / "run", ctx.budget, ctx.device_type,
                      ctx.threads, ctx.timeout)
    t0 = time.perf_counter()
    summary = pretrain(job, cell_dir / "pretrain.log")
    t1 = time.perf_counter()
    probe, n_eval = probe_run(cell_dir / "run", ctx.probe,
                              "cuda" if ctx.device_type == "cuda" else "cpu", ctx.features)
    t2 = time.perf_counter()
    row = cell_row(summary, ctx.budget, batch)
    row["linear_top1"] = probe.get("h")
    row["linear_n"] = n_eval  # the evaluation images the probe scored
    if "g" in probe:
        row["linear_top1_g"] = probe["g"]
    row.update(pretrain_wall_s=t1 - t0, probe_wall_s=t2 - t1, wall_s=t2 - t0,
               device=ctx.device_type, threads=ctx.threads, host=socket.gethostname())
    return row


def untrained_row(ctx: Context) -> dict:
    """The reference every cell is read against: the recipe's network as the cells start it (the
    recipe's seed, no training), through the cells' own evaluation: the kNN monitor's top-1
    (the same bank, the whole evaluation split) and the linear probe of h on `ctx.probe`."""
    import torch

    from model.simclr import build_simclr
    from pipelines.sources import open_dataset
    from train.config import load_config
    from train.features import knn_top1

    t0 = time.perf_counter()
    cfg = load_config(ctx.config, list(ctx.overrides))
    ds = open_dataset(cfg.data.path)
    train_split, eval_split = ds.split(cfg.data.train_split), ds.split(cfg.data.eval_split)
    device = "cuda" if ctx.device_type == "cuda" else "cpu"
    torch.manual_seed(cfg.train.seed)
    net = build_simclr(cfg.model).features("h").to(device)
    return {"name": "untrained", "status": "done",  # a row as a cell's, for score and noise
            "knn_top1": knn_top1(cfg, net, train_split, eval_split, device),
            "linear_top1": probe_top1(cfg, network_features(cfg, net, device), train_split,
                                      eval_split, ctx.probe, device),
            "linear_n": probe_eval_count(eval_split, ctx.probe),
            "wall_s": time.perf_counter() - t0}


def read_baseline(out: Path) -> dict | None:
    try:
        return json.loads((out / BASELINE).read_text())
    except (OSError, ValueError):
        return None


def plan_of(study: Study, cells: list[Cell], settings: dict) -> dict:
    return {"study": study.name, **settings, "cells": [c.plan() for c in cells]}


def write_plan(out: Path, plan: dict) -> None:
    """plan.json, or a one-line StudyError where `out` holds another study or other settings."""
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            keys = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise StudyError(f"'{out}' holds the study '{old.get('study')}' planned with other "
                             f"settings ({', '.join(keys)} differ): run it with the same "
                             f"settings to resume it, or pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(plan, indent=1) + "\n")


def read_plan(out: Path) -> dict:
    path = out / PLAN
    if not path.is_file():
        raise StudyError(f"'{out}' holds no study ({PLAN} missing): pass the --out folder of "
                         f"a study")
    return json.loads(path.read_text())


def cells_of(plan: dict) -> list[Cell]:
    return [Cell(c["cell"], c["name"], c["settings"], tuple(c["overrides"]))
            for c in plan["cells"]]


def read_row(out: Path, cell: Cell) -> dict | None:
    path = out / "cells" / cell.dirname / ROW
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_study(out: Path, plan: dict, runner: Callable[[Cell, Path], dict],
              only: int | None = None, say: Callable[[str], None] = print,
              baseline: Callable[[], dict] | None = None) -> list[dict]:
    """Run the plan's unfinished cells (or cell `only`), one after another; each row is written
    atomically when its cell ends (a failed cell's too, with its error: delete its row.json to
    try it again). First, when `baseline` is given and baseline.json is missing, the untrained
    reference (`untrained_row`), by a whole study or by cell 0 of an array job. Returns the rows
    written by this call."""
    write_plan(out, plan)
    if baseline is not None and only in (None, 0) and read_baseline(out) is None:
        say("study: the untrained network (the cells' initialisation), evaluated as a cell is")
        row = baseline()
        write_atomic(out / BASELINE, json.dumps(row, indent=1) + "\n")
        say(f"study: untrained: kNN {_pct(row.get('knn_top1'))}, linear "
            f"{_pct(row.get('linear_top1'))}")
    cells = cells_of(plan)
    if only is not None:
        if not 0 <= only < len(cells):
            raise StudyError(f"--cell {only}: the study '{plan['study']}' has cells 0..."
                             f"{len(cells) - 1}")
        cells = [cells[only]]
    done = [c.index for c in cells if read_row(out, c) is not None]
    if done:
        say(f"study: cells {', '.join(map(str, done))} finished earlier: kept")
    written = []
    for cell in cells:
        if cell.index in done:
            continue
        cell_dir = out / "cells" / cell.dirname
        cell_dir.mkdir(parents=True, exist_ok=True)
        say(f"study: cell {cell.index} of {len(plan['cells'])}: {cell.name} "
            f"({' '.join(cell.overrides)})")
        try:
            metrics = runner(cell, cell_dir)
            row = {**cell.plan(), "status": "done", **metrics}
        except CellFailed as e:
            row = {**cell.plan(), "status": "failed", "error": str(e)}
            say(f"study: cell {cell.index} ({cell.name}) failed: {e}")
        del row["overrides"]
        write_atomic(cell_dir / ROW, json.dumps(row, indent=1) + "\n")
        written.append(row)
        if row["status"] == "done":
            warn = budget_warning(f"cell {cell.index} ({cell.name})", row["budget"])
            if warn:
                say(f"study: warning: {warn}")
            say(f"study: cell {cell.index} ({cell.name}): kNN {_pct(row.get('knn_top1'))}, "
                f"linear {_pct(row.get('linear_top1'))}")
        fault_point("study_cell", len(written))  # tests: a kill after the n-th cell
    return written


def merge(out: Path) -> dict:
    """study.json's content from whatever rows `out` holds: the rows by cell, what is missing or
    failed, the paper's finding and ours."""
    plan = read_plan(out)
    study = STUDIES[plan["study"]]
    cells = cells_of(plan)
    rows = [r for r in (read_row(out, c) for c in cells) if r is not None]
    lines, agrees = study.ours(rows)
    settings = {k: v for k, v in plan.items() if k not in ("study", "cells")}
    base = read_baseline(out)
    return {"study": study.name, "title": study.title, "reference": study.reference,
            "paper": study.paper, "ours": lines, "agrees": agrees, "settings": settings,
            "untrained": base, "over_untrained": over_untrained(rows, base),
            "pace_warning": pace_spread(rows, plan.get("budget") or {}),
            "cells": len(cells), "done": sum(r["status"] == "done" for r in rows),
            "missing": [c.index for c in cells if read_row(out, c) is None],
            "failed": [r["cell"] for r in rows if r["status"] != "done"],
            "figure": study.figure(rows), "rows": rows}


def over_untrained(rows: list[dict], base: dict | None) -> str | None:
    """What pretraining bought: the best and the worst cell's linear top-1 against the untrained
    network's, with the probe's noise (None without the baseline or a finished cell)."""
    done = [r for r in rows if score(r) is not None and r.get("linear_top1") is not None]
    if not base or base.get("linear_top1") is None or not done:
        return None
    best, worst = max(done, key=score), min(done, key=score)
    b = base["linear_top1"]
    return (f"untrained network: kNN {_pct(base.get('knn_top1'))}, linear {_pct(b)}; the cells "
            f"span {_pts(score(worst) - b)} ({worst['name']}) to {_pts(score(best) - b)} "
            f"({best['name']}) over it (probe noise +-{100 * noise(best, base):.1f} points)")


PACE_SPREAD = 1.2  # cells' images/s further apart than this make equal time unequal work


def pace_spread(rows: list[dict], budget: dict) -> str | None:
    """A warning when a time-budgeted study's cells trained at paces more than PACE_SPREAD apart
    (a machine shared with other jobs, or cells that differ in cost): equal seconds were then
    unequal numbers of images (None otherwise)."""
    paces = [(r["images_per_s"], r["name"]) for r in rows
             if r.get("status") == "done" and r.get("images_per_s")]
    if not budget.get("seconds") or len(paces) < 2:
        return None
    (lo, slow), (hi, fast) = min(paces), max(paces)
    if hi <= PACE_SPREAD * lo:
        return None
    return (f"warning: the cells trained at {lo:.0f} ({slow}) to {hi:.0f} ({fast}) images/s, so "
            f"their equal seconds were up to {hi / lo:.2f}x unequal work: compare equal work "
            f"with --max-steps N or --epochs E")


def number(x) -> float:
    """A figure value as a float (None: NaN), for comparisons and pictures."""
    return math.nan if x is None else float(x)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
