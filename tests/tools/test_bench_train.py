"""tools.bench_train: a tiny CPU run writes the benchmark JSON contract, ratios are value / the
synthetic baseline's value for the same case and metric, and throughputs are positive; with
--micro-batch, the plain and micro-batched rows with their peak memory (each measured in a fresh
process), the memory bound checked against the plain step's own measurement, the fit estimate,
a killed cell reported as skipped, the targets' verdicts and one-line CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest

from tests.tools.test_benchmarks import check_contract, check_headline
from tools import bench_train
from tools.bench_train import MICRO, build_parser, main, micro_targets, plain_fit
from train.precision import cpu_native_bf16

# --precision auto on a CPU: the precision pretraining picks, the other one beside it
OTHER = "synthetic-fp32" if cpu_native_bf16() else "synthetic-bf16"

TINY = ["--device", "cpu", "--archs", "resnet18", "--width", "0.25", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--workers", "1"]
# Activations dominate the views here (no max-pool after the small stem: 32x32 feature maps), so
# the micro step's peak memory at batch 256 is about the plain step's at batch 32.
MICRO_RUN = ["--device", "cpu", "--archs", "resnet18", "--sizes", "32", "--width", "0.25",
             "--batch-size", "32,256", "--micro-batch", "32", "--steps", "1", "--warmup", "0",
             "--backends", "synthetic"]
micro_run = pytest.mark.slow(reason="reads a --micro-batch run: three cells, each in a fresh "
                                    "process (30-45 s on 2 cores)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_train") / "out.json"
    assert main(TINY + ["--sizes", "32", "--backends", "synthetic,torchvision",
                        "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def micro_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_train_micro") / "out.json"
    assert main(MICRO_RUN + ["--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_schema(report):
    assert set(report) == {"device", "versions", "settings", "results"}
    assert report["device"] == "cpu"
    assert isinstance(report["versions"], dict) and "torch" in report["versions"]
    assert report["settings"]["steps"] == 2 and report["settings"]["warmup"] == 1
    assert report["results"]
    for r in report["results"]:
        assert set(r) == {"case", "impl", "metric", "value", "baseline", "ratio"}
        assert (isinstance(r["case"], str) and isinstance(r["impl"], str)
                and isinstance(r["metric"], str))
        assert isinstance(r["value"], float) and isinstance(r["ratio"], float)
        assert r["baseline"] == "synthetic"
    assert {r["impl"] for r in report["results"]} == {"synthetic", OTHER, "torchvision"}
    assert {r["case"] for r in report["results"]} == {"resnet18-32"}
    p = report["settings"]["precision"]
    assert p["baseline"] == ("bf16" if cpu_native_bf16() else "fp32")
    assert p["others"] == {OTHER: OTHER.removeprefix("synthetic-")}
    metrics = {r["metric"] for r in report["results"]}
    assert "mfu" not in metrics  # no known peak on a CPU
    assert "peak_mem_mb" not in metrics and "micro" not in report["settings"]  # no --micro-batch


def test_ratios_are_value_over_baseline(report):
    values = {(r["case"], r["impl"], r["metric"]): r["value"] for r in report["results"]}
    for r in report["results"]:
        base = values[(r["case"], r["baseline"], r["metric"])]
        if base == 0:
            assert math.isnan(r["ratio"])
        else:
            assert r["ratio"] == pytest.approx(r["value"] / base, rel=1e-12)
        if r["impl"] == "synthetic" and base:
            assert r["ratio"] == 1.0


def test_throughput_and_split(report):
    by = {}
    for r in report["results"]:
        by.setdefault(r["impl"], {})[r["metric"]] = r["value"]
    for impl, m in by.items():
        assert m["images_per_s"] > 0, impl
        assert m["views_per_s"] == pytest.approx(2 * m["images_per_s"])
        assert m["step_ms"] == pytest.approx(m["data_wait_ms"] + m["compute_ms"])
        assert m["step_ms"] == pytest.approx(4 * 1e3 / m["images_per_s"])  # 4 images per step
        assert 0 <= m["data_wait_frac"] <= 1
        assert m["achieved_tflops"] > 0
    case = report["settings"]["cases"]["resnet18-32"]
    assert case["batch_size"] == 4 and case["training_flops_per_image"] > 0
    assert all(math.isfinite(v) for v in case["final_loss"].values())
    assert case["micro_batch"] == {"synthetic": 0, OTHER: 0, "torchvision": 0}


def test_the_other_precision_takes_the_same_steps(report):
    """The bf16 and fp32 rows train the same initialisation on the same views at the same
    learning rates: their losses after the steps agree to bf16's precision."""
    losses = report["settings"]["cases"]["resnet18-32"]["final_loss"]
    assert losses[OTHER] == pytest.approx(losses["synthetic"], rel=0.03)
    assert losses[OTHER] != losses["synthetic"]  # computed at another precision, not copied


def test_missing_jpegs_skip_with_reason(tmp_path):
    path = tmp_path / "out.json"
    args = TINY + ["--sizes", "72", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                   "--backends", "synthetic,torchvision", "--images", str(tmp_path / "none"),
                   "--json", str(path)]
    assert main(args) == 0
    report = json.loads(path.read_text())
    assert {r["impl"] for r in report["results"]} == {"synthetic", OTHER}  # needs no JPEGs
    assert "no JPEGs" in report["settings"]["skipped"]["resnet18-72/torchvision"]


def test_given_images_feed_the_small_sizes_too(tmp_path):
    """--images given explicitly: the 28 px case's loaders decode those JPEGs, not arrays."""
    from PIL import Image

    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (28, 28), (40 * i, 90, 200)).save(folder / f"{i}.jpg")
    path = tmp_path / "out.json"
    assert main(TINY + ["--sizes", "28", "--steps", "1", "--warmup", "0", "--precision", "fp32",
                        "--backends", "synthetic,torchvision", "--images", str(folder),
                        "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert {r["impl"] for r in report["results"]} == {"synthetic", "torchvision"}
    case = report["settings"]["cases"]["resnet18-28"]
    assert case["data"] == f"JPEGs from {folder}" and case["augment"]["size"] == 28
    assert report["settings"]["cases"]["resnet18-28"]["final_loss"]["torchvision"] > 0
    arrays = tmp_path / "arrays.json"  # without --images: random arrays at this size
    assert main(TINY + ["--sizes", "28", "--steps", "1", "--warmup", "0", "--precision", "fp32",
                        "--backends", "synthetic,torchvision", "--json", str(arrays)]) == 0
    case = json.loads(arrays.read_text())["settings"]["cases"]["resnet18-28"]
    assert case["data"] == "random uint8 arrays"


def _error_line(capsys, argv: list[str]) -> str:
    """The one error line of a command line argparse refuses (after its usage)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_cli_errors_and_help(capsys):
    assert main(["--device", "cpu", "--backends", "synthetic,nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    for bad in ("fp16", "fp32,fp32", ""):
        assert main(["--device", "cpu", "--precision", bad]) == 2
        assert "--precision takes fp32 and/or bf16" in capsys.readouterr().err
    prefix = "python -m tools.bench_train: error: argument"
    assert _error_line(capsys, ["--micro-batch", "-1"]) == (
        f"{prefix} --micro-batch: must be >= 0, got -1")
    assert _error_line(capsys, ["--batch-size", "256,1"]) == (
        f"{prefix} --batch-size: must be >= 2, got 1")
    assert _error_line(capsys, ["--batch-size", "256,x"]) == (
        f"{prefix} --batch-size: expected integers >= 2, comma-separated, got '256,x'")
    assert _error_line(capsys, ["--head-out", "0"]) == f"{prefix} --head-out: must be >= 1, got 0"
    args = build_parser().parse_args(["--batch-size", "4096, 256,1024,256", "--stem-pool"])
    assert args.batch_size == [256, 1024, 4096] and args.stem_pool and args.micro_batch == 0
    text = build_parser().format_help()
    assert "--quick" in text and "synthetic" in text
    assert "--micro-batch" in text and "--stem-pool" in text and "--head-out" in text


def _in_this_process(cell):
    """`_cell_in_fresh_process` without the process (for tests of the bookkeeping around it)."""
    run = bench_train.measure_cell(cell)
    return {**run, "peak_mem_mb": 100.0 + cell.batch_size, "memory_method": "fake"}, None


def test_a_micro_batch_not_smaller_than_the_batch_is_the_plain_step(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(bench_train, "_cell_in_fresh_process", _in_this_process)
    path = tmp_path / "out.json"
    assert main(TINY + ["--sizes", "16", "--micro-batch", "8", "--steps", "1", "--warmup", "0",
                        "--backends", "synthetic", "--stem-pool", "--head-out", "16",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "the micro-batch 8 is not smaller than the batch 4" in out
    report = json.loads(path.read_text())
    check_contract(report, "cpu")
    assert {r["impl"] for r in report["results"]} == {"synthetic"}
    case = report["settings"]["cases"]["resnet18-16"]
    assert case["micro_batch"] == {"synthetic": 0} and "not smaller" in case["note"]
    assert case["stem_pool"] is True and case["head_out"] == 16
    targets = report["settings"]["micro"]["targets"]["resnet18-16"]
    assert targets["memory"]["met"] is None and targets["speed"]["met"] is None
    assert "no micro-batched row" in targets["verdicts"][0]


def test_fit_estimate_from_the_largest_plain_cell():
    assert plain_fit([], 4096, 1000.0) is None  # nothing measured yet: the cell runs
    assert plain_fit([(256, 300.0)], 4096, None) is None  # available memory unknown
    # 2 MB per image at batch 512: batch 4096 needs ~8192 MB
    measured = [(256, 600.0), (512, 1024.0)]
    assert plain_fit(measured, 4096, 8192 / 0.69) is None
    reason = plain_fit(measured, 4096, 10000.0)
    assert reason == ("does not fit: estimated 8192 MB (2.00 MB per image at batch 512 x 4096) "
                      "> 70% of the 10000 MB available")


def test_fit_estimate_skips_the_plain_cell_and_its_real_loaders(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "_cell_in_fresh_process", _in_this_process)
    monkeypatch.setattr(bench_train.benchmark, "available_memory_bytes", lambda: 200 * 2**20)
    path = tmp_path / "out.json"
    assert main(TINY + ["--sizes", "16", "--batch-size", "4,8", "--micro-batch", "2",
                        "--steps", "1", "--warmup", "0", "--backends", "synthetic,torchvision",
                        "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    check_contract(report, "cpu")
    skipped = report["settings"]["skipped"]
    # 104 MB at batch 4 (the fake peak) -> 208 MB at batch 8 > 70% of 200 MB
    assert skipped["resnet18-16-b8/synthetic"].startswith("does not fit: estimated 208 MB")
    assert skipped["resnet18-16-b8/torchvision"].startswith("the plain step did not run")
    rows = {(r["case"], r["impl"], r["metric"]): r for r in report["results"]}
    lone = rows[("resnet18-16-b8", MICRO, "images_per_s")]
    assert lone["baseline"] == MICRO and lone["ratio"] == 1.0  # no plain step: its own baseline
    assert rows[("resnet18-16-b8", MICRO, "peak_mem_vs_smallest_plain")]["value"] == (
        pytest.approx(108 / 104))
    # the real loaders take the plain step where it fits, against the plain synthetic row
    loader = {m: r for (c, i, m), r in rows.items() if (c, i) == ("resnet18-16-b4", "torchvision")}
    assert loader["images_per_s"]["baseline"] == "synthetic" and "peak_mem_mb" not in loader
    assert report["settings"]["cases"]["resnet18-16-b4"]["micro_batch"]["torchvision"] == 0
    targets = report["settings"]["micro"]["targets"]["resnet18-16"]
    assert targets["speed"]["by_batch"]["8"] is None
    line = check_headline("bench_train", report)
    assert "resnet18-16-b8/synthetic skipped" in line


def _killed(cell, results):
    """A cell process the OS kills (as its out-of-memory killer would)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_cell_is_skipped_with_its_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "_cell_process", _killed)
    path = tmp_path / "out.json"
    assert main(TINY + ["--sizes", "16", "--micro-batch", "8", "--steps", "1", "--warmup", "0",
                        "--backends", "synthetic", "--json", str(path)]) == 0  # one cell: plain
    report = json.loads(path.read_text())
    assert report["settings"]["skipped"] == {"resnet18-16/synthetic": (
        "its process was killed by signal 9 (SIGKILL) (the OS ran out of memory?), exit code -9")}
    assert report["results"] == []


def test_targets_verdicts():
    by_batch = {
        256: {"synthetic": {"images_per_s": 100.0, "peak_mem_vs_smallest_plain": 1.0}},
        1024: {"synthetic": {"images_per_s": 100.0},
               MICRO: {"images_per_s": 80.0, "peak_mem_vs_smallest_plain": 1.2}},
        8192: {MICRO: {"images_per_s": 50.0, "peak_mem_vs_smallest_plain": 1.6}},
    }
    t = micro_targets("resnet18-28", 256, by_batch, 256)
    assert t["memory"] == {"target_max": 1.5, "reference_batch": 256,
                           "by_batch": {"1024": 1.2, "8192": 1.6}, "met": False}
    assert t["speed"] == {"target_min": 0.7, "by_batch": {"1024": 0.8, "8192": None}, "met": True}
    assert t["verdicts"] == [
        "resnet18-28 micro-batch 256: peak memory over the plain step's at batch 256: "
        "b1024 1.20x, b8192 1.60x (target <= 1.5x): met at b1024; MISSED at b8192",
        "resnet18-28 micro-batch 256: images/s over the plain step's at equal batch: "
        "b1024 0.80x, b8192 - (no plain step) (target >= 0.70x): met"]


@micro_run
def test_micro_rows_and_their_metrics(micro_report):
    check_contract(micro_report, "cpu")
    rows = {(r["case"], r["impl"], r["metric"]): r for r in micro_report["results"]}
    cases = micro_report["settings"]["cases"]
    assert set(cases) == {"resnet18-32-b32", "resnet18-32-b256"}
    assert cases["resnet18-32-b256"]["micro_batch"] == {"synthetic": 0, MICRO: 32}
    assert cases["resnet18-32-b32"]["micro_batch"] == {"synthetic": 0}
    for case in cases:
        for impl in ("synthetic", MICRO):
            if (case, impl, "images_per_s") not in rows:
                continue
            for metric in ("images_per_s", "peak_mem_mb", "peak_mem_vs_smallest_plain"):
                r = rows[(case, impl, metric)]
                assert r["baseline"] == "synthetic" and r["value"] > 0, r
    ips = rows[("resnet18-32-b256", MICRO, "images_per_s")]
    plain = rows[("resnet18-32-b256", "synthetic", "images_per_s")]
    assert ips["ratio"] == pytest.approx(ips["value"] / plain["value"], rel=1e-12)
    assert rows[("resnet18-32-b32", "synthetic", "peak_mem_vs_smallest_plain")]["value"] == 1.0
    micro = micro_report["settings"]["micro"]
    assert micro["micro_batch"] == 32 and micro["impl"] == MICRO
    assert micro["peak_memory"] and all(m.startswith(("VmHWM", "ru_maxrss"))
                                        for m in micro["peak_memory"])
    t = micro["targets"]["resnet18-32"]
    assert set(t["memory"]["by_batch"]) == set(t["speed"]["by_batch"]) == {"256"}
    assert t["speed"]["by_batch"]["256"] == pytest.approx(ips["ratio"])
    line = check_headline("bench_train", micro_report)
    assert f"resnet18-32-b256 {MICRO}: " in line and "resnet18-32 micro-batch 32 targets" in line


@micro_run
def test_micro_step_peak_memory_is_about_a_chunks_worth(micro_report):
    """The oracle is the plain step's own measurement: the micro step at batch 256 (chunks of 32)
    needs about what the plain step needs at batch 32, and the plain step at 256 clearly more."""
    peak = {(r["case"], r["impl"]): r["value"] for r in micro_report["results"]
            if r["metric"] == "peak_mem_mb"}
    plain32 = peak[("resnet18-32-b32", "synthetic")]
    plain256 = peak[("resnet18-32-b256", "synthetic")]
    micro256 = peak[("resnet18-32-b256", MICRO)]
    assert micro256 <= 1.5 * plain32, peak
    assert plain256 > 2 * plain32, peak
    t = micro_report["settings"]["micro"]["targets"]["resnet18-32"]
    assert t["memory"]["met"] is True and t["memory"]["reference_batch"] == 32
    assert t["memory"]["by_batch"]["256"] == pytest.approx(micro256 / plain32)
