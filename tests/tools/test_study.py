"""tools.study: the grids (each cell a valid config; augment-pairs' views against the spec), a
killed study resumed with only the rest (an exception mid-cell and a SIGKILL after the second
cell), `--cell` runs plus `report` equal to the sequential study, the figures decoded from their
PNGs against study.json's rows, our findings against hand-made rows, the one-line errors, and
(slow) a real study of three tiny cells killed after its second and resumed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fashion_mnist import REPO
from tools import study as cli
from train.config import load_config
from train.studies import OPS, STUDIES, augment_pairs_ours, head_ours, temperature_ours

RECIPE = REPO / "train/configs/fashion_mnist_demo.yaml"


@pytest.fixture(autouse=True)
def _restore_threads(torch_threads):
    """main() sets this process's torch threads to --threads; torch_threads restores them."""
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.fashion_mnist import subset_dataset

    return subset_dataset(tmp_path_factory, 400, 200)


def fake_metrics(name: str) -> dict:
    """Deterministic figures of a cell, from its name alone (no training)."""
    h = hashlib.sha256(name.encode()).digest()
    return {"knn_top1": 0.5 + h[0] / 1000, "linear_top1": 0.6 + h[1] / 1000,
            "linear_top1_g": 0.55 + h[2] / 1000, "contrastive_acc": 0.3 + h[3] / 500,
            "images_per_s": 100.0 + h[4], "train_s": 10.0, "steps": 7, "epochs": 0.5,
            "budget": {"train_s": 10.0, "budget_s": 10.0, "ratio": 1.0, "ok": True}}


def fake_runner(calls: list | None = None, stop_at: int | None = None):
    def run(cell, cell_dir, ctx):
        if cell.index == stop_at:
            raise KeyboardInterrupt  # a kill in the middle of this cell
        if calls is not None:
            calls.append(cell.index)
        return fake_metrics(cell.name)
    return run


def args(name, out, data, *more):
    return [name, "--out", str(out), "--data", str(data), "--budget-s", "10", "--device", "cpu",
            "--threads", "1", *more]


def study_json(out):
    return json.loads((out / "study.json").read_text())


# ---------------------------------------------------------------- grids

def test_every_cell_of_every_study_is_a_valid_config(data, tmp_path, capsys):
    cfg = load_config(RECIPE)
    for name, study in STUDIES.items():  # --list checks every cell's config, then lists it
        assert cli.main(args(name, tmp_path / name, data, "--list", "--quick")) == 0
        listed = capsys.readouterr().out.strip().splitlines()
        assert len(listed) == len(study.cells(cfg, True, 0)), name
    cells = STUDIES["augment-pairs"].cells(cfg, False, 0)
    assert len(cells) == 28
    pairs = {tuple(c.settings["ops"]) for c in cells}
    assert len(pairs) == 28 and all(len(set(p)) == len(p) for p in pairs)
    assert {p[0] for p in pairs if len(p) == 1} == set(OPS)
    assert all(OPS.index(p[0]) < OPS.index(p[1]) for p in pairs if len(p) == 2)
    assert len(STUDIES["loss"].cells(cfg, True, 0)) == 5
    assert len(STUDIES["temperature"].cells(cfg, True, 0)) == 7
    big = STUDIES["batch-size"].cells(cfg, False, 512)
    assert [("--train.micro_batch=512" in c.overrides) for c in big] == [
        False, False, True, True, True]


def test_augment_pairs_views_against_the_spec():
    """Cell crop+colour: view 1 the whole image only; view 2 the recipe's crop and colour
    distortion, nothing else; cell sobel: view 2 Sobel at p=1 on the whole image."""
    base = load_config(RECIPE)
    a = base.augment
    cells = {c.name: c for c in STUDIES["augment-pairs"].cells(base, False, 0)}
    off = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, rotate_p=0.0, sobel_p=0.0,
               noise_p=0.0, cutout_p=0.0)
    whole = dict(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def views(name):
        spec = load_config(RECIPE, list(cells[name].overrides)).augment
        return spec.for_view(0), spec.for_view(1)

    def check(view, want):
        for key, value in want.items():
            assert getattr(view, key) == pytest.approx(value), key

    v1, v2 = views("crop+colour")
    check(v1, {**off, **whole})
    check(v2, {**off, "crop_area": a.crop_area, "crop_ratio": a.crop_ratio,
               "jitter_p": a.jitter_p, "grayscale_p": a.grayscale_p})
    assert v2.jitter_strength == a.jitter_strength
    v1, v2 = views("sobel")
    check(v1, {**off, **whole})
    check(v2, {**off, **whole, "sobel_p": 1.0})
    v1, v2 = views("noise+rotate")
    check(v2, {**off, **whole, "noise_p": 1.0, "rotate_p": 1.0})


# ---------------------------------------------------------------- the cell runner

def test_a_cell_launches_resumes_and_reads_its_training_clock(tmp_path):
    from train.cells import Budget, PretrainJob, launch_command, resume_flags, train_seconds

    cpu = launch_command("cpu", 2)
    assert cpu[1:3] == ["-m", "accelerate.commands.launch"] and cpu[-2:] == ["-m",
                                                                             "train.pretrain"]
    assert cpu[cpu.index("--num_processes") + 1] == "1"
    assert cpu[cpu.index("--num_cpu_threads_per_process") + 1] == "2"
    gpus = launch_command("cuda", 2, processes=4)
    assert "--multi_gpu" in gpus and gpus[gpus.index("--num_processes") + 1] == "4"
    run = tmp_path / "run"
    assert resume_flags(run) == []  # a new cell
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"event": "knn", "train_s": 4.5}) + "\n"
                                   + json.dumps({"event": "knn", "train_s": 9.25}) + "\n{cut")
    assert resume_flags(run) == ["--overwrite"]  # killed before its first checkpoint
    assert train_seconds(run) == 9.25  # no checkpoint: the last kNN point's clock
    ckpt = run / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"train_seconds": 12.5}))
    assert resume_flags(run) == ["--resume", "auto"]  # resumed from its checkpoint
    assert train_seconds(run, {"checkpoint": str(ckpt)}) == 12.5
    job = PretrainJob("train/configs/fashion_mnist_demo.yaml", ("--model.width=0.25",), run,
                      Budget(seconds=30))
    cmd = job.command()
    assert cmd[-4:] == ["--train.time_budget_s=30", "--model.width=0.25", "--resume", "auto"]
    assert f"--train.out_dir={run.resolve()}" in cmd
    assert Budget(epochs=3).overrides() == ["--train.time_budget_s=0", "--optim.epochs=3"]


# ---------------------------------------------------------------- resume, --cell, report

def test_a_killed_study_resumes_with_only_the_rest(data, tmp_path, capsys):
    out = tmp_path / "s"
    first = []
    assert cli.main(args("loss", out, data), runner=fake_runner(first, stop_at=2)) == 130
    assert first == [0, 1]
    assert sorted(p.parent.name for p in (out / "cells").glob("*/row.json")) == [
        "00-nt_xent", "01-nt_logistic"]
    kept = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/row.json")}
    second = []
    assert cli.main(args("loss", out, data), runner=fake_runner(second)) == 0
    assert second == [2, 3, 4]  # only the rest
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished rows untouched
    result = study_json(out)
    assert [r["cell"] for r in result["rows"]] == [0, 1, 2, 3, 4]
    assert result["missing"] == [] and result["done"] == 5
    assert "cells 0, 1 finished earlier: kept" in capsys.readouterr().out
    third = []  # a finished study runs nothing
    assert cli.main(args("loss", out, data), runner=fake_runner(third)) == 0
    assert third == []


def test_a_study_killed_by_sigkill_after_its_second_cell_resumes(data, tmp_path):
    """A real kill (SIGKILL from train.atomic.fault_point once the second row is written)."""
    out = tmp_path / "s"
    code = ("import sys; from tools import study; from tests.tools.test_study import "
            "fake_runner; sys.exit(study.main(sys.argv[1:], runner=fake_runner()))")
    cmd = [sys.executable, "-c", code, *args("head", out, data)]
    env = {**os.environ, "SIMCLR_FAULT": "study_cell@2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in (out / "cells").glob("*/row.json")) == [
        "00-none", "01-linear"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cells 0, 1 finished earlier: kept" in proc.stdout
    assert "study: cell 2 of 3" in proc.stdout
    assert "study: cell 0 of" not in proc.stdout and "study: cell 1 of" not in proc.stdout
    assert [r["cell"] for r in study_json(out)["rows"]] == [0, 1, 2]


def test_cell_runs_plus_report_equal_the_sequential_study(data, tmp_path, capsys):
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert cli.main(args("temperature", seq, data), runner=fake_runner()) == 0
    n = study_json(seq)["cells"]
    for i in [3, 0, 6, 1]:  # array tasks end in any order
        assert cli.main(args("temperature", par, data, "--cell", str(i)),
                        runner=fake_runner()) == 0
    assert not (par / "study.json").exists()  # a --cell job merges nothing
    assert cli.main(["report", str(par)]) == 0
    partial = study_json(par)
    assert partial["missing"] == [2, 4, 5] and partial["done"] == 4
    for i in [5, 2, 4]:
        assert cli.main(args("temperature", par, data, "--cell", str(i)),
                        runner=fake_runner()) == 0
    assert cli.main(["report", str(par)]) == 0
    assert study_json(par) == study_json(seq) and n == 7
    assert (par / "temperature.png").read_bytes() == (seq / "temperature.png").read_bytes()
    assert cli.main(args("temperature", par, data, "--cell", "7"), runner=fake_runner()) == 2
    assert "has cells 0...6" in capsys.readouterr().err


def test_a_time_budgeted_study_warns_when_its_cells_paces_differ():
    """Equal seconds at 200 and 290 images/s are 1.45x unequal work: said when the paces are more
    than 1.2x apart on a time budget, never on a step or epoch budget."""
    from train.studies import pace_spread

    rows = [_row({}, 0.7, name=n, images_per_s=v) for n, v in (("a", 200.0), ("b", 290.0))]
    line = pace_spread(rows, {"seconds": 45.0})
    assert line.startswith("warning: the cells trained at 200 (a) to 290 (b) images/s")
    assert "up to 1.45x unequal work" in line
    assert pace_spread(rows, {"seconds": 0.0, "max_steps": 50}) is None
    rows[1]["images_per_s"] = 239.0  # 1.195x: within the allowance
    assert pace_spread(rows, {"seconds": 45.0}) is None


def test_the_untrained_network_is_evaluated_once_as_the_cells_are(data, tmp_path, capsys):
    """baseline.json: the recipe's seeded initialisation, no training, through the cells' kNN and
    probe. Cell 0 of an array job (or the whole study) writes it, other cells and reruns do not;
    the report states it and where the cells lie against it, with the probe's noise."""
    import torch

    from model.simclr import build_simclr
    from pipelines.sources import open_dataset
    from train.features import extract_features, knn_accuracy
    from train.studies import untrained_row

    out = tmp_path / "s"
    calls = []

    def counted(ctx):
        calls.append(ctx)
        return untrained_row(ctx)

    for i in (1, 0, 0):
        assert cli.main(args("loss", out, data, "--cell", str(i)), runner=fake_runner(),
                        baseline=counted) == 0
    assert len(calls) == 1  # cell 0 once; cell 1 and the rerun of cell 0 leave it
    base = json.loads((out / "baseline.json").read_text())
    # the oracle: the same seeded network built here, its features, a brute-force weighted kNN
    cfg = load_config(RECIPE, [*calls[0].overrides])
    torch.manual_seed(cfg.train.seed)
    net = build_simclr(cfg.model).features("h")
    ds = open_dataset(data)
    bank = np.random.default_rng(cfg.train.seed).choice(
        len(ds.split("train")), min(cfg.train.knn_train_samples, len(ds.split("train"))),
        replace=False)
    th, ty = extract_features(net, ds.split("train"), cfg.augment, indices=bank)
    eh, ey = extract_features(net, ds.split("test"), cfg.augment)
    assert base["knn_top1"] == knn_accuracy(th, ty, eh, ey, k=cfg.train.knn_k)
    assert base["linear_n"] == len(ds.split("test")) and 0.1 < base["linear_top1"] < 1
    assert cli.main(["report", str(out)]) == 0
    got = study_json(out)
    assert got["untrained"] == base
    assert got["over_untrained"].startswith(
        f"untrained network: kNN {100 * base['knn_top1']:.1f}%, linear "
        f"{100 * base['linear_top1']:.1f}%; the cells span ")
    assert got["over_untrained"] in (out / "study.md").read_text()


def test_a_study_resumed_with_other_settings_is_refused(data, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(args("head", out, data, "--cell", "0"), runner=fake_runner()) == 0
    capsys.readouterr()
    assert cli.main([*args("head", out, data), "--set", "model.width=0.25"],
                    runner=fake_runner()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("study: error: ") and "overrides differ" in err and "\n" not in err
    assert cli.main(args("loss", out, data), runner=fake_runner()) == 2
    assert "holds the study 'head'" in capsys.readouterr().err


def test_errors_are_one_line(data, tmp_path, capsys):
    for argv, text in (
        (args("head", tmp_path / "a", tmp_path / "none"), "no dataset at"),
        ([*args("head", tmp_path / "b", data), "--set", "model.width"], "is not KEY=VALUE"),
        ([*args("head", tmp_path / "c", data), "--set", "model.nope=1"],
         "unknown key 'model.nope'"),
        (["head", "--data", str(data)], "pass --out DIR"),
        (["report", str(tmp_path / "nothing")], "holds no study"),
        ([*args("head", tmp_path / "d", data), "--set", "loss.temperature=0"],
         "'loss.temperature' must be > 0"),
    ):
        code = cli.main(argv, runner=fake_runner())
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("study: error: ") and text in err, err
        assert "\n" not in err


# ---------------------------------------------------------------- figures

def decoded(png):
    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG"
        size = img.size
        text = dict(img.text)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # a picture, not a blank page
    return size, json.loads(text[cli.FIGURE_KEY])


def test_the_heatmap_decoded_equals_study_json(data, tmp_path):
    out = tmp_path / "s"
    assert cli.main(args("augment-pairs", out, data), runner=fake_runner()) == 0
    rows = study_json(out)["rows"]
    size, fig = decoded(out / "augment-pairs.png")
    assert size == (840, 660) and fig["kind"] == "heatmap"
    # the oracle: each entry from study.json's row of that pair, in either order
    by_ops = {frozenset(r["settings"]["ops"]): r["linear_top1"] for r in rows}
    for i, a in enumerate(OPS):
        for j, b in enumerate(OPS):
            assert fig["values"][i][j] == by_ops[frozenset((a, b))]
        assert fig["row_mean"][i] == pytest.approx(np.mean([by_ops[frozenset((a, b))]
                                                            for b in OPS]))
    assert fig["labels"][:3] == ["Crop", "Cutout", "Colour"]


def test_partial_heatmap_and_line_and_bar_figures(data, tmp_path):
    out = tmp_path / "pairs"
    for i in (0, 1, 7):  # crop, crop+cutout, cutout
        assert cli.main(args("augment-pairs", out, data, "--cell", str(i)),
                        runner=fake_runner()) == 0
    assert cli.main(["report", str(out)]) == 0
    _, fig = decoded(out / "augment-pairs.png")
    known = [(i, j) for i in range(7) for j in range(7) if fig["values"][i][j] is not None]
    assert known == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert fig["row_mean"][2:] == [None] * 5

    out = tmp_path / "temp"
    assert cli.main(args("temperature", out, data), runner=fake_runner()) == 0
    rows = study_json(out)["rows"]
    size, fig = decoded(out / "temperature.png")
    assert size == (1200, 450) and fig["kind"] == "lines"
    acc = fig["panels"][1]["series"]["contrastive, cosine"]
    want = sorted((r["settings"]["temperature"], r["contrastive_acc"]) for r in rows
                  if r["settings"]["similarity"] == "cosine")
    assert list(zip(acc["x"], acc["y"])) == want

    out = tmp_path / "head"
    assert cli.main(args("head", out, data), runner=fake_runner()) == 0
    rows = study_json(out)["rows"]
    _, fig = decoded(out / "head.png")
    series = fig["panels"][0]["series"]
    assert series["h"]["x"] == ["none", "linear", "non-linear"]
    assert series["h"]["y"] == [r["linear_top1"] for r in rows]
    assert series["g(h)"]["y"] == [r["linear_top1_g"] for r in rows]


# ---------------------------------------------------------------- findings

def _row(settings, linear, **more):
    return {"settings": settings, "status": "done", "linear_top1": linear, **more}


def test_findings_say_where_ours_differs():
    rows = [_row({"ops": ["crop"]}, 0.5), _row({"ops": ["colour"]}, 0.4),
            _row({"ops": ["crop", "colour"]}, 0.7), _row({"ops": ["crop", "noise"]}, 0.6)]
    lines, agrees = augment_pairs_ours(rows)
    assert agrees is True and "crop + colour 70.0% is the best of 2 pairs" in lines[1]
    rows[3]["linear_top1"] = 0.75
    lines, agrees = augment_pairs_ours(rows)
    assert agrees is False
    assert lines[1].startswith("differs: ") and "crop + noise beats it by +5.0 points" in lines[1]

    rows = [_row({"head": "none"}, 0.5, linear_top1_g=0.5),
            _row({"head": "linear"}, 0.62, linear_top1_g=0.5),
            _row({"head": "non-linear"}, 0.6, linear_top1_g=0.4)]
    lines, agrees = head_ours(rows)
    assert agrees is False
    assert lines[0].startswith("differs: non-linear 60.0% vs linear 62.0%: -2.0 points")
    assert lines[1].startswith("agrees: non-linear 60.0% vs none 50.0%")

    rows = [_row({"similarity": "cosine", "temperature": t}, v, contrastive_acc=a)
            for t, v, a in ((0.05, 0.5, 0.9), (0.1, 0.6, 0.8), (0.5, 0.55, 0.7), (1.0, 0.5, 0.6))]
    rows.append(_row({"similarity": "dot", "temperature": 10.0}, 0.4))
    lines, agrees = temperature_ours(rows)
    assert agrees is True and len(lines) == 4
    rows[0]["linear_top1"] = 0.7  # now 0.05 is best: the lowest tau, outside 0.1-0.5
    lines, agrees = temperature_ours(rows)
    assert agrees is False and lines[0].startswith("differs: with l2 normalisation the best tau "
                                                   "is 0.05")


def test_differences_within_the_probes_noise_decide_nothing():
    """Two standard errors of two binomial shares scored on n images each: at n = 2000 and
    accuracies near 0.78 that is 2 * sqrt(2 * 0.78 * 0.22 / 2000) = 2.6 points, so a pair 1 point
    ahead of crop + colour neither agrees nor differs, while 4 points ahead it differs."""
    import math

    from train.studies import loss_ours, noise

    n = 2000
    rows = [_row({"ops": ["crop"]}, 0.74, linear_n=n), _row({"ops": ["colour"]}, 0.75, linear_n=n),
            _row({"ops": ["crop", "colour"]}, 0.78, linear_n=n),
            _row({"ops": ["crop", "noise"]}, 0.79, linear_n=n)]
    margin = 2 * math.sqrt(0.78 * 0.22 / n + 0.79 * 0.21 / n)
    assert noise(rows[2], rows[3]) == pytest.approx(margin)
    lines, agrees = augment_pairs_ours(rows)
    assert agrees is True and lines[0].startswith("agrees: best single operation colour 75.0%")
    assert lines[1].startswith("unclear: crop + colour 78.0% is pair 2 of 2")
    assert f"within the probe's noise (+-{100 * margin:.1f} points)" in lines[1]
    rows[3]["linear_top1"] = 0.82
    lines, agrees = augment_pairs_ours(rows)
    assert agrees is False and lines[1].startswith("differs: ")
    rows[0]["linear_top1"] = rows[1]["linear_top1"] = 0.81  # best pair 1 point over best single
    lines, agrees = augment_pairs_ours(rows)
    assert lines[0].startswith("unclear: ") and agrees is False
    # without linear_n (rows of an older study) every difference counts, as before
    assert noise(_row({}, 0.5), rows[0]) == 0.0

    ntx = _row({"loss": "nt_xent", "semi_hard": False}, 0.78, linear_n=n)
    rows = [ntx, _row({"loss": "nt_logistic", "semi_hard": False}, 0.77, linear_n=n)]
    lines, agrees = loss_ours(rows)
    assert agrees is None and lines[0].startswith("unclear: NT-Xent 78.0% vs nt_logistic 77.0%")
    rows[1]["linear_top1"] = 0.70
    assert loss_ours(rows)[1] is True


# ---------------------------------------------------------------- a real study

@pytest.mark.slow(reason="pretrains three tiny cells through accelerate launch, probes each")
@pytest.mark.timeout(900)
def test_a_real_study_killed_after_its_second_cell_resumes(data, tmp_path):
    out = tmp_path / "head"
    cmd = [sys.executable, "-m", "tools.study", "head", "--data", str(data), "--out", str(out),
           "--max-steps", "3", "--device", "cpu", "--threads", "1", "--probe-train", "200",
           "--probe-eval", "100", "--set", "model.width=0.125", "--set", "data.batch_size=32",
           "--set", "data.num_workers=0", "--set", "data.backend=torchvision",
           "--set", "train.knn_train_samples=64", "--set", "eval.max_iter=20"]
    env = {**os.environ, "SIMCLR_FAULT": "study_cell@2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cells 0, 1 finished earlier: kept" in proc.stdout
    assert "study: cell 0 of" not in proc.stdout and "study: cell 2 of 3" in proc.stdout
    result = study_json(out)
    assert [r["status"] for r in result["rows"]] == ["done"] * 3
    for r in result["rows"]:
        summary = json.loads((out / "cells" / f"{r['cell']:02d}-{r['name']}" / "run" /
                              "summary.json").read_text())
        assert r["steps"] == summary["steps"] == 3 and r["knn_top1"] == summary["knn_top1"]
        assert 0 <= r["linear_top1"] <= 1 and 0 <= r["linear_top1_g"] <= 1
        assert r["train_s"] > 0 and r["budget"]["ok"] is None  # steps, not seconds
        assert r["contrastive_acc"] == summary["contrastive_acc"]
    _, fig = decoded(out / "head.png")
    assert fig["panels"][0]["series"]["h"]["y"] == [r["linear_top1"] for r in result["rows"]]


@pytest.mark.slow(reason="pretrains one tiny cell for a time budget through accelerate launch")
@pytest.mark.timeout(600)
def test_a_time_budgeted_cell_records_its_training_clock(data, tmp_path):
    out = tmp_path / "loss"
    cmd = [sys.executable, "-m", "tools.study", "loss", "--data", str(data), "--out", str(out),
           "--budget-s", "12", "--cell", "0", "--device", "cpu", "--threads", "1",
           "--probe-train", "200", "--probe-eval", "100", "--set", "model.width=0.125",
           "--set", "data.batch_size=32", "--set", "data.num_workers=0",
           "--set", "data.backend=torchvision", "--set", "train.knn_train_samples=64",
           "--set", "eval.max_iter=20", "--set", "train.log_every=5",
           "--set", "optim.epochs=1000"]  # the budget, not the epochs, ends it
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads((out / "cells" / "00-nt_xent" / "row.json").read_text())
    run = out / "cells" / "00-nt_xent" / "run"
    summary = json.loads((run / "summary.json").read_text())
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert row["train_s"] == state["train_seconds"] > 0  # the run's own training clock
    assert row["budget"]["budget_s"] == 12.0
    assert row["budget"]["ratio"] == pytest.approx(row["train_s"] / 12.0)
    assert row["budget"]["ok"] == (abs(row["train_s"] / 12.0 - 1) <= 0.02)
    assert row["images_per_s"] == pytest.approx(row["steps"] * 32 / row["train_s"])
    print(f"trained {row['train_s']:.2f} s of a 12 s budget ({row['steps']} steps)")
