"""tools.bench_quality: the kNN curve read from log.jsonl, the equal-time and time-to-reach figures
against hand-computed values, the raw-pixel baseline against a naive numpy kNN, the peer's
augmentation mapped from the spec, the PNG, the one-line errors, and a --quick run's JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.spec import AugmentSpec
from tests.fashion_mnist import REPO, subset_dataset
from tests.tools.test_benchmarks import check_contract
from tools import benchmark
from tools.bench_quality import (
    grid,
    images_per_s,
    main,
    raw_pixel_knn,
    read_curve,
    result_rows,
    time_to_reach,
    value_at,
)
from tools.peer_lightly import TIMED_FROM, TIMED_TO, BudgetPlan, transform_kwargs
from train.cells import budget_check, budget_warning
from train.config import load_config
from train.schedule import steps_within_budget

LOG = [
    {"step": 10, "epoch": 0.1, "loss": 5.0, "lr": 0.1, "images_per_s": 100.0},
    {"event": "time_budget", "step": 30, "budget_s": 60.0},
    {"event": "knn", "step": 40, "epoch": 0.4, "images": 2560, "train_s": 20.4,
     "knn_top1": 0.41},
    {"event": "knn", "step": 79, "epoch": 0.79, "images": 5056, "train_s": 40.1,
     "knn_top1": 0.55},
    {"event": "knn", "step": 120, "epoch": 1.2, "images": 7680, "train_s": 58.3,
     "knn_top1": 0.62},
    {"event": "end", "steps": 120, "knn_top1": 0.62},
]


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "log.jsonl"
    # out of order on purpose, and a line cut short by a kill
    lines = [json.dumps(r) for r in (LOG[0], LOG[1], LOG[3], LOG[2], LOG[4], LOG[5])]
    path.write_text("\n".join(lines) + '\n{"event": "knn", "st\n')
    return path


def test_read_curve(log_file, tmp_path):
    assert read_curve(log_file) == [
        {"seconds": 20.4, "images": 2560, "epoch": 0.4, "knn_top1": 0.41},
        {"seconds": 40.1, "images": 5056, "epoch": 0.79, "knn_top1": 0.55},
        {"seconds": 58.3, "images": 7680, "epoch": 1.2, "knn_top1": 0.62},
    ]
    assert read_curve(tmp_path / "absent.jsonl") == []


def test_equal_time_values_and_time_to_reach(log_file):
    curve = read_curve(log_file)
    assert grid(60, 20) == [20, 40, 60]
    assert grid(20, 10) == [10, 20]
    # the last evaluation at most half an interval (10 s) after t
    assert value_at(curve, 10, 20) is None
    assert value_at(curve, 20, 20) == 0.41
    assert value_at(curve, 40, 20) == 0.55
    assert value_at(curve, 60, 20) == 0.62
    assert value_at(curve, 40, 0.1) == 0.41  # 40.1 lies beyond 40 + 0.05
    assert time_to_reach(curve, 0.5) == 40.1
    assert time_to_reach(curve, 0.62) == 58.3
    assert time_to_reach(curve, 0.63) is None


def test_result_rows_against_hand_computed_ratios(log_file):
    ours = read_curve(log_file)
    peer = [{"seconds": 31.0, "images": 1000, "epoch": 0.2, "knn_top1": 0.5},
            {"seconds": 59.0, "images": 3000, "epoch": 0.6, "knn_top1": 0.58}]
    curves = {"simclr-fast/torchvision": ours, "lightly": peer}
    flat = {"raw-pixels": 0.29, "random-init": 0.2}
    linear = {"simclr-fast/torchvision": 0.8, "lightly": 0.64, "raw-pixels": 0.32,
              "random-init": 0.16}
    rows, reach = result_rows(curves, flat, linear, budget=60, every=20)
    got = {(r["case"], r["impl"], r["metric"]): (r["value"], r["ratio"]) for r in rows}
    ours_impl = "simclr-fast/torchvision"
    assert ("t=20s", "lightly", "knn_top1") not in got  # the peer has no evaluation by 30 s
    assert got[("t=20s", ours_impl, "knn_top1")][0] == 0.41
    assert math.isnan(got[("t=20s", ours_impl, "knn_top1")][1])
    assert got[("t=40s", ours_impl, "knn_top1")] == pytest.approx((0.55, 0.55 / 0.5))
    assert got[("t=40s", "lightly", "knn_top1")] == (0.5, 1.0)
    assert got[("t=60s", ours_impl, "knn_top1")] == pytest.approx((0.62, 0.62 / 0.58))
    assert got[("final", "raw-pixels", "knn_top1")] == pytest.approx((0.29, 0.5))
    assert got[("final", "random-init", "linear_top1")] == pytest.approx((0.16, 0.25))
    assert got[("final", ours_impl, "linear_top1")] == pytest.approx((0.8, 1.25))
    assert got[("final", ours_impl, "images_per_s")] == pytest.approx(
        (7680 / 58.3, (7680 / 58.3) / (3000 / 59.0)))
    # the peer's final 0.58 is first reached by ours at 58.3 s, by the peer itself at 59 s
    assert reach == {ours_impl: 58.3, "lightly": 59.0}
    assert got[("final", ours_impl, "time_to_peer_final_s")] == pytest.approx(
        (58.3, 58.3 / 59.0))
    assert benchmark.contract_problems({"device": "cpu", "versions": {}, "settings": {},
                                        "results": rows}) == []


def test_images_per_s_ignores_a_final_evaluation_after_the_last_step():
    curve = [{"seconds": 10.0, "images": 640, "epoch": 0.1, "knn_top1": 0.3},
             {"seconds": 20.0, "images": 1280, "epoch": 0.2, "knn_top1": 0.4},
             {"seconds": 26.0, "images": 1280, "epoch": 0.2, "knn_top1": 0.4}]
    assert images_per_s(curve) == 64.0
    assert images_per_s([]) is None


def test_without_the_peer_every_ratio_is_nan(log_file):
    rows, reach = result_rows({"simclr-fast/dali": read_curve(log_file)}, {"raw-pixels": 0.3},
                              {"simclr-fast/dali": 0.7, "raw-pixels": 0.3}, 60, 20)
    assert rows and all(math.isnan(r["ratio"]) for r in rows)
    assert reach == {"simclr-fast/dali": None}
    assert "time_to_peer_final_s" not in {r["metric"] for r in rows}


def _simulate(plan: BudgetPlan, seconds_of_step) -> tuple[int, float, list[float]]:
    """The peer's loop on a simulated clock: (steps, training seconds, each step's LR)."""
    step, t, lrs = 0, 0.0, []
    while not plan.done(step, t):
        lrs.append(plan.lr(step))
        step += 1
        t += seconds_of_step(step)
        plan.after_step(step, t)
    return step, t, lrs


def test_the_peer_trains_its_whole_budget_however_the_pace_drifts():
    budget, peak = 281.0, 0.12

    def faster_later(step):  # the reported case: the timed steps slower than the rest
        return 1.3 if step <= TIMED_TO else 1.0

    # the old plan, fitted once from steps 10..30, ends after 218 s of the 281 (78%)
    planned = steps_within_budget(budget, TIMED_TO * 1.3, TIMED_TO, 1.3, cap=10**6)
    old_s = TIMED_TO * 1.3 + (planned - TIMED_TO) * 1.0
    assert old_s / budget < 0.8
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.3, 0.7, 2000)
    for pace in (faster_later, lambda s: 0.8 if s <= 100 else 1.2, lambda s: noise[s]):
        steps, seconds, lrs = _simulate(BudgetPlan(peak, budget, cap=10**6), pace)
        assert abs(seconds / budget - 1) <= 0.02, seconds
        assert lrs[0] == pytest.approx(peak, rel=1e-3)  # lightly's cosine: no warm-up
        assert lrs[-1] <= 0.02 * peak  # the schedule decays to ~0 where the budget ends
        assert steps > planned - 50
    # the cap (optim.epochs) still ends a run early, with the cosine at its end there
    steps, seconds, lrs = _simulate(BudgetPlan(peak, budget, cap=100), faster_later)
    assert steps == 100 and seconds < budget and lrs[-1] == 0.0
    # a budget shorter than the timing window: no re-plan, the clock alone ends it
    steps, seconds, _ = _simulate(BudgetPlan(peak, 5.0, cap=10**6), lambda s: 1.0)
    assert (steps, seconds) == (5, 5.0) and TIMED_FROM > 5


def test_budget_check_and_its_warning():
    assert budget_check(98.1, 100.0) == {"train_s": 98.1, "budget_s": 100.0,
                                         "ratio": pytest.approx(0.981), "ok": True}
    assert budget_check(102.0, 100.0)["ok"] is True
    assert budget_check(97.9, 100.0)["ok"] is False and budget_check(102.1, 100)["ok"] is False
    assert budget_check(None, 100.0)["ok"] is False
    assert budget_check(50.0, 0.0)["ok"] is None  # no budget: nothing to check
    assert budget_warning("lightly", budget_check(222.0, 281.0)) == (
        "lightly: trained 222.0 s of its 281 s budget (-21.0%, beyond +-2%)")
    assert budget_warning("x", budget_check(280.0, 281.0)) is None


def _numpy_knn(train_x, train_y, test_x, test_y, k, t=0.07):
    """Weighted cosine kNN (Wu et al. 2018), written independently in numpy, float64."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b @ a.T
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(len(b)):
        nn = np.argsort(-sim[i], kind="stable")[:k]
        votes = np.zeros(classes)
        np.add.at(votes, train_y[nn], np.exp(sim[i, nn] / t))
        correct += int(votes.argmax() == test_y[i])
    return correct / len(b)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return subset_dataset(tmp_path_factory, 600, 200)


def test_raw_pixel_knn_matches_a_numpy_knn(small_dataset):
    from pipelines.sources import open_dataset

    cfg = load_config(REPO / "train/configs/fashion_mnist_demo.yaml",
                      [f"--data.path={small_dataset}", "--train.knn_train_samples=400",
                       "--train.knn_k=20"])
    ds = open_dataset(small_dataset)
    train, test = ds.split("train"), ds.split("test")
    bank = np.random.default_rng(cfg.train.seed).choice(600, 400, replace=False)

    def pixels(split, idx):  # the un-augmented eval view of 28x28 gray images: (x/255 - m) / s
        x = np.asarray(split.images[idx], dtype=np.float64)[..., 0].reshape(len(idx), -1)
        return (x / 255 - cfg.augment.mean[0]) / cfg.augment.std[0]

    want = _numpy_knn(pixels(train, bank), train.labels[bank], pixels(test, np.arange(200)),
                      test.labels, k=20)
    assert raw_pixel_knn(cfg, train, test) == pytest.approx(want, abs=1 / 200)
    assert 0.5 < want < 1  # pixels of Fashion-MNIST are far better than chance


def test_peer_transform_follows_the_spec():
    spec = AugmentSpec(size=28, crop_area=(0.2, 1.0), flip_p=0.4, jitter_strength=0.5,
                       jitter_p=0.7, grayscale_p=0.1, blur_p=0.3, blur_sigma=(0.2, 1.5),
                       mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    kw = transform_kwargs(spec)
    assert kw == {"input_size": 28, "min_scale": 0.2, "hf_prob": 0.4, "vf_prob": 0.0,
                  "rr_prob": 0.0, "cj_prob": 0.7, "cj_strength": 0.5, "cj_bright": 0.8,
                  "cj_contrast": 0.8, "cj_sat": 0.8, "cj_hue": 0.2, "random_gray_scale": 0.1,
                  "gaussian_blur": 0.3, "sigmas": (0.2, 1.5),
                  "normalize": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    # lightly multiplies each jitter factor by cj_strength: the spec's own figures come out
    for field, factor in (("brightness", "cj_bright"), ("contrast", "cj_contrast"),
                          ("saturation", "cj_sat"), ("hue", "cj_hue")):
        assert kw[factor] * kw["cj_strength"] == pytest.approx(getattr(spec, field))
    pytest.importorskip("lightly.transforms", exc_type=ImportError)
    from lightly.transforms import SimCLRTransform
    from PIL import Image

    views = SimCLRTransform(**kw)(Image.new("RGB", (40, 40), (120, 60, 30)))
    assert [tuple(v.shape) for v in views] == [(3, 28, 28), (3, 28, 28)]


def test_plot_is_a_png_of_the_curves(tmp_path, log_file):
    from PIL import Image

    from tools.bench_quality import plot_curves

    path = tmp_path / "curves.png"
    plot_curves(path, {"simclr-fast/dali": read_curve(log_file)},
                {"raw-pixels": 0.3, "random-init": 0.2}, "title")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (800, 500)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines, text, not a blank page


def test_errors_are_one_line(tmp_path, capsys):
    for args, text in (
        (["--data", str(tmp_path / "none")], "no dataset at"),
        (["--backends", "torchvision,nope"], "unknown backend(s) 'nope'"),
        (["--budget", "10", "--every", "20"], "--every 20 exceeds --budget 10"),
        (["--set", "model.width"], "is not KEY=VALUE"),
        (["--set", "model.nope=1"], "unknown key 'model.nope'"),
    ):
        assert main(["--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bench_quality: error: ") and text in err, err
        assert "\n" not in err


@pytest.mark.slow(reason="pretrains each contender for 10 s in its own process, then probes")
@pytest.mark.timeout(900)
def test_quick_run_writes_the_contract(tmp_path, small_dataset, capsys, torch_threads):
    from PIL import Image

    path = tmp_path / "quality.json"
    # one thread per contender: the suite runs a worker per core (torch_threads restores this
    # process's count, which main() sets to --threads)
    assert main(["--quick", "--device", "cpu", "--data", str(small_dataset), "--threads", "1",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert benchmark.contract_problems(report) == []
    assert report["settings"]["quick"] is True
    assert set(report) == {*benchmark.CONTRACT_KEYS, "curves", "linear_top1",
                           "time_to_peer_final_s", "train_seconds", "budget_check"}
    # every contender's training seconds, against the budget (10 s) within 2%
    assert set(report["train_seconds"]) == set(report["curves"])
    for name, seconds in report["train_seconds"].items():
        check = report["budget_check"][name]
        assert check["train_s"] == seconds and check["budget_s"] == 10.0
        assert check["ratio"] == pytest.approx(seconds / 10.0)
    peer = "lightly" in report["curves"]
    if peer:  # every row's baseline row is there: the harness's full contract
        check_contract({k: report[k] for k in benchmark.CONTRACT_KEYS}, "cpu")
    else:
        assert "lightly" in report["settings"]["skipped"]
        assert all(math.isnan(r["ratio"]) for r in report["results"])
    assert set(report["curves"]) == {"simclr-fast/torchvision"} | ({"lightly"} if peer else set())
    for curve in report["curves"].values():
        assert curve and all(0 <= p["knn_top1"] <= 1 for p in curve)
        assert [p["seconds"] for p in curve] == sorted(p["seconds"] for p in curve)
    assert set(report["linear_top1"]) >= {"raw-pixels", "random-init", "simclr-fast/torchvision"}
    cases = {r["case"] for r in report["results"]}
    assert {"t=10s", "final"} <= cases
    with Image.open(path.with_suffix(".png")) as img:
        assert img.size == (800, 500)
    assert "impl" in capsys.readouterr().out
