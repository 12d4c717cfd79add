"""tools.gpu_check: the step runner under failures and hangs, pytest's report, the benchmark
contract, each step's headline (and a headline that cannot read its results), and the whole
check at toy sizes on the CPU (so it cannot rot between GPU sessions)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fashion_mnist import REPO, fashion_mnist_dir
from tests.tools.test_benchmarks import EXPECTED, check_contract, check_headline
from tools import gpu_check as gc
from tools import quality_check
from tools.benchmark import environment_headline

PY = sys.executable
# The tests that read the one `gpu_check --device cpu --quick` run of this module.
quick_check = pytest.mark.slow(reason="reads the whole `gpu_check --device cpu --quick` run "
                                      "(every benchmark and a pretraining, about 90 s)")


@pytest.fixture(scope="module")
def gpu_check_quick(tmp_path_factory) -> dict:
    """`python -m tools.gpu_check --device cpu --quick` once (the 32x32 array cases only: no JPEG
    folder): its process and report path. Its steps run every benchmark as a user does
    (`python -m tools.bench_X --device cpu --quick ... --json PATH`), so the benchmarks' contract
    is checked on the JSON they wrote here rather than by running each one again."""
    root = tmp_path_factory.mktemp("gpu-check-quick")
    out, report = root / "gc", root / "report.json"
    env = {**os.environ, "SIMCLR_IMAGENET_SAMPLE": str(root / "no-images")}
    proc = subprocess.run([PY, "-m", "tools.gpu_check", "--device", "cpu", "--quick",
                           "--budget-s", "600", "--out", str(out), "--json", str(report)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    return {"proc": proc, "report_path": report}


def _step(name: str, code: str, tmp: Path, weight: float = 1.0, result: bool = True,
          headline: str | None = None) -> gc.Step:
    rf = tmp / f"{name}.json" if result else None
    argv = [PY, "-c", textwrap.dedent(code)] + ([str(rf)] if rf else [])
    return gc.Step(name, f"test step {name}", weight, argv, rf, headline=headline)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_hanging_step_and_its_children_are_killed_at_the_limit_with_the_log_tail(tmp_path):
    pid_file = tmp_path / "child.pid"
    step = _step("train", f"""
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "300"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("working on it", flush=True)
        time.sleep(300)
    """, tmp_path, result=False)
    t0 = time.perf_counter()
    rec = gc.run_step(step, limit_s=3.0, log_path=tmp_path / "train.log")
    assert time.perf_counter() - t0 < 3.0 + gc.KILL_GRACE_S + 5
    assert rec["timed_out"] and rec["limit_s"] == 3.0
    assert "working on it" in rec["log_tail"]
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the step's own child outlived the kill"
    gc.finish_record(step, rec)
    assert rec["status"] == "timeout" and "killed after its 3 s share" in rec["headline"]
    assert "working on it" in rec["headline"]  # the last log line is quoted


def test_failing_and_contract_breaking_steps_are_reported_and_the_run_goes_on(
        tmp_path, monkeypatch):
    good = {"device": "cpu", "versions": {}, "settings": {},
            "results": [{"case": "c", "impl": "lars", "metric": "step_ms", "value": 2.0,
                         "baseline": "sgd_foreach", "ratio": 0.5},
                        {"case": "c", "impl": "lars_reference", "metric": "step_ms", "value": 8.0,
                         "baseline": "sgd_foreach", "ratio": 2.0}]}
    bad = {"device": "cpu", "versions": {},
           "results": [{"case": "c", "impl": "x", "metric": "m", "value": 1.0}]}
    write = "import json, sys; json.dump({!r}, open(sys.argv[1], 'w'))"
    steps = [
        _step("loss-fp32", "import sys; print('boom: CUDA error', flush=True); sys.exit(3)",
              tmp_path, weight=1),
        _step("loss-bf16", "import time; time.sleep(60)", tmp_path, weight=1),
        _step("optim", write.format(good), tmp_path, weight=1, headline="tools.bench_optim"),
        _step("train", write.format(bad), tmp_path, weight=1),
        gc.Step("loader", "no images", 1, None, None, skip="no --images DIR given"),
    ]
    monkeypatch.setattr(gc, "plan_steps", lambda args, out: steps)
    args = gc.build_parser().parse_args(["--device", "cpu", "--budget-s", "12",
                                         "--out", str(tmp_path)])
    t0 = time.perf_counter()
    report = gc.run_all(args)
    assert time.perf_counter() - t0 < 12 + gc.KILL_GRACE_S + 5
    by = {r["name"]: r for r in report["steps"]}
    assert ([r["name"] for r in report["steps"]]
            == ["loss-fp32", "loss-bf16", "optim", "train", "loader"])
    assert by["loss-fp32"]["status"] == "fail" and by["loss-fp32"]["returncode"] == 3
    assert "boom: CUDA error" in by["loss-fp32"]["headline"]
    assert by["loss-bf16"]["status"] == "timeout"
    assert (by["optim"]["status"] == "pass"
            and "4.0x the per-parameter form" in by["optim"]["headline"])
    assert by["train"]["status"] == "fail" and "baseline" in by["train"]["headline"]
    assert by["loader"]["status"] == "skip" and by["loader"]["headline"] == "no --images DIR given"
    assert report["counts"] == {"pass": 1, "fail": 2, "timeout": 1, "skip": 1}
    # the hanging step got a share of the budget, not all of it: 12 s over four runnable steps
    assert by["loss-bf16"]["limit_s"] < 6


def test_a_headline_that_cannot_read_its_results_fails_its_step_and_names_the_key(tmp_path):
    """A benchmark JSON that keeps the contract but lacks a metric its headline reads (here
    bench_optim's rows where bench_loss's are expected, as after a renamed metric)."""
    rows = [{"case": "c", "impl": "lars", "metric": "step_ms", "value": 2.0,
             "baseline": "lars", "ratio": 1.0}]
    report = {"device": "cpu", "versions": {}, "settings": {}, "results": rows}
    step = _step("loss-fp32", f"import json, sys; json.dump({report!r}, open(sys.argv[1], 'w'))",
                 tmp_path, headline="tools.bench_loss")
    rec = gc.finish_record(step, gc.run_step(step, 60.0, tmp_path / "loss.log"))
    assert rec["returncode"] == 0 and rec["results"] == report
    assert rec["status"] == "fail", rec
    assert rec["headline"].startswith("headline failed: tools.bench_loss.headline could not read "
                                      "the results: KeyError"), rec["headline"]
    assert "largest_2N" in rec["headline"] and "time_ms" in rec["headline"]


QUALITY = {"encoder_top1": 0.8123, "raw_pixels_top1": 0.7901, "finetune_1pct_top1": 0.7012,
           "finetune_1pct_scratch_top1": None,
           "pretraining": {"wall_s": 61.4, "epochs": 2.04, "images_per_s": 1234.5}}
ENV = {"gpus": [], "cpu": {"cores": 2}, "driver": None,
       "torch": {"version": "2.5.0", "cuda": None},
       "optional": {"dali": {"ok": True}, "ffcv": {"ok": False, "error": "No module named 'ffcv'"}}}


def test_quality_and_environment_headlines_and_a_missing_key():
    assert quality_check.headline(QUALITY) == (
        "linear top-1 81.23% (raw pixels 79.01%) after 61 s, 2.0 epochs at 1234 img/s; 1% labels "
        "fine-tuned 70.12%")
    assert environment_headline(ENV) == ("no CUDA device (2 CPU cores); driver -, CUDA -, torch "
                                         "2.5.0; optional: dali")
    for key in QUALITY:
        with pytest.raises(KeyError, match=key):
            quality_check.headline({k: v for k, v in QUALITY.items() if k != key})
    with pytest.raises(KeyError, match="epochs"):
        quality_check.headline(QUALITY | {"pretraining": {"wall_s": 1.0, "images_per_s": 1.0}})
    for key in ENV:
        if key != "cpu":  # read only without a GPU
            with pytest.raises(KeyError, match=key):
                environment_headline({k: v for k, v in ENV.items() if k != key})


def test_budget_shares_pass_unused_time_forward():
    assert gc.share_of_budget([1, 1, 2], 100.0) == 25.0
    assert gc.share_of_budget([2], 30.0) == 30.0
    # a step that used 10 of its 25 s leaves 90 s for weights [1, 2]: the next gets 30, not 25
    assert gc.share_of_budget([1, 2], 90.0) == 30.0


def test_the_gpu_plan_times_the_micro_batched_step_within_the_budget(tmp_path):
    """On a GPU, train-micro runs ResNet-50 at 224 at batches up to 4096 with micro-batch 512,
    and the steps' weights still add up to the default budget."""
    args = gc.build_parser().parse_args(["--device", "cuda", "--out", str(tmp_path)])
    steps = {s.name: s for s in gc.plan_steps(args, tmp_path)}
    assert list(steps) == list(gc.STEP_NAMES)
    assert sum(s.weight for s in steps.values()) == args.budget_s == 480
    argv = steps["train-micro"].command({}, 40.0)
    assert argv[1:3] == ["-m", "tools.bench_train"]
    for flag, value in (("--device", "cuda"), ("--archs", "resnet50"), ("--sizes", "224"),
                        ("--batch-size", "1024,2048,4096"), ("--micro-batch", "512"),
                        ("--backends", "synthetic")):
        assert argv[argv.index(flag) + 1] == value, (flag, argv)


def test_pytest_junit_summary_against_a_real_pytest_run(tmp_path):
    """Counts and failure messages read back from what pytest itself wrote."""
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): pass
        def test_also_ok(): pass
        def test_broken(): assert 1 == 2, "one is not two"
        @pytest.mark.skip(reason="needs a CUDA device")
        def test_gpu(): pass
        def test_error(boom): pass
        @pytest.fixture
        def boom(): raise RuntimeError("fixture exploded")
    """))
    xml = tmp_path / "r.xml"
    subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path)],
                   cwd=tmp_path, capture_output=True)
    s = gc.summarise_tests(xml)
    assert (s["tests"], s["passed"], s["failures"], s["errors"], s["skipped"]) == (5, 2, 1, 1, 1)
    assert s["skip_reasons"] == {"needs a CUDA device": 1}
    msgs = {f["test"].split("::")[-1]: f for f in s["failed"]}
    assert ("one is not two" in msgs["test_broken"]["message"]
            and msgs["test_error"]["kind"] == "error")
    assert gc.summarise_tests(tmp_path / "missing.xml") is None


def test_contract_problems_names_what_is_missing():
    row = {"case": "c", "impl": "i", "metric": "m", "value": 1.0, "baseline": "i", "ratio": 1.0}
    assert gc.contract_problems({"device": "cpu", "versions": {}, "settings": {},
                                 "results": [row]}) == []
    assert gc.contract_problems(None) == ["no JSON written"]
    problems = gc.contract_problems({"device": "cpu",
                                     "results": [{k: v for k, v in row.items() if k != "ratio"}]})
    assert "missing 'versions'" in problems and "missing 'settings'" in problems
    assert any("['ratio']" in p for p in problems)


def test_cuda_without_a_gpu_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the error raised where CUDA is absent")
    proc = subprocess.run([PY, "-m", "tools.gpu_check", "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu_check: error: --device cuda but torch sees no CUDA device")
    assert "Traceback" not in proc.stderr


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


@quick_check
@pytest.mark.timeout(900)
def test_cpu_quick_run_covers_every_step_and_writes_the_report(gpu_check_quick):
    """The whole check at toy sizes: every step runs (or says why not), every benchmark's JSON keeps
    the contract, the report is strict JSON, and nothing fails or hangs."""
    proc = gpu_check_quick["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = _strict_json(gpu_check_quick["report_path"].read_text())
    assert report["tool"] == "gpu_check" and report["device"] == "cpu" and report["quick"]
    steps = {r["name"]: r for r in report["steps"]}
    assert list(steps) == list(gc.STEP_NAMES)
    for r in steps.values():
        assert r["status"] in gc.STATUSES and r["headline"], r["name"]
    assert sum(report["counts"].values()) == len(gc.STEP_NAMES)
    assert report["counts"]["fail"] == report["counts"]["timeout"] == 0
    assert report["seconds"] <= 600 + 30

    env_rec = report["environment"]
    assert env_rec["torch"]["version"] and env_rec["cpu"]["cores"] >= 1
    assert steps["env"]["headline"] == environment_headline(env_rec)
    assert f"torch {env_rec['torch']['version']}" in steps["env"]["headline"]
    assert set(env_rec["optional"]) == {"dali", "ffcv", "lightly"}
    for v in env_rec["optional"].values():
        assert v["ok"] or v["error"]  # a backend that does not import says why

    tests = steps["tests"]
    assert (tests["status"] == "skip" and tests["results"]["passed"] == 0
            and tests["results"]["tests"] >= 10)
    assert "needs a CUDA device" in tests["headline"]
    for name in ("loss-fp32", "loss-bf16", "optim", "train", "train-micro", "loader",
                 "train-loaders"):
        assert steps[name]["status"] == "pass", steps[name]
        assert gc.contract_problems(steps[name]["results"]) == [], name
        assert Path(steps[name]["log"]).is_file() and steps[name]["limit_s"] > 0
        # the headline is the benchmark's own headline() of the JSON it wrote (and the note)
        argv = steps[name]["command"]
        own = json.loads(Path(argv[argv.index("--json") + 1]).read_text())
        note = f" [{steps[name]['note']}]" if "note" in steps[name] else ""
        assert steps[name]["headline"] == importlib.import_module(argv[2]).headline(own) + note
    assert steps["loss-bf16"]["results"]["settings"]["dtype"] == "bfloat16"
    # the micro-batched step beside the plain one, each with its peak memory, and the verdicts
    micro = steps["train-micro"]["results"]
    peaks = {r["impl"]: r["value"] for r in micro["results"] if r["metric"] == "peak_mem_mb"}
    assert set(peaks) == {"synthetic", "synthetic-micro"} and min(peaks.values()) > 0, micro
    assert micro["settings"]["micro"]["targets"]["resnet18-16"]["verdicts"]
    assert "targets: peak <= 1.5x" in steps["train-micro"]["headline"]
    # each loader's time to first batch, cold and warm, in the headline
    ran = [r for r in steps["loader"]["results"]["results"] if r["metric"] == "images_per_s"]
    assert steps["loader"]["headline"].count("s cold /") == len(ran) >= 1, steps["loader"]

    q = steps["quality"]
    if fashion_mnist_dir() is None:
        assert q["status"] == "skip" and "Fashion-MNIST" in q["headline"]
    else:
        assert q["status"] == "pass", q
        res = q["results"]
        assert 0.1 < res["encoder_top1"] <= 1 and 0.1 < res["raw_pixels_top1"] <= 1
        assert (res["eval_count"] == 1000
                and res["pretraining"]["time_budget_s"] == res["time_budget_s"])
        assert math.isfinite(res["pretraining"]["images_per_s"])
        # after pretraining: fine-tuning on 1% of the labels, embeddings and a query
        assert 0.1 < res["finetune_1pct_top1"] <= 1 and res["embed_count"] == 10000
        assert math.isfinite(res["finetune_images_per_s"]) and res["embed_images_per_s"] > 0
        assert q["headline"] == quality_check.headline(res)
        assert (f"linear top-1 {100 * res['encoder_top1']:.2f}% (raw pixels "
                f"{100 * res['raw_pixels_top1']:.2f}%)" in q["headline"])
        assert f"1% labels fine-tuned {100 * res['finetune_1pct_top1']:.2f}%" in q["headline"]
    assert "step" in proc.stdout and "headline" in proc.stdout  # the table


# the gpu_check step that ran each benchmark (bench_train with real loaders: train-loaders)
STEP = {"bench_loader": "loader", "bench_loss": "loss-fp32", "bench_optim": "optim",
        "bench_train": "train-loaders"}


@quick_check
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_cpu_run_writes_the_contract(gpu_check_quick, name):
    """Each benchmark as gpu_check's quick run ran it: `python -m tools.<name> --device cpu --quick
    ... --json PATH`, a process of its own."""
    report = json.loads(gpu_check_quick["report_path"].read_text())
    step = next(s for s in report["steps"] if s["name"] == STEP[name])
    argv = step["command"]
    assert argv[1:3] == ["-m", f"tools.{name}"] and "--quick" in argv, argv
    assert argv[argv.index("--device") + 1] == "cpu", argv
    assert step["returncode"] == 0, step["log_tail"]
    path = Path(argv[argv.index("--json") + 1])
    printed = Path(step["log"]).read_text()
    assert f"wrote {path}" in printed and "impl" in printed  # the table's header
    report = json.loads(path.read_text())
    check_contract(report, "cpu")
    check_headline(name, report)  # its figures, and a KeyError without a key it reads
    assert report["settings"]["quick"] is True
    cases, metrics, impls = EXPECTED[name]
    rows = report["results"]
    assert {r["case"] for r in rows} == cases
    assert {r["metric"] for r in rows} == metrics
    assert impls <= {r["impl"] for r in rows}
