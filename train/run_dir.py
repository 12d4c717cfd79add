"""The run directory (train.out_dir) before training begins: one run at a time holds it (a lock
taken by the main process); an earlier run in it is continued (--resume), set aside and later
deleted (--overwrite), or the directory is refused; files of those names that no run wrote are
never overwritten or deleted; a resumed run sets its later checkpoints aside; a checkpoint that
does not load is named in one line."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from train.checkpoint import CheckpointError, step_dirs
from train.config import ConfigError
from train.lock import LOCK_NAME, DirLock, OutputBusy, acquire

# what a pretraining run writes into train.out_dir
RUN_ARTEFACTS = ("checkpoints", "summary.json", "log.jsonl", "config.yaml", "tb",
                 "linear_eval.json")
# written first into train.out_dir by every run: the RUN_ARTEFACTS beside it are a run's
MARKER = ".simclr-run"


def lock_on_main(acc, path: Path, what: str, fix: str) -> DirLock | None:
    """The main process holds the lock file `path` (train.lock), released when the innermost
    `released_on_return` function ends; when another command holds it, every process raises
    OutputBusy (the others hold nothing, and learn the outcome from the main one)."""
    lock, busy = None, None
    if acc.is_main_process:
        try:
            lock = acquire(path, what, fix).until_return()
        except OutputBusy as e:
            busy = str(e)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy])[0]
    if busy:
        raise OutputBusy(busy)
    return lock


def lock_run_dir(acc, out: Path) -> DirLock | None:
    """One run at a time in train.out_dir: the main process holds out/.lock for the run's life
    (nothing where `out` is a file: `check_out_dir` refuses it)."""
    if out.exists() and not out.is_dir():
        return None
    return lock_on_main(acc, out / LOCK_NAME, f"train.out_dir '{out}'",
                        "wait for that run to end, or choose another --train.out_dir")


def foreign_artefacts(out: Path) -> list[str]:
    """The RUN_ARTEFACTS names in `out` that no run wrote: none where a run marked the directory
    (or, from before the marker, left its checkpoints, log or summary)."""
    if not out.is_dir() or (out / MARKER).exists() or earlier_run(out):
        return []
    return [n for n in RUN_ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]


def mark_run_dir(out: Path) -> None:
    """Before the first artefact: the RUN_ARTEFACTS in `out` are a run's."""
    (out / MARKER).write_text("written by train.pretrain: the run's files beside this one are "
                              "replaced by --overwrite\n")


def earlier_run(out: Path) -> str | None:
    """What in `out` shows an earlier run (its checkpoints, summary or log), or None."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and ((ckpts / "latest").exists() or any(ckpts.glob("step-*"))):
        return "checkpoints"
    for name in ("summary.json", "log.jsonl"):
        if (out / name).exists():
            return name
    return None


def check_out_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a file in the directory's place, both --resume and --overwrite, files of a run's
    names that no run wrote, or an earlier run with neither."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config: train.out_dir '{out}' is an existing file, not a directory: "
                          f"choose another --train.out_dir")
    if resume is not None and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir, --overwrite deletes it: "
                          "pass one of them")
    foreign = foreign_artefacts(out)
    if foreign:
        raise ConfigError(f"train.out_dir '{out}' holds {', '.join(foreign)}, not written by a "
                          f"run: move it away or choose another --train.out_dir")
    earlier = earlier_run(out) if resume is None else None
    if earlier and not overwrite:
        raise CheckpointError(f"train.out_dir '{out}' already holds a run ({earlier}): continue it "
                              f"with --resume, replace it with --overwrite, or choose another "
                              f"--train.out_dir")


def set_aside_earlier_run(out: Path) -> Path | None:
    """--overwrite: move the earlier run's artefacts into one hidden .overwritten-* directory
    (renames: the new run never sees a mix of two). They are deleted by `delete_earlier_runs`
    once the new run has written its first checkpoint, so a new run that fails before that
    leaves the earlier one recoverable."""
    names = [n for n in RUN_ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]
    if not names:
        return None
    trash = Path(tempfile.mkdtemp(prefix=".overwritten-", dir=out))
    for name in names:
        (out / name).rename(trash / name)
    print(f"pretrain: --overwrite: the earlier run in '{out}' was moved to {trash.name}, "
          f"deleted once this run writes its first checkpoint", file=sys.stderr)
    return trash


def delete_earlier_runs(out: Path) -> None:
    for old in out.glob(".overwritten-*"):
        shutil.rmtree(old, ignore_errors=True)


def set_aside_later_checkpoints(ckpt_root: Path, ckpt: Path, step: int) -> None:
    """Resuming this run from an earlier checkpoint: move its later ones into
    checkpoints/abandoned-after-<step>-*/ (kept, not deleted), so that the highest step under
    checkpoints/ stays the current one. The main process calls this."""
    if ckpt.parent.resolve() != ckpt_root.resolve():
        return
    later = [d for s, d in step_dirs(ckpt_root) if s > step]
    if later:
        aside = Path(tempfile.mkdtemp(prefix=f"abandoned-after-{step:08d}-", dir=ckpt_root))
        for d in later:
            d.rename(aside / d.name)
        print(f"pretrain: resuming from step {step}: the later checkpoints "
              f"({', '.join(d.name for d in later)}) were moved to {aside}", file=sys.stderr)


def unfit_checkpoint(ckpt: Path, error: Exception) -> CheckpointError:
    """The error for a checkpoint whose state did not load (a changed setting is refused before
    loading: pretrain's resume checks the config first), with the loader's first line."""
    first = (str(error).splitlines() or [""])[0][:200]
    return CheckpointError(
        f"checkpoint '{ckpt}' is unreadable ({type(error).__name__}: {first}): pass another with "
        f"--resume, or start afresh with --overwrite")
