"""Fault injection on real training runs: kill -9 at each phase of a checkpoint write, SIGINT and
SIGTERM mid-epoch, a full disk. Whatever happens, `--resume auto` continues from the newest
complete checkpoint (never step 0) and reproduces the uninterrupted run bit for bit; errors are
one line; no temp directory is left and the previous checkpoint stays intact.

The kills use train.atomic.fault_point: SIMCLR_FAULT=<phase>@<step> makes the training process
SIGKILL itself at that phase of the checkpoint of that step. Phases, in write order:
  in-state-save   Accelerate's state is in the hidden temp directory, the trainer state is not
  after-rename    the checkpoint directory is in place, `latest` still names the previous one
  latest-replace  the new `latest` is written to its temp file, not yet renamed over `latest`
  resave-swapped  a step saved twice (the final save repeats the last periodic one): the new
                  directory is in place, the old one not yet deleted
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.fashion_mnist import REPO, subset_dataset
from tests.train.test_pretrain import PY, TINY, records, run, weights
from train.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint

pytestmark = pytest.mark.slow(reason="pretrains in subprocesses and kills or signals them")

STEPS = 8  # checkpoints every 2 steps (TINY); 8 steps per epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory, 256, 128)


def common(dataset: Path, out: Path) -> list[str]:
    return [*TINY, f"--data.path={dataset}", f"--train.max_steps={STEPS}", f"--train.out_dir={out}"]


@pytest.fixture(scope="module")
def reference_dir(dataset, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    run(common(dataset, out))
    return out


@pytest.fixture(scope="module")
def reference(reference_dir) -> dict[str, torch.Tensor]:
    return weights(reference_dir)


def resumed_at(proc) -> int:
    m = re.search(r"resumed from (\S+) at step (\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(m.group(2))


def assert_matches_reference(out: Path, reference: dict) -> None:
    got = weights(out)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), f"{k} differs from the uninterrupted run"
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.timeout(400)
def test_kill_9_in_state_save_after_rename_latest_replace_resave_resume_from_newest(
        dataset, reference, tmp_path, monkeypatch):
    """One run killed four times, once in each phase (see the module docstring), each kill
    followed by `--resume auto` from the newest complete checkpoint; the last resume finishes
    and the weights equal the uninterrupted run's."""
    chain = [  # (the phase this run is killed in, the step the run resumes from)
        ("in-state-save@4", None),  # fresh start; killed before step 4's checkpoint is complete
        ("after-rename@6", 2),  # step 4's temp directory is ignored: resumes from step 2
        ("latest-replace@8", 6),  # step 6 is complete though `latest` still names step 4
        (f"resave-swapped@{STEPS}", STEPS),  # step 8 is complete; `latest` names step 6
        (None, STEPS),  # the final save of step 8 replaced the periodic one, then was killed
    ]
    for phase, start in chain:
        if phase:
            monkeypatch.setenv("SIMCLR_FAULT", phase)
        else:
            monkeypatch.delenv("SIMCLR_FAULT")
        resume = ["--resume", "auto"] if start else []
        proc = run([*common(dataset, tmp_path), *resume], check=False)
        if start is not None:
            assert resumed_at(proc) == start, phase
        if phase:
            assert proc.returncode == -signal.SIGKILL, (phase, proc.returncode, proc.stderr[-2000:])
            assert not (tmp_path / "summary.json").exists()
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
    assert_matches_reference(tmp_path, reference)


def _signal_at(args: list[str], out: Path, sig: signal.Signals, after_step: int):
    """Run train.pretrain, send `sig` once a step past `after_step` is logged; (stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, "-m", "train.pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").is_file() and any(
                r.get("step", 0) > after_step and "loss" in r for r in records(out)):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and sig.name in stderr, stderr[-2000:]
    return stdout, stderr


@pytest.mark.timeout(400)
def test_sigint_then_sigterm_mid_epoch_checkpoint_exit_0_and_resume(dataset, reference, tmp_path):
    """Ctrl-C (SIGINT) mid-epoch, then SIGTERM in the resumed run: each finishes its step, writes
    the checkpoint of that step and exits with 0; the final resume equals the uninterrupted run."""
    args = common(dataset, tmp_path)
    before = 0
    for sig, resume in ((signal.SIGINT, []), (signal.SIGTERM, ["--resume"])):
        stdout, _ = _signal_at([*args, *resume], tmp_path, sig, after_step=before + 1)
        if resume:
            assert f"at step {before}" in stdout
        summary = json.loads((tmp_path / "summary.json").read_text())
        stopped = summary["steps"]
        assert summary["interrupted"] and summary["signal"] == sig.name, summary
        assert before + 2 <= stopped < STEPS, summary
        assert read_trainer_state(resolve_checkpoint(tmp_path))["step"] == stopped
        before = stopped
    proc = run([*args, "--resume"])
    assert resumed_at(proc) == before
    assert_matches_reference(tmp_path, reference)


_FULL_DISK = """
import sys
import accelerate.utils.other as other
from safetensors import SafetensorError

real, calls = other.safe_save_file, []

def full_after_first(tensors, filename, *a, **kw):
    calls.append(filename)
    if len(calls) > 1:  # the first checkpoint fits, the second finds the disk full
        open(filename, "wb").write(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    return real(tensors, filename, *a, **kw)

other.safe_save_file = full_after_first
from train.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def _assert_disk_full_handled(proc, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "disk is full" in lines[0] and "step-00000002" in lines[0], lines[0]
    assert len(lines[0]) < 400
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no .tmp-* left
    prev = resolve_checkpoint(out)
    assert prev.name == "step-00000002" and read_trainer_state(prev)["step"] == 2
    assert load_model_weights(prev)  # readable, complete


@pytest.mark.timeout(300)
def test_disk_full_in_the_state_save_is_one_line_no_temp_previous_intact(dataset, tmp_path):
    """ENOSPC raised by the real serializer call inside Accelerate's save_state (always runs)."""
    proc = run(common(dataset, tmp_path), launcher=(PY, "-c", _FULL_DISK), check=False)
    _assert_disk_full_handled(proc, tmp_path)


@pytest.mark.timeout(300)
def test_disk_full_on_a_small_tmpfs_is_one_line_no_temp_previous_intact(dataset, reference_dir,
                                                                        tmp_path):
    """A real full disk: a tmpfs with room for one checkpoint (needs root to mount it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    one = sum(f.stat().st_size for f in resolve_checkpoint(reference_dir).iterdir())
    size_kb = (one * 3 // 2 + 256 * 1024) // 1024  # one checkpoint and the logs fit, two do not
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        proc = run([*common(dataset, mnt / "run")], check=False)
        _assert_disk_full_handled(proc, mnt / "run")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
