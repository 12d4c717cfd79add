"""The JSON contract of tools/benchmark.py that every benchmark keeps, and each benchmark's
headline() of its JSON (both checked on each benchmark as `gpu_check --device cpu --quick` runs
it, in test_gpu_check.py; here on small reports), and the harness's ratio rule."""

from __future__ import annotations

import copy
import importlib
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

# benchmark -> (the metrics and the top-level keys its headline() reads): a report without one
# of them must fail the headline with a KeyError naming it
HEADLINE_READS = {
    "bench_loader": (("images_per_s", "first_batch_s_cold", "first_batch_s_warm"),
                     ("results", "settings")),
    "bench_loss": (("largest_2N", "time_ms"), ("results",)),
    "bench_optim": (("step_ms",), ("results",)),
    "bench_train": (("images_per_s", "achieved_tflops"), ("results", "settings")),
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


def _loss_figures(rows: list[dict]) -> list[str]:
    largest = {r["impl"]: int(r["value"]) for r in rows if r["case"] == "largest"}
    figures = [f"{impl} largest 2N={largest[impl]:,}" for impl in ("triton", "chunked")
               if impl in largest] + [f"reference {largest['reference']:,}"]
    fast = "triton" if "triton" in largest else "chunked"
    at = max((r for r in rows if r["impl"] == fast and r["metric"] == "time_ms"
              and r["baseline"] == "reference" and math.isfinite(r["ratio"])
              and int(r["case"][3:]) <= 32768), key=lambda r: int(r["case"][3:]))
    figures.append(f"at 2N={int(at['case'][3:]):,}: {fast} {1 / at['ratio']:.2f}x the "
                   f"reference's speed")
    figures += [f", 1/{1 / r['ratio']:.0f} of its memory" for r in rows
                if (r["case"], r["impl"], r["metric"]) == (at["case"], fast, "peak_extra_MiB")
                and math.isfinite(r["ratio"])]
    return figures


def expected_figures(name: str, report: dict) -> list[str]:
    """What a benchmark's headline must show, formatted here from its JSON's values."""
    rows = report["results"]
    if name == "bench_loss":
        return _loss_figures(rows)
    value = {(r["case"], r["impl"], r["metric"]): r["value"] for r in rows}
    figures = [f"{k} skipped" for k in report["settings"].get("skipped", {})]
    figures += [f"{group} micro-batch {t['micro_batch']} targets: "  # bench_train --micro-batch
                for group, t in report["settings"].get("micro", {}).get("targets", {}).items()]
    for r in rows:
        case, impl, metric, base = r["case"], r["impl"], r["metric"], r["baseline"]
        if name == "bench_optim" and (impl, metric, base) == ("lars", "step_ms", "sgd_foreach"):
            per_param = value[(case, "lars_reference", "step_ms")] / r["value"]
            figures.append(f"{case}: {r['value']:.2f} ms ({r['ratio']:.2f}x foreach SGD, "
                           f"{per_param:.1f}x the per-parameter form)")
        elif name in ("bench_train", "bench_loader") and metric == "images_per_s":
            figures.append(f"{case} {impl}: {r['value']:.0f} img/s")
            if impl == base and name == "bench_train":
                figures.append(f", {value[(case, impl, 'achieved_tflops')]:.1f} TFLOP/s")
            elif impl != base:
                figures.append(f" ({r['ratio']:.2f}x {base})")
            if name == "bench_train" and (case, impl, "peak_mem_mb") in value:
                figures.append(f", peak {value[(case, impl, 'peak_mem_mb')]:.0f} MB")
            cold, warm = (value.get((case, impl, f"first_batch_s_{t}")) for t in ("cold", "warm"))
            if name == "bench_loader" and cold is not None:
                figures.append(f"first batch {cold:.1f} s cold / {warm:.1f} s warm")
    return figures


def check_headline(name: str, report: dict) -> str:
    """`tools.<name>.headline` of the benchmark's report: one line holding the report's figures;
    the same report with a metric the headline reads renamed, or without a key it reads, fails
    it with a KeyError naming that metric or key. Returns the line."""
    headline = importlib.import_module(f"tools.{name}").headline
    line = headline(report)
    assert line and "\n" not in line
    figures = expected_figures(name, report)
    assert figures and all(f in line for f in figures), (figures, line)
    metrics, keys = HEADLINE_READS[name]
    for metric in metrics:
        renamed = copy.deepcopy(report)
        for r in renamed["results"]:
            r["metric"] = r["metric"] + "_v2" if r["metric"] == metric else r["metric"]
        with pytest.raises(KeyError, match=metric):
            headline(renamed)
    for key in keys:
        with pytest.raises(KeyError, match=key):
            headline({k: v for k, v in report.items() if k != key})
    return line


def _report(rows: list[list[dict]], **settings) -> dict:
    return {"device": "cpu", "versions": {}, "settings": settings, "results": sum(rows, [])}


# small reports of each benchmark's shape, and the headline gpu_check has shown for them
SMALL = {
    "bench_loss": (_report([
        benchmark.rows("2N=1024", "time_ms", {"reference": 4.0, "chunked": 2.5}, "reference"),
        benchmark.rows("2N=1024", "peak_extra_MiB", {"reference": 64.0, "chunked": 8.0},
                       "reference"),
        benchmark.rows("2N=2048", "time_ms", {"chunked": 9.0}, "chunked"),  # reference ran out
        benchmark.rows("largest", "largest_2N", {"reference": 1024.0, "chunked": 2048.0},
                       "reference")]),
        "chunked largest 2N=2,048; reference 1,024; at 2N=1,024: chunked 1.60x the reference's "
        "speed, 1/8 of its memory"),
    "bench_optim": (_report([benchmark.rows("resnet18", "step_ms", {
        "lars": 2.0, "lars_reference": 8.0, "sgd_foreach": 4.0}, "sgd_foreach")]),
        "resnet18: 2.00 ms (0.50x foreach SGD, 4.0x the per-parameter form)"),
    "bench_train": (_report([
        benchmark.rows("resnet18-32", "images_per_s", {"synthetic": 100.0, "torchvision": 40.0},
                       "synthetic"),
        benchmark.rows("resnet18-32", "achieved_tflops", {"synthetic": 0.52, "torchvision": 0.21},
                       "synthetic")], skipped={"resnet18-32/dali": "no DALI"}),
        "resnet18-32 synthetic: 100 img/s, 0.5 TFLOP/s; resnet18-32 torchvision: 40 img/s (0.40x "
        "synthetic); resnet18-32/dali skipped"),
    "bench_loader": (_report([
        benchmark.rows("array32", "images_per_s", {"torchvision": 900.0, "dali": 1800.0},
                       "torchvision"),
        benchmark.rows("array32", "first_batch_s_cold", {"torchvision": 3.04, "dali": 5.0},
                       "torchvision"),
        benchmark.rows("array32", "first_batch_s_warm", {"torchvision": 1.0, "dali": 0.61},
                       "torchvision")], skipped={"jpeg224": "no JPEGs"}),
        "array32 torchvision: 900 img/s, first batch 3.0 s cold / 1.0 s warm; array32 dali: "
        "1800 img/s (2.00x torchvision), first batch 5.0 s cold / 0.6 s warm; jpeg224 skipped"),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_headline_of_a_small_report_and_a_loud_failure_without_a_key(name):
    report, line = SMALL[name]
    check_contract(report | {"versions": {"python": "3", "torch": "2", "cpu": "x",
                                          **dict.fromkeys(benchmark.PACKAGES)}}, "cpu")
    assert check_headline(name, report) == line


def test_bench_train_headline_names_the_micro_figures():
    """bench_train --micro-batch: the plain (synthetic) and micro-batched rows with their peak
    memory over the smallest batch's plain step; a micro row whose plain step did not fit is its
    own baseline (its TFLOP/s shown, no ratio); the targets' verdicts."""
    micro = "synthetic-micro"
    rows = []
    for case, values in (("r-28-b256", {"synthetic": (300.0, 0.12, 400.0)}),
                         ("r-28-b4096", {"synthetic": (280.0, 0.11, 5000.0),
                                         micro: (240.0, 0.09, 480.0)}),
                         ("r-28-b8192", {micro: (230.0, 0.04, 560.0)})):
        base = "synthetic" if "synthetic" in values else micro
        for i, metric in enumerate(("images_per_s", "achieved_tflops", "peak_mem_mb")):
            rows.append(benchmark.rows(case, metric, {k: v[i] for k, v in values.items()}, base))
        rows.append(benchmark.rows(case, "peak_mem_vs_smallest_plain",
                                   {k: v[2] / 400.0 for k, v in values.items()}, base))
    report = _report(rows, skipped={"r-28-b8192/synthetic": "does not fit: estimated ..."},
                     micro={"targets": {"r-28": {"micro_batch": 256, "memory": {"met": True},
                                                 "speed": {"met": False}}}})
    check_contract(report | {"versions": {"python": "3", "torch": "2", "cpu": "x",
                                          **dict.fromkeys(benchmark.PACKAGES)}}, "cpu")
    assert check_headline("bench_train", report) == (
        "r-28-b256 synthetic: 300 img/s, 0.1 TFLOP/s, peak 400 MB; "
        "r-28-b4096 synthetic: 280 img/s, 0.1 TFLOP/s, peak 5000 MB (12.50x the smallest "
        "batch's plain); "
        "r-28-b4096 synthetic-micro: 240 img/s (0.86x synthetic), peak 480 MB (1.20x the "
        "smallest batch's plain); "
        "r-28-b8192 synthetic-micro: 230 img/s, 0.0 TFLOP/s, peak 560 MB (1.40x the smallest "
        "batch's plain); "
        "r-28 micro-batch 256 targets: peak <= 1.5x met, img/s >= 0.70x MISSED; "
        "r-28-b8192/synthetic skipped")


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
