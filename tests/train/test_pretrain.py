"""End-to-end pretraining on a slice of the real Fashion-MNIST: resume, processes, errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fashion_mnist import REPO, subset_dataset
from tests.marks import multi
from tests.processes import accelerate_launch, main_here
from train.checkpoint import load_model_weights, resolve_checkpoint

PY = sys.executable
TINY = [
    "--config", str(REPO / "train/configs/fashion_mnist_demo.yaml"),
    "--model.width=0.125", "--model.head_out=16", "--data.batch_size=32", "--data.num_workers=0",
    "--optim.epochs=2", "--optim.warmup_epochs=0.5",
    "--train.log_every=1", "--train.checkpoint_every=2", "--train.knn_every=-1",
    "--train.time_budget_s=0",  # the demo recipe has a budget: these runs count steps
]
if importlib.util.find_spec("nvidia.dali") is None:  # the demo recipe's DALI is optional: fall back
    TINY.append("--data.backend=torchvision")


SUBPROCESS = pytest.mark.slow(reason="pretrains in a subprocess")
TRAINS = pytest.mark.slow(reason="pretrains a few steps (in this process)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory, 256, 128)  # 8 steps of 32 per epoch


def run(args, *, launcher=(PY, "-m", "train.pretrain"), check=True, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-3000:]}")
    return proc


def run_here(args, capsys, *, check: bool = False) -> subprocess.CompletedProcess:
    """`train.pretrain`'s main() in this process (`main_here`): its exit status and what it
    printed, as `run` gives them. For runs that stop before training and single-process runs that
    need no signal."""
    from train.pretrain import main

    code = main_here(main, args)
    out, err = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"exit {code}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, code, out, err)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(resolve_checkpoint(run_dir))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@SUBPROCESS
@pytest.mark.timeout(600)
def test_resume_after_sigterm_reproduces_uninterrupted_run(dataset, tmp_path):
    common = [*TINY, f"--data.path={dataset}", "--train.max_steps=10"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run([*common, f"--train.out_dir={full}"])

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "-m", "train.pretrain", *common, f"--train.out_dir={cut}"],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cut / "log.jsonl").is_file() and any(r.get("step", 0) >= 3 and "loss" in r
                                                 for r in records(cut)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    proc.communicate(timeout=240)
    stopped = json.loads((cut / "summary.json").read_text())
    assert stopped["interrupted"] and 3 <= stopped["steps"] < 10, stopped

    run([*common, f"--train.out_dir={cut}", "--resume"])
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    resumed = [r for r in records(cut) if r.get("event") == "start"]
    assert [r["step"] for r in resumed] == [0, stopped["steps"]]


@multi
@pytest.mark.timeout(600)
def test_two_gloo_processes_really_run_and_match_one_process_forward(dataset, tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs starts two gloo processes.

    Their first step sees the same global batch as one process (shards + per-sample seeds), so with
    global BN and gathered negatives the first loss equals the one-process loss. Later steps are not
    compared in float32: this tiny network's gradients differ by percents under mere reordering of
    float32 sums; tests/model/test_global_batchnorm.py checks the exact equality in float64.
    """
    common = [*TINY, f"--data.path={dataset}", "--train.max_steps=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([*common, f"--train.out_dir={one}"])
    run([*common, f"--train.out_dir={two}"],
        launcher=accelerate_launch("train.pretrain"))
    start = next(r for r in records(two) if r.get("event") == "start")
    assert start["world"] == 2
    assert json.loads((two / "summary.json").read_text())["world"] == 2
    loss1 = [r["loss"] for r in records(one) if "loss" in r]
    loss2 = [r["loss"] for r in records(two) if "loss" in r]
    assert len(loss1) == len(loss2) == 3
    assert loss2[0] == pytest.approx(loss1[0], rel=1e-4)


@TRAINS
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_training_runs_with_each_fast_loader(backend, dataset, tmp_path, capsys):
    """`--data.backend` switches the loader; a run completes and its loss is finite and logged.
    (The shared dataset has its train.beton where FFCV imports.)"""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    run_here([*TINY, f"--data.path={dataset}", f"--data.backend={backend}",
              "--train.max_steps=3", f"--train.out_dir={tmp_path}"], capsys, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == backend and summary["steps"] == 3
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain: error:")]
    assert len(lines) >= 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_dataset_names_the_converter(tmp_path):
    """The command as users run it (`python -m train.pretrain`): the error tests below call its
    main() in the test's process, this one checks that the command ends the same way."""
    proc = run([*TINY, f"--data.path={tmp_path / 'nope'}", f"--train.out_dir={tmp_path / 'r'}"],
               check=False)
    _one_line_error(proc, "nope", "tools.convert")


def test_backend_that_does_not_import_is_a_one_line_error(dataset, tmp_path, capsys,
                                                           monkeypatch):
    import pipelines.loader as loader

    monkeypatch.setitem(loader._NEEDS, "dali",
                        ("no_such_module_for_this_test", "nvidia-dali-cuda130"))
    proc = run_here([*TINY, f"--data.path={dataset}", "--data.backend=dali",
                     f"--train.out_dir={tmp_path}"], capsys)
    _one_line_error(proc, "data.backend 'dali'", "nvidia-dali-cuda130",
                    "--data.backend=torchvision")


def test_bad_config_key_and_type(tmp_path, capsys):
    _one_line_error(run_here([*TINY, "--optim.lrr=0.1"], capsys), "optim.lrr", "optim.lr")
    _one_line_error(run_here([*TINY, "--data.batch_size=big"], capsys), "data.batch_size", "int")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the error raised where CUDA is absent")
def test_triton_loss_without_cuda_is_a_config_error(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    proc = run_here([*TINY, f"--data.path={dataset}", "--loss.impl=triton",
                     f"--train.out_dir={tmp_path}"], capsys)
    _one_line_error(proc, "loss.impl", "CUDA")


@multi
@pytest.mark.timeout(300)
def test_batch_not_divisible_by_processes(dataset, tmp_path):
    proc = run([*TINY, f"--data.path={dataset}", "--data.batch_size=33",
                f"--train.out_dir={tmp_path}"],
               launcher=accelerate_launch("train.pretrain"),
               check=False)
    assert proc.returncode != 0
    assert ("data.batch_size 33 is not divisible by the 2 processes: use a multiple of 2"
            in proc.stderr)


def test_unreadable_checkpoint(dataset, tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{not json")
    proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
                     f"--resume={ckpt}"], capsys)
    _one_line_error(proc, "unreadable")
    proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
                     f"--resume={tmp_path / 'void'}"], capsys)
    _one_line_error(proc, "no readable checkpoint")


@TRAINS
@pytest.mark.timeout(600)
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "train/configs").glob("*.yaml")))
def test_every_shipped_recipe_runs_two_steps(recipe, dataset, tmp_path, capsys):
    """Each recipe's keys and choices are valid and its loop runs (shrunk to CPU size)."""
    run_here(["--config", str(REPO / "train/configs" / recipe), f"--data.path={dataset}",
              "--data.backend=torchvision", "--data.batch_size=16", "--data.num_workers=0",
              "--model.width=0.125", "--augment.size=32", "--train.max_steps=2",
              "--train.knn_every=-1", f"--train.out_dir={tmp_path}",
              "--train.mixed_precision=fp32"], capsys, check=True)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


# ---------------------------------------------------------------- time budget

@TRAINS
@pytest.mark.timeout(600)
@pytest.mark.parametrize("budget", [0.1, 4.0])
def test_time_budget_fits_the_schedule_to_the_time_left(budget, dataset, tmp_path, capsys):
    """train.time_budget_s times steps 10..30, then fits the schedule's length P: a budget already
    spent ends the run right there (P = 30); otherwise P is what the time left allows, at most
    optim.epochs (5 x 8 = 40 steps), re-fitted at later logged steps when the pace changes. Steps
    up to 30 follow the optim.epochs schedule, those after the last (re-)fit the final plan,
    whose cosine reaches zero on step P; every plan is logged."""
    from train.schedule import lr_schedule, scaled_lr

    run_here([*TINY, f"--data.path={dataset}", "--optim.epochs=5",
              f"--train.time_budget_s={budget}", f"--train.out_dir={tmp_path}"], capsys, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    p = summary["planned_steps"]
    assert summary["steps"] == p and 30 <= p <= 40, summary
    if budget < 1:
        assert p == 30
    assert summary["time_budget_s"] == budget and summary["stopped_by"] is None
    plan = [r for r in records(tmp_path) if r.get("event") == "time_budget"]
    assert plan[0]["step"] == 30 and not plan[0]["refit"] and plan[0]["step_s"] > 0
    assert all(r["refit"] and r["step"] > 30 for r in plan[1:])
    assert plan[-1]["planned_steps"] == p
    peak = scaled_lr(1.0, 32)  # the demo recipe's base LR at batch 32; warmup 0.5 epoch = 4 steps
    before, after = lr_schedule(peak, 40, 4).tolist(), lr_schedule(peak, p, 4).tolist()
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if "lr" in r}
    assert sorted(lrs) == list(range(1, p + 1))
    for step, lr in lrs.items():
        if step <= 30 or step > plan[-1]["step"]:
            want = before[step - 1] if step <= 30 else after[step - 1]
            assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), step
    if p > 30:
        assert lrs[p] == 0.0


@TRAINS
@pytest.mark.timeout(600)
def test_the_first_batch_is_start_up_off_the_training_clock(dataset, tmp_path, capsys,
                                                              monkeypatch):
    """A loader whose first batch takes 2 s longer (a pipeline that builds and compiles its
    kernels then): the run's training clock leaves those 2 s out, as it leaves evaluations out,
    and they are not data wait; the summary records the first batch's seconds."""
    import time

    import train.pretrain as pretrain
    from train.checkpoint import read_trainer_state

    real = pretrain.build_loader

    class SlowStart:
        def __init__(self, loader):
            self.loader, self.started = loader, False

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                if not self.started:
                    time.sleep(2.0)
                    self.started = True
                yield batch

    monkeypatch.setattr(pretrain, "build_loader", lambda *a, **k: SlowStart(real(*a, **k)))
    run_here([*TINY, f"--data.path={dataset}", "--train.max_steps=3",
              f"--train.out_dir={tmp_path}"], capsys, check=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    train_s = read_trainer_state(resolve_checkpoint(tmp_path))["train_seconds"]
    assert summary["first_batch_s"] >= 2.0
    assert train_s <= summary["wall_s"] - 2.0, (train_s, summary)
    assert summary["data_wait_frac"] * train_s < 1.0  # the 2 s are not data wait either


def test_steps_within_budget_closed_form():
    from train.schedule import steps_within_budget

    # 100 s budget, 20 s spent at step 30, 0.5 s per step: 0.97 * 100 - 20 = 77 s -> 154 more steps
    assert steps_within_budget(100.0, 20.0, 30, 0.5, cap=10_000) == 184
    assert steps_within_budget(100.0, 20.0, 30, 0.5, cap=100) == 100  # the configured epochs cap it
    # 77 s at 0.9 s a step is 85.6 steps: the nearest whole number, 86, not 85 (a study cell of
    # 45 s at 0.85 s a step would otherwise end up to 2% short)
    assert steps_within_budget(100.0, 20.0, 30, 0.9, cap=10_000) == 30 + 86
    assert steps_within_budget(100.0, 20.0, 30, 77 / 85.4, cap=10_000) == 30 + 85
    # spent already: stop where it is
    assert steps_within_budget(10.0, 20.0, 30, 0.5, cap=100) == 30
    assert steps_within_budget(100.0, 0.0, 0, 1.0, cap=1000, margin=1.0) == 100
    with pytest.raises(ValueError, match="step_s"):
        steps_within_budget(100.0, 1.0, 3, 0.0, cap=10)
    with pytest.raises(ValueError, match="budget_s"):
        steps_within_budget(float("nan"), 1.0, 3, 1.0, cap=10)


def test_negative_time_budget_is_a_config_error(tmp_path, capsys):
    _one_line_error(run_here([*TINY, "--train.time_budget_s=-5"], capsys), "time_budget_s")


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@SUBPROCESS
@pytest.mark.timeout(600)
def test_cuda_run_bf16_triton_channels_last_reports_mfu_and_resumes(dataset, tmp_path):
    """The GPU path end to end: bf16 autocast, channels_last, the Triton loss, LARS's foreach step,
    throughput/MFU logging, a checkpoint and a resume that continues at the saved step."""
    common = [*TINY, f"--data.path={dataset}", "--data.backend=torchvision", "--optim.epochs=3",
              "--train.mixed_precision=auto", f"--train.out_dir={tmp_path}"]
    run([*common, "--train.max_steps=6"])
    first = json.loads((tmp_path / "summary.json").read_text())
    assert (first["device"].startswith("cuda") and first["loss_impl"] == "triton"
            and first["steps"] == 6)
    start = next(r for r in records(tmp_path) if r.get("event") == "start")
    assert start["precision"] == "bf16"
    losses = [r for r in records(tmp_path) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(r["loss"]) and r["tflops"] > 0 for r in losses)
    from model.flops import peak_flops

    if peak_flops("cuda", torch.bfloat16) is not None:  # a GPU in the peak table: MFU is logged
        assert all(0 < r["mfu"] < 1 for r in losses)
    run([*common, "--resume"])
    second = json.loads((tmp_path / "summary.json").read_text())
    assert second["steps"] == 24  # 3 epochs x 8 steps
    starts = [r["step"] for r in records(tmp_path) if r.get("event") == "start"]
    assert starts == [0, 6]
    w = weights(tmp_path)
    assert all(torch.isfinite(t.float()).all() for t in w.values())


@TRAINS
@pytest.mark.timeout(300)
def test_warmup_longer_than_the_run_warms_up_over_the_whole_run(dataset, tmp_path, capsys):
    """2 epochs of 8 steps with a 5-epoch warmup: a warning, then LR = peak * (s + 1) / 16."""
    out = tmp_path / "run"
    proc = run_here([*TINY, f"--data.path={dataset}", "--optim.warmup_epochs=5",
                     "--optim.lr=0.5", "--optim.lr_scaling=linear", f"--train.out_dir={out}"],
                    capsys, check=True)
    assert "optim.warmup_epochs (5) exceeds optim.epochs (2)" in proc.stderr
    lrs = {r["step"]: r["lr"] for r in records(out) if "lr" in r}
    peak = 0.5 * 32 / 256
    assert lrs and all(lr == pytest.approx(peak * s / 16, rel=1e-9) for s, lr in lrs.items()), lrs
    assert lrs[16] == pytest.approx(peak)


def test_batch_larger_than_the_dataset_is_one_line_before_the_run_starts(dataset, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    proc = run_here([*TINY, f"--data.path={dataset}", "--data.batch_size=512",
                     f"--train.out_dir={out}"], capsys)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'data.batch_size' 512 exceeds the 256 images" in lines[0], lines
    assert not out.exists()


# ---------------------------------------------------------------- run directories (issue 11)

def _ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@TRAINS
@pytest.mark.timeout(600)
def test_a_new_run_in_a_run_directory_is_refused_and_overwrite_replaces_it(dataset, tmp_path,
                                                                           capsys):
    """Without --resume a finished run's directory is refused (it used to be trained into: the
    new, lower-step checkpoints were rotated away as soon as written and the logs mixed), its
    checkpoints untouched; --overwrite replaces the whole earlier run."""
    common = [*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}"]
    run_here([*common, "--train.max_steps=6"], capsys, check=True)
    before = weights(tmp_path)
    proc = run_here([*common, "--train.max_steps=2"], capsys)
    _one_line_error(proc, str(tmp_path), "--resume", "--overwrite")
    assert _ckpt_names(tmp_path) == ["latest", "step-00000004", "step-00000006"]
    after = weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # --overwrite with settings that fail before training: the earlier run is not touched
    proc = run_here([*TINY, f"--data.path={tmp_path / 'none'}", f"--train.out_dir={tmp_path}",
                     "--overwrite"], capsys)
    _one_line_error(proc, "none")
    assert _ckpt_names(tmp_path) == ["latest", "step-00000004", "step-00000006"]

    run_here([*common, "--train.max_steps=2", "--overwrite"], capsys, check=True)
    assert _ckpt_names(tmp_path) == ["latest", "step-00000002"]
    assert resolve_checkpoint(tmp_path).name == "step-00000002"
    assert [r["step"] for r in records(tmp_path) if r.get("event") == "start"] == [0]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    assert not list(tmp_path.glob(".overwritten-*"))


@TRAINS
@pytest.mark.timeout(600)
def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(dataset, tmp_path, capsys):
    """An explicit --resume of step 2 in a run that reached step 6: the new checkpoints of the
    continued run are not rotated away by the later ones, which are kept in abandoned-*."""
    common = [*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
              "--train.keep_checkpoints=0"]
    run_here([*common, "--train.max_steps=6"], capsys, check=True)
    run_here([*common, "--train.max_steps=4",
              f"--resume={tmp_path / 'checkpoints' / 'step-00000002'}"], capsys, check=True)
    names = _ckpt_names(tmp_path)
    assert names[:1] == ["abandoned-after-00000002-" + names[0].split("-")[-1]]
    assert names[1:] == ["latest", "step-00000002", "step-00000004"]
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / names[0]).iterdir())
    assert kept == ["step-00000004", "step-00000006"]
    assert resolve_checkpoint(tmp_path).name == "step-00000004"


@TRAINS
@pytest.mark.timeout(600)
def test_resume_with_another_model_width_names_the_key_in_one_short_line(dataset, tmp_path,
                                                                         capsys):
    common = [*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}", "--train.max_steps=2"]
    run_here(common, capsys, check=True)
    proc = run_here([*common, "--model.width=0.25", "--resume"], capsys)
    _one_line_error(proc, "model.width", "0.125", "0.25", "--overwrite")
    assert len(proc.stderr) < 400, f"{len(proc.stderr)} characters: {proc.stderr[:500]}"


def test_out_dir_that_is_a_file_is_a_one_line_error(dataset, tmp_path, capsys):
    (tmp_path / "f").write_text("not a directory")
    proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path / 'f'}"],
                    capsys)
    _one_line_error(proc, "train.out_dir", "existing file")
    assert (tmp_path / "f").read_text() == "not a directory"


@TRAINS
@pytest.mark.timeout(600)
def test_knn_without_the_eval_split_says_so_once_and_records_why(dataset, tmp_path, capsys):
    proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
                     "--train.max_steps=2", "--train.knn_every=0", "--data.eval_split=nope"],
                    capsys, check=True)
    warnings = [ln for ln in proc.stderr.splitlines() if "kNN" in ln]
    assert len(warnings) == 1 and "'nope'" in warnings[0], proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1"] is None and "'nope'" in summary["knn_skipped"]
    skipped = [r for r in records(tmp_path) if r.get("event") == "knn_skipped"]
    assert len(skipped) == 1 and "'nope'" in skipped[0]["reason"]


@multi
@pytest.mark.timeout(300)
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(dataset, tmp_path):
    """A signal that reaches one process only (or the processes at different steps): every
    process stops at the next logged step, together, and the run checkpoints and exits 0. One
    process used to stop alone and leave the other waiting in a collective."""
    psutil = pytest.importorskip("psutil")
    args = [*TINY, f"--data.path={dataset}", "--train.max_steps=16", "--optim.epochs=4",
            "--train.log_every=2", f"--train.out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [*accelerate_launch("train.pretrain"), *args]
    launcher = subprocess.Popen(two, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline, sent = time.time() + 200, False
    while time.time() < deadline and launcher.poll() is None and not sent:
        if (tmp_path / "log.jsonl").is_file() and any(r.get("step", 0) >= 3 and "loss" in r
                                                      for r in records(tmp_path)):
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    rank = child.environ().get("LOCAL_RANK")
                    if rank == "1" and "train.pretrain" in child.cmdline():
                        child.send_signal(signal.SIGTERM)
                        sent = True
                except psutil.Error:
                    pass
        time.sleep(0.02)
    try:
        _, err = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            child.kill()
        launcher.kill()
        pytest.fail("the processes did not stop together: the run hung after a signal to one")
    assert sent and launcher.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] and summary["world"] == 2 and summary["steps"] < 16, summary
    assert summary["steps"] % 2 == 0  # a logged step, the same for both
    from train.checkpoint import read_trainer_state

    assert read_trainer_state(resolve_checkpoint(tmp_path))["step"] == summary["steps"]


def _knn_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") == "knn"]


@TRAINS
@pytest.mark.timeout(600)
def test_knn_curve_lands_in_the_log_tensorboard_and_summary_and_survives_resume(dataset, tmp_path,
                                                                               capsys):
    """train.knn_every_s: a kNN point at each logged step past the interval, one at the end; the
    points are log records and TensorBoard scalars, the summary has the final and best values,
    and the best over a resumed run counts the points before the resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.bookkeeping import run_knn

    knn = ["--train.knn_every=0", "--train.knn_every_s=0.001", "--train.knn_k=5",
           "--train.knn_train_samples=64", "--optim.epochs=1"]
    run_here([*TINY, *knn, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
              "--train.max_steps=4"], capsys, check=True)
    first = _knn_records(tmp_path)
    assert [r["step"] for r in first] == [1, 2, 3, 4]  # every logged step, the last once
    for r in first:
        assert r["images"] == 32 * r["step"] and r["epoch"] == pytest.approx(r["step"] / 8)
        assert 0.0 <= r["knn_top1"] <= 1.0
    assert all(a["train_s"] < b["train_s"] for a, b in zip(first, first[1:]))

    # the last point is the final weights' kNN top-1
    from model.simclr import build_simclr
    from pipelines.sources import open_dataset
    from train.config import load_config

    cfg = load_config(tmp_path / "config.yaml")
    model = build_simclr(cfg.model).to(memory_format=torch.channels_last)
    model.load_state_dict({k.removeprefix("module."): v for k, v in weights(tmp_path).items()})
    ds = open_dataset(dataset)
    assert first[-1]["knn_top1"] == pytest.approx(
        run_knn(cfg, model, ds.split("train"), ds.split("test"), "cpu"), abs=1e-6)

    run_here([*TINY, *knn, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
              "--train.max_steps=8", "--resume"], capsys, check=True)
    points = _knn_records(tmp_path)
    assert [r["step"] for r in points] == list(range(1, 9))
    summary = json.loads((tmp_path / "summary.json").read_text())
    best = max(points, key=lambda r: (r["knn_top1"], -r["step"]))
    assert summary["knn_top1"] == points[-1]["knn_top1"]
    assert (summary["knn_best"], summary["knn_best_step"]) == (best["knn_top1"], best["step"])

    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    scalars = {e.step: e.value for e in tb.Scalars("knn_top1")}
    assert scalars == pytest.approx({r["step"]: r["knn_top1"] for r in points})


def test_throughput_leaves_out_paused_time(monkeypatch):
    """kNN evaluations pause the training clock: images/s and data wait are over training time
    only."""
    from train.bookkeeping import ThroughputMeter
    from train.schedule import TrainClock

    train_clock = TrainClock(seconds_before=5.0)
    train_clock.start(now=0.0)
    clock = iter([1.0, 3.0, 10.0])  # the pause's start and end, then finish() reads the clock
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    meter = ThroughputMeter(flops_per_image=1.0, peak=None, clock=train_clock)
    meter.add(100, 1.0)
    with train_clock.paused():  # [1, 3) spent on a kNN evaluation
        pass
    record = meter.interval(4.0)  # the interval [0, 4) trained for 2 s
    assert record["images_per_s"] == pytest.approx(50.0)
    assert record["data_wait_frac"] == pytest.approx(0.5)
    meter.add(60, 0.0)
    total = meter.finish()  # at t=10: 8 s of training
    assert total["wall_s"] == pytest.approx(10.0)
    assert total["images_per_s"] == pytest.approx(160 / 8)
    assert total["data_wait_frac"] == pytest.approx(1 / 8)
    assert train_clock.seconds(10.0) == pytest.approx(5.0 + 8.0)  # earlier invocations count


@multi
@pytest.mark.timeout(300)
def test_two_processes_agree_on_the_timed_knn_points(dataset, tmp_path):
    """Every process takes the slowest clock, so all enter each evaluation (no hang)."""
    run([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}", "--train.max_steps=3",
         "--train.knn_every=0", "--train.knn_every_s=0.001", "--train.knn_train_samples=64"],
        launcher=accelerate_launch("train.pretrain"))
    assert [r["step"] for r in _knn_records(tmp_path)] == [1, 2, 3]


@TRAINS
@pytest.mark.timeout(300)
def test_knn_every_minus_one_turns_the_timed_points_off_too(dataset, tmp_path, capsys):
    run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}",
              "--train.max_steps=2", "--train.knn_every=-1", "--train.knn_every_s=0.001"], capsys,
             check=True)
    assert _knn_records(tmp_path) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1"] is None and summary["knn_best"] is None
    assert "disabled" in summary["knn_skipped"]


@multi
@pytest.mark.timeout(600)
def test_one_collective_per_logged_step_and_none_on_the_others(dataset, tmp_path, monkeypatch):
    """Two gloo processes with every torch.distributed collective counted: each logged step
    (every 5th and the last) makes exactly one, an all-reduce, and the other steps none, with the
    time budget fitted on the way (its timed steps end at a logged step)."""
    monkeypatch.setenv("COLLECTIVE_COUNT", str(tmp_path / "calls"))
    out = tmp_path / "run"
    run([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--optim.epochs=5",
         "--train.max_steps=33", "--train.log_every=5", "--train.checkpoint_every=0",
         "--train.time_budget_s=3600"],
        launcher=accelerate_launch("tests.train.collective_count"))
    budget = [r for r in records(out) if r.get("event") == "time_budget"]
    assert [(r["step"], r["planned_steps"]) for r in budget] == [(30, 40)]  # 5 epochs of 8 steps
    logged = [5, 10, 15, 20, 25, 30, 33]
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls-{rank}.json").read_text())
        per_step = {s: [name for step, name in calls if step == s] for s in range(1, 34)}
        assert per_step == {s: ["all_reduce"] if s in logged else [] for s in range(1, 34)}
        assert not [c for c in calls if c[0] is not None and not 1 <= c[0] <= 33]
        # the wrappers do see Accelerate's own collectives (set-up, the final checkpoint)
        assert [name for step, name in calls if step is None], calls


@TRAINS
@pytest.mark.timeout(300)
def test_knn_on_a_single_class_is_skipped_with_the_reason(tmp_path, capsys):
    """Every kNN vote is right on one class: no 100% figure, a warning and the reason instead."""
    from tests.fashion_mnist import make_subset

    one = make_subset(tmp_path / "one", 64, 32, classes=(3,))
    proc = run_here([*TINY, f"--data.path={one}", f"--train.out_dir={tmp_path / 'run'}",
                     "--train.max_steps=2", "--train.knn_every=0"], capsys, check=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["knn_top1"] is None and "single class" in summary["knn_skipped"]
    assert [ln for ln in proc.stderr.splitlines() if "single class" in ln]


@TRAINS
@pytest.mark.timeout(600)
def test_resume_takes_changes_to_how_the_run_goes_on_and_refuses_changes_to_what_it_trains(
        dataset, tmp_path, capsys):
    """A resume may change the time budget (what is left is fitted to it at once, and the summary
    and the log say so), the cadences and where the data lives; it may not change what the run
    trains: another dataset of the same size, the loss, the batch. Each refusal is one line, before
    any state is loaded."""
    import shutil

    from tests.fashion_mnist import make_subset

    out = tmp_path / "run"
    common = [*TINY, f"--train.out_dir={out}", "--train.max_steps=2"]
    run_here([*common, f"--data.path={dataset}"], capsys, check=True)
    other = make_subset(tmp_path / "other", 256, 128, classes=(1, 2, 3))  # the same sizes
    for change, names in [([f"--data.path={other}"], ("dataset", str(other))),
                          (["--loss.temperature=0.5"], ("loss.temperature", "0.1", "0.5")),
                          (["--data.batch_size=64"], ("data.batch_size",))]:
        proc = run_here([*common, f"--data.path={dataset}", *change, "--resume"], capsys)
        _one_line_error(proc, *names, "--overwrite")
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # nothing trained

    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    proc = run_here([*common, f"--data.path={moved}", "--train.max_steps=4",
                     "--train.time_budget_s=3600", "--resume"], capsys, check=True)
    assert "resumed with changed settings" in proc.stderr
    changes = [r for r in records(out) if r.get("event") == "resume_changes"]
    assert len(changes) == 1 and changes[0]["step"] == 2
    assert sorted(c.split()[0] for c in changes[0]["changes"]) == [
        "data.path", "train.max_steps", "train.time_budget_s"]
    summary = json.loads((out / "summary.json").read_text())
    # fitted at once to the new budget at the pace so far (capped by optim.epochs: 2 x 8 steps)
    assert summary["steps"] == 4 and summary["time_budget_s"] == 3600
    assert summary["planned_steps"] == summary["total_steps"] == 16


@TRAINS
@pytest.mark.timeout(600)
def test_a_micro_batched_run_resumes_bit_exactly(dataset, tmp_path, capsys):
    """train.micro_batch (here 12 of 32: chunks of 12, 12 and 8) through the whole trainer: six
    steps at once equal three, then a resume to six, bit for bit; the start record and the
    summary name the chunk size, and it differs from the plain run (BatchNorm sees chunks)."""
    common = [*TINY, f"--data.path={dataset}", "--train.micro_batch=12"]
    whole, cut, plain = tmp_path / "whole", tmp_path / "cut", tmp_path / "plain"
    run_here([*common, f"--train.out_dir={whole}", "--train.max_steps=6"], capsys, check=True)
    run_here([*common, f"--train.out_dir={cut}", "--train.max_steps=3"], capsys, check=True)
    run_here([*common, f"--train.out_dir={cut}", "--train.max_steps=6", "--resume"], capsys,
             check=True)
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    start = next(r for r in records(whole) if r.get("event") == "start")
    assert start["micro_batch"] == 12
    # every logged step carries the batch's contrastive accuracy: a share of its 64 anchors
    accs = [r["contrastive_acc"] for r in records(whole) if "loss" in r]
    assert len(accs) == 6 and all(0 <= a <= 1 and (64 * a) % 1 == 0 for a in accs)
    assert json.loads((whole / "summary.json").read_text())["micro_batch"] == 12

    run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={plain}",
              "--train.max_steps=6"], capsys, check=True)
    assert json.loads((plain / "summary.json").read_text())["micro_batch"] == 0
    assert not all(torch.equal(a[k], v) for k, v in weights(plain).items())


@multi
@pytest.mark.timeout(600)
def test_two_processes_take_micro_batched_steps_under_accelerate_launch(dataset, tmp_path):
    """Two gloo processes launched as users do, each forwarding its 16 images in chunks of 8
    (DDP's gradient all-reduce held back by the accelerator's no_sync until the last chunk):
    the run ends, both processes agree, and its first loss, which depends on the chunks only
    through BatchNorm, is close to the plain two-process run's. (The exact equality of the step
    across processes is tests/train/test_micro_batch.py's, in float64.)"""
    common = [*TINY, f"--data.path={dataset}", "--train.max_steps=3"]
    micro, plain = tmp_path / "micro", tmp_path / "plain"
    run([*common, f"--train.out_dir={micro}", "--train.micro_batch=8"],
        launcher=accelerate_launch("train.pretrain"))
    run([*common, f"--train.out_dir={plain}"], launcher=accelerate_launch("train.pretrain"))
    summary = json.loads((micro / "summary.json").read_text())
    assert summary["world"] == 2 and summary["micro_batch"] == 8 and summary["steps"] == 3
    got = [r["loss"] for r in records(micro) if "loss" in r]
    want = [r["loss"] for r in records(plain) if "loss" in r]
    assert len(got) == 3 and all(math.isfinite(x) for x in got)
    assert got[0] == pytest.approx(want[0], rel=0.05) and got[0] != want[0]
