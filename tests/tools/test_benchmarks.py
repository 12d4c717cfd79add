"""The JSON contract of tools/benchmark.py that every benchmark keeps (checked on each benchmark
as `gpu_check --device cpu --quick` runs it, in test_gpu_check.py), and the harness's ratio rule."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.fashion_mnist import REPO
from tools import benchmark

# benchmark -> (cases, metrics, impls that must have rows); the array case only (no JPEGs)
EXPECTED = {
    "bench_loader": ({"array32"}, {"images_per_s", "first_batch_s_cold", "first_batch_s_warm"},
                     {"torchvision"}),
    "bench_loss": ({"2N=1024", "2N=2048", "largest"}, {"time_ms", "peak_extra_MiB", "largest_2N"},
                   {"reference", "chunked"}),
    "bench_optim": ({"resnet18", "resnet50"}, {"step_ms", "step_ms_min", "first_step_ms"},
                    {"lars", "lars_reference", "sgd_foreach", "sgd_foreach_nowd"}),
    "bench_train": ({"resnet18-32"},
                    {"images_per_s", "views_per_s", "step_ms", "step_ms_median", "data_wait_ms",
                     "compute_ms", "data_wait_frac", "achieved_tflops"},
                    {"synthetic", "torchvision"}),
}


def check_contract(report: dict, device: str) -> None:
    """The contract: four keys, six per row, ratio = value / the baseline's value for the same
    case and metric (NaN for a zero baseline), the baseline's own row present."""
    assert benchmark.contract_problems(report) == []
    assert set(report) == set(benchmark.CONTRACT_KEYS)
    assert report["device"] == device
    versions = report["versions"]
    assert {"python", "torch", "cpu", *benchmark.PACKAGES} <= set(versions)
    assert isinstance(versions["cpu"], str) and versions["cpu"]
    assert isinstance(report["settings"], dict)
    values, seen = {}, set()
    for r in report["results"]:
        assert set(r) == benchmark.CONTRACT_ROW, r
        for key in ("case", "impl", "metric", "baseline"):
            assert isinstance(r[key], str) and r[key], r
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
        assert isinstance(r["ratio"], float), r
        key = (r["case"], r["impl"], r["metric"], r["baseline"])
        assert key not in seen, f"duplicate row {key}"
        seen.add(key)
        values[(r["case"], r["impl"], r["metric"])] = r["value"]
    for r in report["results"]:
        base_key = (r["case"], r["baseline"], r["metric"])
        assert base_key in values, f"no row of the baseline {base_key}"
        base = values[base_key]
        if base == 0:
            assert math.isnan(r["ratio"]), r
        else:
            assert r["ratio"] == pytest.approx(r["value"] / base, rel=1e-12), r
        if r["impl"] == r["baseline"] and base:
            assert r["ratio"] == 1.0, r


def test_ratio_is_nan_without_a_baseline_value_and_survives_the_json(tmp_path, capsys):
    rows = benchmark.rows("c", "m", {"a": 0.0, "b": 2.0}, "a")
    rows += benchmark.rows("d", "m", {"b": 3.0}, "a")
    rows += benchmark.rows("e", "m", {"a": 4.0, "b": 2.0}, "a")
    assert [r["baseline"] for r in rows] == ["a"] * 5
    assert all(math.isnan(r["ratio"]) for r in rows[:3])
    assert [r["ratio"] for r in rows[3:]] == [1.0, 0.5]
    path = tmp_path / "sub" / "out.json"
    benchmark.write_json(path, {"device": "cpu", "versions": {}, "settings": {}, "results": rows})
    back = json.loads(path.read_text())["results"]
    assert math.isnan(back[0]["ratio"]) and back[4]["ratio"] == 0.5
    benchmark.print_table(rows, [("m", "m", "{:.1f}", "value"), ("x a", "m", "{:.2f}x", "ratio")])
    out = capsys.readouterr().out
    assert "nanx" in out and "0.50x" in out and f"wrote {path}" in out


def test_cuda_without_a_gpu_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error raised where CUDA is absent")
    proc = subprocess.run([sys.executable, "-m", "tools.bench_optim", "--device", "cuda"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("bench_optim: error: --device cuda but CUDA is not available: "
                                   "run with --device cpu")
