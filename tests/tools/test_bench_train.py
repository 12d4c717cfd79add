"""tools.bench_train: a tiny CPU run writes the benchmark JSON contract, ratios are value / the
synthetic baseline's value for the same case and metric, and throughputs are positive."""

from __future__ import annotations

import json
import math

import pytest

from tools.bench_train import build_parser, main

TINY = ["--device", "cpu", "--archs", "resnet18", "--width", "0.25", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_train") / "out.json"
    assert main(TINY + ["--sizes", "32", "--backends", "synthetic,torchvision",
                        "--json", str(path)]) == 0
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
    assert {r["impl"] for r in report["results"]} == {"synthetic", "torchvision"}
    assert {r["case"] for r in report["results"]} == {"resnet18-32"}
    assert "mfu" not in {r["metric"] for r in report["results"]}  # no known peak on a CPU


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


def test_missing_jpegs_skip_with_reason(tmp_path):
    path = tmp_path / "out.json"
    args = TINY + ["--sizes", "72", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                   "--backends", "synthetic,torchvision", "--images", str(tmp_path / "none"),
                   "--json", str(path)]
    assert main(args) == 0
    report = json.loads(path.read_text())
    assert {r["impl"] for r in report["results"]} == {"synthetic"}
    assert "no JPEGs" in report["settings"]["skipped"]["resnet18-72/torchvision"]


def test_cli_errors_and_help(capsys):
    assert main(["--device", "cpu", "--backends", "synthetic,nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    text = build_parser().format_help()
    assert "--quick" in text and "synthetic" in text
