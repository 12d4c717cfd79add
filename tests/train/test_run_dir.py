"""One run per run directory (train.out_dir): a second pretraining run while one holds the
directory is refused in one line naming the holder, before it writes anything; the lock goes with
the run that held it; files of a run's names that no run wrote are never overwritten or deleted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import accelerate_launch
from tests.train.test_pretrain import TINY, _one_line_error, run, run_here
from tests.train.test_pretrain import dataset as dataset  # noqa: F401 (the module's fixture)
from train.lock import LOCK_NAME, acquire

TRAINS = pytest.mark.slow(reason="pretrains a few steps (in this process)")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_run_into_a_held_run_directory_is_one_line_naming_the_holder(dataset, tmp_path,
                                                                       capsys):
    """The holder here is this test process; a new run, a --resume (`make demo` twice) and an
    --overwrite are all refused with status 2 and write nothing."""
    out = tmp_path / "run"
    common = [*TINY, f"--data.path={dataset}", f"--train.out_dir={out}"]
    with acquire(out / LOCK_NAME, "held", "by the test"):
        for extra in ([], ["--resume"], ["--overwrite"]):
            proc = run_here([*common, *extra], capsys)
            _one_line_error(proc, str(out), "in use by", f"pid {os.getpid()}", "started",
                            "another --train.out_dir")
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert _names(out) == [LOCK_NAME]


def test_a_lock_held_by_another_process_names_its_command(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from train.lock import acquire; lock = acquire(Path(sys.argv[1]), 'x', 'y'); "
         "print('held', flush=True); time.sleep(60)", str(out / LOCK_NAME)],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}"], capsys)
        _one_line_error(proc, f"pid {holder.pid}", "train.lock import acquire", "UTC")
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: nothing stale is left to refuse a run
    for _ in range(50):
        try:
            acquire(out / LOCK_NAME, "x", "y").release()
            break
        except Exception:
            time.sleep(0.1)
    else:
        raise AssertionError("the killed holder's lock was not released")


@pytest.mark.slow(reason="starts two gloo processes")
@pytest.mark.timeout(300)
def test_two_processes_learn_from_the_main_one_that_the_directory_is_held(dataset, tmp_path):
    """Only the main process takes the lock; the other hears the outcome from it: both stop with
    the one line, none hangs in a collective or trains."""
    out = tmp_path / "run"
    with acquire(out / LOCK_NAME, "held", "by the test"):
        proc = run([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}"],
                   launcher=accelerate_launch("train.pretrain", 2), check=False, timeout=240)
        assert proc.returncode != 0, proc.stderr[-3000:]
        # the two processes share stderr: one's line can land in the middle of the other's
        holders = re.findall(r"pretrain: error: train\.out_dir '[^']*' is in use by pid (\d+)",
                             proc.stderr)
        assert holders == [str(os.getpid())] * 2, proc.stderr
        assert _names(out) == [LOCK_NAME]


def test_the_lock_goes_when_a_run_ends_on_an_error(tmp_path, capsys):
    """main() in this process again and again (as the tests do): a run that stops on a user error
    after taking the lock leaves it free."""
    out = tmp_path / "run"
    for _ in range(2):
        proc = run_here([*TINY, f"--data.path={tmp_path / 'none'}", f"--train.out_dir={out}"],
                        capsys)
        _one_line_error(proc, "none")
    assert not out.exists()  # neither the lock file nor the folder made for it is left
    acquire(out / LOCK_NAME, "x", "y").release()


@TRAINS
@pytest.mark.timeout(600)
def test_the_lock_goes_when_a_run_finishes(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--train.max_steps=2"],
             capsys, check=True)
    assert LOCK_NAME not in _names(out)
    acquire(out / LOCK_NAME, "x", "y").release()
    run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--train.max_steps=2",
              "--overwrite"], capsys, check=True)


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]])
def test_files_that_no_run_wrote_are_refused_not_overwritten_or_deleted(extra, dataset, tmp_path,
                                                                        capsys):
    """A user's own config.yaml (or tb/) in train.out_dir: a run used to overwrite it, and
    --overwrite to move it aside and delete it."""
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "notes.txt").write_text("mine too\n")
    proc = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path}", *extra],
                    capsys)
    _one_line_error(proc, str(tmp_path), "config.yaml, tb", "not written by a run")
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"
    assert (tmp_path / "tb" / "notes.txt").read_text() == "mine too\n"
    assert _names(tmp_path) == ["config.yaml", "tb"]


# ---------------------------------------------------------------- fine-tuning's --out

def test_finetune_refuses_a_used_out_and_overwrite_replaces_the_whole_set_or_nothing(
        tiny_run, tmp_path, capsys, monkeypatch):
    """A re-run into a used --out used to write its labels.txt beside the earlier run's
    finetune.json and model, and a re-run stopped midway left that mix behind."""
    import train.finetune as ft
    from tests.processes import main_here
    from train.lock import lock_beside

    out = tmp_path / "ft"
    common = ["--checkpoint", tiny_run, "--out", out, "--min-steps", "0", "--batch-size", "32",
              "--epochs", "1", "--no-scratch"]

    def run(*extra) -> tuple[int, str]:
        code = main_here(ft.main, [*common, *extra])
        return code, capsys.readouterr().err

    def one_line(code, err, *needles):
        assert code == 2, err[-2000:]
        last = err.strip().splitlines()[-1]  # after the closed progress bars, if any
        assert last.startswith("finetune: error: ") and err.count("error:") == 1, err
        assert "Traceback" not in err, err
        for n in needles:
            assert n in last, err

    assert run("--labels", "0.1")[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["finetune.json", "labels.txt", "model.safetensors"]

    def unchanged():
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first
        assert _names(tmp_path) == ["ft"]  # no hidden folder or lock file left

    one_line(*run("--labels", "0.2"), str(out), "already holds", "--overwrite")
    unchanged()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ft, "_save_model", full_disk)  # after labels.txt, before the rest
    one_line(*run("--labels", "0.2", "--overwrite"), "No space left on device")
    unchanged()
    monkeypatch.undo()

    with acquire(lock_beside(out), "held", "by the test"):
        one_line(*run("--labels", "0.2", "--overwrite"), str(out), "in use by",
                 f"pid {os.getpid()}", "another --out")
    unchanged()

    assert run("--labels", "0.2", "--overwrite")[0] == 0
    assert sorted(_names(out)) == ["finetune.json", "labels.txt", "model.safetensors"]
    assert (out / "labels.txt").read_bytes() != first["labels.txt"]
    assert '"label_fraction": 0.2' in (out / "finetune.json").read_text()
    assert _names(tmp_path) == ["ft"]

    (out / "mine.txt").write_text("not fine-tuning's\n")
    one_line(*run("--overwrite"), "mine.txt", "did not write")
    assert (out / "mine.txt").read_text() == "not fine-tuning's\n"
