"""Linear evaluation: the probe against closed forms, and the command on a real checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fashion_mnist import REPO
from train.linear_eval import (
    _warn_at_edge,
    edge_rising,
    fit_logistic,
    linear_probe,
    main,
    run_probes,
    search_fits,
    topk_accuracy,
)


def test_logistic_fit_is_a_stationary_point_of_its_objective():
    """Full-batch L-BFGS must end where the penalised cross-entropy's gradient vanishes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(5, 3, generator=g, dtype=torch.float64)
         + 0.5 * torch.randn(600, 3, generator=g, dtype=torch.float64)).argmax(1)
    clf = fit_logistic(x.float(), y, 3, l2=1e-3, max_iter=500).double()
    loss = F.cross_entropy(clf(x), y) + 0.5 * 1e-3 * clf.weight.pow(2).sum()
    grads = torch.autograd.grad(loss, list(clf.parameters()))
    assert max(gr.abs().max().item() for gr in grads) < 1e-4


def test_closed_form_fit_takes_the_steps_of_autograd_lbfgs():
    """The loss and gradient are written out by hand: L-BFGS on them must take the same iterates
    as L-BFGS on F.cross_entropy with autograd (the reference), from zero and from a warm start,
    with the fit's transpose given or not. Three iterations, before rounding can drift apart."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(700, 9, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(9, 4, generator=g, dtype=torch.float64)
         + torch.randn(700, 4, generator=g, dtype=torch.float64)).argmax(1)

    def reference(l2, init):
        w = torch.nn.Parameter(init.weight.detach().clone())
        b = torch.nn.Parameter(init.bias.detach().clone())
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=3, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-9,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    zero = torch.nn.Linear(9, 4, dtype=torch.float64)
    torch.nn.init.zeros_(zero.weight)
    torch.nn.init.zeros_(zero.bias)
    start = fit_logistic(x, y, 4, l2=1.0, max_iter=2)
    assert start.weight.abs().max() > 0.01  # a start away from zero
    for l2, init, xt in ((1e-2, zero, None), (1e-3, start, x.T.contiguous())):
        fit = fit_logistic(x, y, 4, l2=l2, max_iter=3, init=None if init is zero else init, xt=xt)
        w, b = reference(l2, init)
        assert not torch.equal(fit.weight, init.weight)
        torch.testing.assert_close(fit.weight, w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fit.bias, b, rtol=1e-9, atol=1e-12)


def test_probe_reaches_the_bayes_accuracy_of_two_gaussians():
    """Two unit-variance Gaussians 2*delta apart: the best possible accuracy is Phi(delta)."""
    g = torch.Generator().manual_seed(1)
    n, d, delta = 4000, 10, 1.0
    direction = F.normalize(torch.randn(d, generator=g), dim=0)
    y = torch.randint(0, 2, (2 * n,), generator=g)
    x = torch.randn(2 * n, d, generator=g) + (2 * y[:, None] - 1) * delta * direction
    bayes = 0.5 * (1 + math.erf(delta / math.sqrt(2)))  # Phi(1) = 0.841
    r = linear_probe(x[:n], y[:n], x[n:], y[n:], l2_grid=(1e-4,), val_fraction=0.1, max_iter=100)
    sigma = math.sqrt(bayes * (1 - bayes) / n)
    assert abs(r["top1"] - bayes) < 4 * sigma + 0.005, (r["top1"], bayes)


def test_warm_started_fit_reaches_the_same_optimum_as_a_cold_one():
    """The penalised objective is strictly convex: starting from another penalty's solution ends
    at the same stationary point."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=g)
    y = (x @ torch.randn(6, 4, generator=g)).argmax(1)
    cold = fit_logistic(x, y, 4, l2=1e-2, max_iter=500)
    warm = fit_logistic(x, y, 4, l2=1e-2, max_iter=500,
                        init=fit_logistic(x, y, 4, l2=10.0, max_iter=500))
    torch.testing.assert_close(warm.weight, cold.weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(warm.bias, cold.bias, rtol=1e-3, atol=1e-4)


def test_probe_flags_a_best_penalty_on_the_grids_edge():
    """Imbalanced classes: a heavy penalty shrinks the weights until the bias (the majority class)
    decides, so accuracy rises as the penalty falls and a grid of heavy penalties peaks on its
    edge."""
    g = torch.Generator().manual_seed(4)
    n = 2000
    y = (torch.rand(2 * n, generator=g) < 0.3).long()
    x = torch.randn(2 * n, 5, generator=g) + 1.5 * (2 * y[:, None] - 1)
    too_strong = linear_probe(x[:n], y[:n], x[n:], y[n:], l2_grid=(0.5, 2.0, 8.0),
                              val_fraction=0.2, max_iter=100)
    assert too_strong["l2"] == 0.5 and too_strong["l2_at_edge"]
    assert (too_strong["val_top1_by_l2"]["8.0"] < too_strong["val_top1_by_l2"]["2.0"]
            < too_strong["val_top1_by_l2"]["0.5"])
    wide = linear_probe(x[:n], y[:n], x[n:], y[n:], l2_grid=(1e3, 1e1, 1e-1, 1e-3, 1e-5),
                        val_fraction=0.2, max_iter=100, search="full")
    assert not wide["l2_at_edge"] and wide["top1"] >= too_strong["top1"] - 0.005
    assert list(wide["val_top1_by_l2"]) == ["1e-05", "0.001", "0.1", "10.0", "1000.0"]
    assert not wide["l2_edge_rising"]
    # the too-strong grid still rises at its end beyond the noise of 400 validation images
    val = too_strong["val_top1_by_l2"]
    margin = 2 * math.sqrt((val["0.5"] * (1 - val["0.5"]) + val["2.0"] * (1 - val["2.0"])) / 400)
    assert val["0.5"] - val["2.0"] > margin and too_strong["l2_edge_rising"]


def test_edge_rising_counts_only_a_rise_beyond_the_validation_noise():
    """Two standard errors of a difference of two accuracies over n images: at n = 6000 and
    accuracies near 0.87 the margin is 2 * sqrt(2 * 0.87 * 0.13 / 6000) = 0.0123."""
    flat = {1e-8: 0.870, 1e-7: 0.865, 1e-6: 0.861, 1e-4: 0.84}  # the demo's weak end
    assert not edge_rising(flat, 6000)
    assert edge_rising({1e-8: 0.885, 1e-7: 0.865, 1e-6: 0.861}, 6000)  # 0.020 > 0.0123
    assert edge_rising({1e3: 0.90, 1e1: 0.70, 1e-1: 0.60}, 400)  # the strong end rises
    assert not edge_rising({1e-2: 0.86, 1e-3: 0.90, 1e-4: 0.70}, 400)  # an interior best
    assert not edge_rising({1e-3: 0.9}, 400)  # one penalty: no slope to read


def test_a_flat_weak_end_raises_no_warning(capsys):
    """Well-separated classes: every weak penalty classifies the validation images alike, so the
    tie goes to the strongest, an end of the grid: at its edge, not rising, and no warning; a
    rising edge is warned about."""
    g = torch.Generator().manual_seed(5)
    n = 1000
    y = torch.randint(0, 3, (2 * n,), generator=g)
    x = torch.randn(2 * n, 4, generator=g) + 6.0 * F.one_hot(y, 4).float()
    r = linear_probe(x[:n], y[:n], x[n:], y[n:], l2_grid=(1e-6, 1e-7, 1e-8), val_fraction=0.2,
                     max_iter=100, search="full")
    assert r["l2_at_edge"] and not r["l2_edge_rising"]
    _warn_at_edge({"encoder": r}, (1e-6, 1e-7, 1e-8))
    assert "warning" not in capsys.readouterr().err
    _warn_at_edge({"encoder": {**r, "l2_edge_rising": True}}, (1e-6, 1e-7, 1e-8))
    assert "still rises there beyond its noise: widen the grid" in capsys.readouterr().err


def _overfitting_problem(seed: int, n: int = 300, d: int = 60):
    """Few noisy samples in many dimensions: the validation accuracy peaks at an interior
    penalty, falling on both sides of it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 3, generator=g)
    x = torch.randn(2 * n, d, generator=g)
    y = (x @ w + 4.0 * torch.randn(2 * n, 3, generator=g)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def test_the_coarse_search_fits_every_other_penalty_then_the_best_ones_neighbours():
    """Oracle: the full path over the same grid. The coarse search fits the even-indexed values
    (strongest first) and the two grid neighbours of the best of those, picks the best of what it
    fitted, and agrees with the full path where the validation curve has one peak."""
    grid = tuple(10.0 ** k for k in range(4, -5, -1))  # 9 values, 1e4 .. 1e-4
    data = _overfitting_problem(5)
    calls = []
    kw = dict(l2_grid=grid, val_fraction=0.3, max_iter=200)
    full = linear_probe(*data, search="full", **kw)
    coarse = linear_probe(*data, search="coarse", progress=calls.append, **kw)
    curve = [full["val_top1_by_l2"][str(v)] for v in grid]
    peak = curve.index(max(curve))
    assert 0 < peak < len(grid) - 1, curve  # an interior optimum: the problem is as intended
    even = {str(v) for v in grid[::2]}
    c = grid.index(max(grid[::2], key=lambda v: (coarse["val_top1_by_l2"][str(v)], v)))
    assert set(coarse["val_top1_by_l2"]) == even | {str(grid[j]) for j in (c - 1, c + 1)}
    assert coarse["val_top1_by_l2"][str(coarse["l2"])] == max(coarse["val_top1_by_l2"].values())
    assert coarse["l2"] == full["l2"] and coarse["top1"] == pytest.approx(full["top1"], abs=0.01)
    assert sum(calls) == search_fits(len(grid), "coarse") == 5 + 2 + 1  # the bar's total
    assert len(full["val_top1_by_l2"]) == len(grid) and not coarse["l2_at_edge"]


def test_probes_side_by_side_give_what_each_gives_alone():
    """run_probes on the CPU runs the probes in threads, one core each: every result must be the
    probe's own, run alone."""
    jobs = {f"p{s}": _overfitting_problem(s, n=200 + 100 * s, d=20 + 10 * s) for s in range(3)}
    kw = dict(l2_grid=(1e2, 1e0, 1e-2, 1e-4), val_fraction=0.2, max_iter=100, search="coarse")
    threads = torch.get_num_threads()
    together = run_probes(jobs, **kw)
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    for name, job in jobs.items():
        alone = linear_probe(*job, **kw)
        assert together[name]["l2"] == alone["l2"]
        assert together[name]["top1"] == pytest.approx(alone["top1"], abs=1e-9)
        assert together[name]["val_top1_by_l2"] == pytest.approx(alone["val_top1_by_l2"])


def native_bf16_by_cpuinfo() -> bool:
    """The oracle for `cpu_native_bf16` on x86 and Arm: /proc/cpuinfo's own flags."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    flags = set(text.split())
    return bool({"avx512_bf16", "amx_tile", "bf16"} & flags)


def test_evaluation_features_follow_training_precision_rule(monkeypatch):
    """auto: bf16 on a GPU and on a native-bf16 CPU, float32 on other CPUs; fp32 and bf16 force
    one; anything else is refused."""
    from train import precision
    from train.features import eval_bf16

    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda native=native: native)
        assert eval_bf16("auto", "cpu") is native
        assert eval_bf16("auto", "cuda") is True
        assert eval_bf16("fp32", "cpu") is False and eval_bf16("fp32", "cuda") is False
        assert eval_bf16("bf16", "cpu") is True
    with pytest.raises(ValueError, match="precision must be one of"):
        eval_bf16("fp16", "cpu")


def _small_cnn_and_split():
    """A small random CNN and 40 random 12 px RGB images of 4 classes."""
    import numpy as np

    from pipelines.sources import Split

    g = torch.Generator().manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    images = np.random.default_rng(0).integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    return net, Split(name="x", images=images, labels=np.arange(40) % 4)


def test_bf16_features_are_the_float32_ones_rounded():
    """bf16 autocast features of a small CNN: not the float32 ones bit for bit (autocast took
    effect), but within bf16's rounding of them (8 mantissa bits over a few layers)."""
    from pipelines.spec import AugmentSpec
    from train.features import extract_features

    net, split = _small_cnn_and_split()
    spec = AugmentSpec(size=12)
    f32, y = extract_features(net, split, spec, precision="fp32", batch_size=16)
    bf, y2 = extract_features(net, split, spec, precision="bf16", batch_size=16)
    assert torch.equal(y, y2) and f32.dtype == bf.dtype == torch.float32
    assert not torch.equal(f32, bf)
    rel = (bf - f32).norm() / f32.norm()
    assert rel < 0.02, rel.item()


def test_knn_monitor_extracts_at_the_runs_precision(monkeypatch):
    """train.mixed_precision bf16 gives the kNN monitor bf16 features, fp32 float32 ones: both
    extractions are asked for that precision, and the accuracy equals the weighted kNN of
    features extracted at it."""
    import train.features as features
    from train.config import build_config
    from train.features import extract_features, knn_accuracy, knn_top1

    asked = []

    def spy(*args, **kw):
        asked.append(kw["precision"])
        return extract_features(*args, **kw)

    monkeypatch.setattr(features, "extract_features", spy)
    net, split = _small_cnn_and_split()
    for precision in ("fp32", "bf16"):
        asked.clear()
        cfg = build_config({"augment": {"size": 12, "crop_area": [0.5, 1.0]},
                            "train": {"mixed_precision": precision, "knn_k": 5,
                                      "knn_train_samples": 30}})
        got = knn_top1(cfg, net, split, split, "cpu")
        bank = np.random.default_rng(cfg.train.seed).choice(40, 30, replace=False)
        th, ty = extract_features(net, split, cfg.augment, indices=bank, precision=precision)
        eh, ey = extract_features(net, split, cfg.augment, precision=precision)
        assert got == knn_accuracy(th, ty, eh, ey, k=5)
        assert asked == [precision] * 2


def test_topk_accuracy_counts_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    acc = topk_accuracy(logits, y, ks=(1, 2))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


@pytest.mark.slow(reason="the linear evaluation command in a subprocess: fourteen L-BFGS fits "
                        "on each of three feature sets")
@pytest.mark.timeout(600)
def test_linear_eval_command_on_a_pretrained_checkpoint(tiny_run, tmp_path, capsys):
    run = tiny_run  # read only: the results go to --json
    out = tmp_path / "le.json"
    proc = subprocess.run([sys.executable, "-m", "train.linear_eval", "--checkpoint", str(run),
                           "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (r["train_count"], r["eval_count"]) == (400, 200)
    assert r["encoder"]["feature_dim"] == r["random_init"]["feature_dim"] == 64
    assert r["raw_pixels"]["feature_dim"] == 28 * 28
    for m in (r["encoder"], r["random_init"], r["raw_pixels"]):
        assert 0.1 < m["top1"] <= m["top5"] <= 1.0  # ten balanced-ish classes: far above chance
        # the coarse search: every other of the 14 values, the best one's two neighbours
        assert {str(10.0 ** k) for k in range(5, -9, -2)} <= set(m["val_top1_by_l2"])
        assert len(m["val_top1_by_l2"]) <= 9 and m["l2_search"] == "coarse"
        assert isinstance(m["l2_at_edge"], bool)
        assert m["l2_edge_rising"] <= m["l2_at_edge"]  # rising only at an edge
    assert r["encoder"] != r["random_init"]  # trained weights, not the random initialisation
    for row in ("SimCLR encoder", "random-init encoder (baseline)", "raw pixels (baseline)"):
        assert row in proc.stdout
    # auto: bf16 features only where this CPU has native bf16 (/proc/cpuinfo is the oracle)
    assert r["precision"] == ("bf16" if native_bf16_by_cpuinfo() else "fp32")
    assert f"{r['precision']} features" in proc.stdout

    # --train-samples / --eval-samples: a seeded subset, the same on every run (main() here)
    sub = [tmp_path / "s1.json", tmp_path / "s2.json"]
    for path in sub:
        assert main(["--checkpoint", str(run), "--json", str(path), "--train-samples", "200",
                     "--eval-samples", "100", "--no-baseline"]) == 0, capsys.readouterr().err
    a, b = (json.loads(p.read_text()) for p in sub)
    assert (a["train_count"], a["eval_count"]) == (200, 100)
    assert "raw_pixels" not in a and "random_init" not in a
    assert a["encoder"] == b["encoder"]
    # --precision bf16 forces bf16 features (emulated on CPUs without it): the same subset's
    # accuracy within 3 of its 100 images of fp32's
    bf = tmp_path / "bf16.json"
    assert main(["--checkpoint", str(run), "--json", str(bf), "--train-samples", "200",
                 "--eval-samples", "100", "--no-baseline", "--precision", "bf16"]) == 0
    c = json.loads(bf.read_text())
    assert c["precision"] == "bf16"
    fp = main(["--checkpoint", str(run), "--json", str(tmp_path / "fp.json"), "--train-samples",
               "200", "--eval-samples", "100", "--no-baseline", "--precision", "fp32"])
    assert fp == 0
    f32 = json.loads((tmp_path / "fp.json").read_text())
    assert f32["precision"] == "fp32"
    assert abs(c["encoder"]["top1"] - f32["encoder"]["top1"]) <= 0.03


def test_linear_eval_rejects_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.linear_eval",
                           "--checkpoint", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert (proc.stderr.startswith("linear_eval: error: no readable checkpoint")
            and "Traceback" not in proc.stderr)


def test_subset_is_seeded_sorted_and_whole_when_large():
    from train.linear_eval import subset

    a = subset(1000, 100, seed=3)
    assert len(a) == 100 == len(set(a.tolist())) and (a[1:] > a[:-1]).all() and a.max() < 1000
    assert (a == subset(1000, 100, seed=3)).all() and not (a == subset(1000, 100, seed=4)).all()
    assert ((subset(50, 100, seed=0) == list(range(50))).all()
            and (subset(50, None, seed=0) == list(range(50))).all())


@pytest.mark.gpu
def test_cuda_probe_matches_the_cpu_probe():
    """The fits on the GPU reach the CPU's accuracy and penalty on the same features."""
    g = torch.Generator().manual_seed(2)
    n, d, classes = 3000, 64, 5
    centres = torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (2 * n,), generator=g)
    x = centres[y] + 1.5 * torch.randn(2 * n, d, generator=g)
    kw = dict(l2_grid=(1e-4, 1e-2), val_fraction=0.1, max_iter=200)
    cpu = linear_probe(x[:n], y[:n], x[n:], y[n:], **kw)
    gpu = linear_probe(x[:n], y[:n], x[n:], y[n:], device="cuda", **kw)
    assert gpu["l2"] == cpu["l2"]
    assert abs(gpu["top1"] - cpu["top1"]) <= 0.005 and abs(gpu["top5"] - cpu["top5"]) <= 0.005


def test_linear_eval_writes_beside_the_run_that_owns_the_checkpoint(tiny_run_copy, tmp_path,
                                                                     capsys):
    """A step directory inside a run: results in that run's directory, with its summary only when
    the summary is this checkpoint's. A step directory copied elsewhere: results beside it, and
    no unrelated summary.json from its grandparent embedded (both used to happen)."""
    import shutil

    run = tiny_run_copy  # 3 steps
    quick = ["--train-samples", "64", "--eval-samples", "32", "--no-baseline", "--device", "cpu"]

    def linear_eval(ckpt):
        assert main(["--checkpoint", str(ckpt), *quick]) == 0, capsys.readouterr().err[-2000:]

    step_dir = run / "checkpoints" / "step-00000003"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run / "linear_eval.json.tmp").symlink_to(victim)  # a link at the temp name is not followed
    linear_eval(step_dir)
    assert victim.read_text() == "precious"
    r = json.loads((run / "linear_eval.json").read_text())
    assert r["pretraining"]["steps"] == 3 and r["checkpoint"] == str(step_dir)

    elsewhere = tmp_path / "shelf" / "models"
    shutil.copytree(step_dir, elsewhere / "step-00000003")
    (tmp_path / "shelf" / "summary.json").write_text(json.dumps({"steps": 999, "unrelated": True}))
    linear_eval(elsewhere / "step-00000003")
    assert not (tmp_path / "shelf" / "linear_eval.json").exists()
    r = json.loads((elsewhere / "step-00000003.linear_eval.json").read_text())
    assert "pretraining" not in r and r["checkpoint"] == str(elsewhere / "step-00000003")

    if not torch.cuda.is_available():  # --device cuda without a GPU: one line, no traceback
        capsys.readouterr()
        assert main(["--checkpoint", str(run), "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("linear_eval: error: --device cuda") and "Traceback" not in err
        assert "--device cpu" in err
        assert len(err.splitlines()) == 1



def test_an_unwritable_json_is_refused_before_any_feature_and_a_late_failure_still_prints(
        tiny_run, tmp_path, capsys, monkeypatch):
    """--json naming a directory or a place that takes no file: one line before any feature is
    computed (it used to fail after every feature and fit, naming a temp file). A write that fails
    anyway (a full disk) still prints the results before its one-line error."""
    import errno

    import train.linear_eval as le

    quick = ["--checkpoint", str(tiny_run), "--train-samples", "64", "--eval-samples", "32",
             "--no-baseline", "--device", "cpu"]
    real_extract = le.extract_features

    def no_work(*a, **kw):
        raise AssertionError("features computed before the output was checked")

    monkeypatch.setattr(le, "extract_features", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [tmp_path, blocker / "le.json"]  # a directory; a path under a file
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(locked / "le.json")
    for target in cases:
        assert main([*quick, "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("linear_eval: error: --json") and err.count("\n") == 1, err
        assert str(target if target.is_dir() else target.parent) in err

    monkeypatch.setattr(le, "extract_features", real_extract)

    def disk_full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(le, "write_atomic", disk_full)
    assert main([*quick, "--json", str(tmp_path / "le.json")]) == 2
    out, err = capsys.readouterr()
    assert "SimCLR encoder (frozen)" in out and "not saved" in out
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # after the progress bars
    assert len(errors) == 1 and errors[0].startswith("linear_eval: error: No space left"), err


def test_a_single_class_is_refused_and_few_classes_warn(tiny_run, tmp_path, capsys, monkeypatch):
    """One class: every classifier scores 100% (top-1 and top-5), so linear_eval refuses before
    any feature; up to five classes: top-5 counts every image as right, which it says."""
    import train.linear_eval as le
    from tests.fashion_mnist import make_subset

    one = make_subset(tmp_path / "one", 64, 32, classes=(3,))
    few = make_subset(tmp_path / "few", 64, 32, classes=(0, 1, 2))
    real_extract = le.extract_features
    monkeypatch.setattr(le, "extract_features", lambda *a, **kw: pytest.fail("features computed"))
    quick = ["--checkpoint", str(tiny_run), "--no-baseline", "--device", "cpu"]
    assert main([*quick, "--data", str(one), "--json", str(tmp_path / "one.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linear_eval: error: split 'train' holds a single class"), err
    assert err.count("\n") == 1 and not (tmp_path / "one.json").exists()

    monkeypatch.setattr(le, "extract_features", real_extract)
    assert main([*quick, "--data", str(few), "--json", str(tmp_path / "few.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: split 'train' has 3 classes: top-5 counts every image" in err
    assert json.loads((tmp_path / "few.json").read_text())["encoder"]["top5"] == 1.0  # the oracle


def test_features_g_feeds_the_probe_the_heads_output_and_h_the_encoders(tiny_run, tmp_path,
                                                                          capsys, monkeypatch):
    """--features g: the rows the probe is fitted on are head(encoder(x)) computed directly for the
    same images, and differ from h (the default); the JSON and the table say which. A model with
    no head evaluates g(h) = h with a one-line warning."""
    import dataclasses

    import numpy as np

    import train.linear_eval as le
    from model.simclr import build_simclr
    from pipelines.sources import open_dataset
    from train.checkpoint import load_pretrained
    from train.features import eval_views

    seen = {}
    real_probe = le.linear_probe

    def spy(train_x, *a, **kw):  # the real probe, on one penalty: the rows are what is tested
        seen["train_x"] = train_x
        return real_probe(train_x, *a, **{**kw, "l2_grid": (1e-2,)})

    monkeypatch.setattr(le, "linear_probe", spy)
    ckpt, cfg, model = load_pretrained(tiny_run)
    quick = ["--checkpoint", str(tiny_run), "--train-samples", "64", "--eval-samples", "32",
             "--no-baseline", "--device", "cpu"]
    # the first images the probe fits on, and their features computed by hand
    idx = le.subset(len(open_dataset(cfg.data.path).split("train")), 64, cfg.train.seed)[:5]
    x = next(eval_views(open_dataset(cfg.data.path).split("train"), cfg.augment, idx, 5))
    model.eval()
    with torch.no_grad():
        h = model.encoder(x)
        g = model.head(h)

    results = {}
    for which in ("h", "g"):
        out = tmp_path / f"{which}.json"
        assert main([*quick, "--features", which, "--json", str(out)]) == 0
        results[which] = json.loads(out.read_text()), capsys.readouterr().out
        torch.testing.assert_close(seen["train_x"][:5], {"h": h, "g": g}[which],
                                   rtol=1e-4, atol=1e-4)
    assert not torch.allclose(g, h, atol=1e-2)  # g(h) is not h: the two runs saw different rows
    (rh, th), (rg, tg) = results["h"], results["g"]
    assert (rh["features"], rg["features"]) == ("h", "g")
    assert rh["head"] == rg["head"] == "non-linear" and rg["head_layers"] == 2
    assert rg["encoder"]["feature_dim"] == cfg.model.head_out
    assert "h, the encoder's output" in th and "SimCLR encoder (frozen)" in th
    assert "g(h), the projection head's output" in tg and "SimCLR encoder + head (frozen)" in tg

    # no head: g = h, said in one warning line; the probe sees the encoder's output
    bare_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head_layers=0))
    bare = build_simclr(bare_cfg.model)
    bare.encoder.load_state_dict(model.encoder.state_dict())
    monkeypatch.setattr(le, "load_pretrained", lambda path: (ckpt, bare_cfg, bare))
    out = tmp_path / "none.json"
    assert main([*quick, "--features", "g", "--json", str(out)]) == 0
    stdout, err = capsys.readouterr()
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert warning == ["linear_eval: warning: the model has no projection head (model.head_layers "
                       "0), so g(h) = h: --features g evaluates h"]
    torch.testing.assert_close(seen["train_x"][:5], h, rtol=1e-4, atol=1e-4)
    r = json.loads(out.read_text())
    assert (r["features"], r["head"], r["head_layers"]) == ("g", "none", 0)
    assert r["encoder"]["feature_dim"] == model.encoder.feat_dim
    assert "g(h) = h (no projection head)" in stdout and "SimCLR encoder (frozen)" in stdout
    assert np.isfinite(r["encoder"]["top1"])
