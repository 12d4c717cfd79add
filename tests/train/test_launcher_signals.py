"""A signal to the one-process launcher (`accelerate launch --num_processes 1`, as `make demo`
runs it), or the launcher's death, ends in a checkpoint and a clean exit of its worker. The
launcher runs the worker with subprocess.Popen and forwards no signal: it used to die at once
(status 143 on SIGTERM) and leave the worker training on, with no parent and no checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fashion_mnist import REPO, subset_dataset
from tests.train.test_pretrain import TINY, records
from train.checkpoint import read_trainer_state, resolve_checkpoint

pytestmark = pytest.mark.slow(reason="pretrains under the real accelerate launcher and signals it")

psutil = pytest.importorskip("psutil")

STEPS = 160  # 20 epochs of 8 steps: far more than the test waits for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory, 256, 128)


def one_process_launch(module: str) -> list[str]:
    """The Makefile's launcher line (one thread: the test machine's cores are shared)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "-m", module]


def _workers(launcher: int, module: str = "train.pretrain") -> list:
    try:
        return [p for p in psutil.Process(launcher).children(recursive=True)
                if module in p.cmdline()]
    except psutil.Error:
        return []


def _gone(proc) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # reparented to an init that does not reap
    except psutil.NoSuchProcess:
        return True


def _wait(what, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if what():
            return True
        time.sleep(0.05)
    return False


def _logged_step_3(out: Path) -> bool:
    return (out / "log.jsonl").is_file() and any(r.get("step", 0) >= 3 and "loss" in r
                                                 for r in records(out))


def _sighup_default() -> None:
    """In the launcher's child before exec: SIGHUP at its default. A suite run under `nohup`
    would pass its ignored SIGHUP on, and the trainer keeps an ignored SIGHUP ignored (as
    `nohup accelerate launch ...` asks), so these tests would fail for the wrong reason."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _kill(launcher: subprocess.Popen, workers: list) -> None:
    """Whatever of the launch is left after a test (nothing, when it passed)."""
    for w in workers:
        try:
            w.kill()
        except psutil.Error:
            pass
    if launcher.poll() is None:
        launcher.kill()
        launcher.wait()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                        (signal.SIGINT, True)],
                         ids=["sigterm-launcher", "sighup-launcher", "ctrl-c-group"])
def test_signal_to_one_process_launcher_checkpoints_and_leaves_no_worker(dataset, tmp_path, sig,
                                                                        group):
    """The signal goes to the launcher only (or, as Ctrl-C in a terminal does, to its whole
    process group); the launcher exits, its worker finishes its step, writes the checkpoint of
    that step and summary.json (interrupted) and exits; nothing is left running."""
    out = tmp_path / "run"
    args = [*TINY, f"--data.path={dataset}", f"--train.max_steps={STEPS}", "--optim.epochs=20",
            f"--train.out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        launcher = subprocess.Popen([*one_process_launch("train.pretrain"), *args], cwd=REPO,
                                    env=env, stdout=so, stderr=se, start_new_session=True,
                                    preexec_fn=_sighup_default)
    workers = []
    try:
        assert _wait(lambda: launcher.poll() is not None or _logged_step_3(out), 300), \
            "training did not log step 3 in time"
        workers = _workers(launcher.pid)
        assert launcher.poll() is None and len(workers) == 1, (launcher.poll(), workers)
        if group:
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)
        launcher.wait(timeout=120)
        assert _wait(lambda: _gone(workers[0]), 180), "the worker outlived its launcher"
    finally:
        _kill(launcher, workers)
    err = (tmp_path / "stderr").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 3 <= summary["steps"] < STEPS, (summary, err[-3000:])
    assert read_trainer_state(resolve_checkpoint(out))["step"] == summary["steps"]


@pytest.mark.timeout(600)
def test_closing_the_terminal_checkpoints_and_leaves_no_worker(dataset, tmp_path):
    """The launcher in a terminal (a pseudo-terminal it controls) that is then closed: the hangup
    reaches the launcher and its worker, and every write to the terminal fails from then on; the
    worker still checkpoints, writes summary.json and exits."""
    import fcntl
    import pty
    import select
    import termios
    import threading

    out = tmp_path / "run"
    args = [*TINY, f"--data.path={dataset}", f"--train.max_steps={STEPS}", "--optim.epochs=20",
            f"--train.out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    master, slave = pty.openpty()

    def controlling_terminal():  # a session of its own, the terminal its controlling one
        _sighup_default()
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    launcher = subprocess.Popen([*one_process_launch("train.pretrain"), *args], cwd=REPO,
                                env=env, stdin=slave, stdout=slave, stderr=slave,
                                preexec_fn=controlling_terminal)
    os.close(slave)
    shown, hang_up = [], threading.Event()

    def terminal():  # shows what is written until the window closes (the master's last close)
        try:
            while not hang_up.is_set():
                if select.select([master], [], [], 0.05)[0]:
                    shown.append(os.read(master, 65536))
        except OSError:
            pass
        finally:
            os.close(master)

    window = threading.Thread(target=terminal, daemon=True)
    window.start()
    workers = []
    try:
        assert _wait(lambda: launcher.poll() is not None or _logged_step_3(out), 300), \
            "training did not log step 3 in time"
        workers = _workers(launcher.pid)
        assert launcher.poll() is None and len(workers) == 1, (launcher.poll(), workers)
        hang_up.set()  # the terminal window closes
        window.join(timeout=60)
        launcher.wait(timeout=120)
        assert _wait(lambda: _gone(workers[0]), 180), "the worker outlived its terminal"
    finally:
        hang_up.set()
        _kill(launcher, workers)
    summary = json.loads((out / "summary.json").read_text())
    shown = b"".join(shown).decode(errors="replace")[-3000:]
    assert summary["interrupted"] and 3 <= summary["steps"] < STEPS, (summary, shown)
    assert read_trainer_state(resolve_checkpoint(out))["step"] == summary["steps"]


@pytest.mark.timeout(600)
def test_sigterm_to_one_process_launcher_ends_finetuning(tiny_run, tmp_path):
    """Fine-tuning has no checkpoint to write: its worker must not train on without the launcher
    (it used to, to the end of its schedule)."""
    out = tmp_path / "ft"
    args = ["--checkpoint", str(tiny_run), "--labels", "0.1", "--min-steps", "100000",
            "--batch-size", "32", "--no-scratch", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        launcher = subprocess.Popen([*one_process_launch("train.finetune"), *args], cwd=REPO,
                                    env=env, stdout=so, stderr=se, start_new_session=True)
    workers = []
    try:
        started = "finetune: finetune on"  # printed once its steps are planned, before the first
        assert _wait(lambda: launcher.poll() is not None
                     or started in (tmp_path / "stdout").read_text(), 300), \
            "fine-tuning did not start in time"
        workers = _workers(launcher.pid, "train.finetune")
        assert launcher.poll() is None and len(workers) == 1, (launcher.poll(), workers)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
        assert _wait(lambda: _gone(workers[0]), 120), "the worker outlived its launcher"
    finally:
        _kill(launcher, workers)
    assert not (out / "finetune.json").exists()
    assert "the launcher" in (tmp_path / "stderr").read_text()
