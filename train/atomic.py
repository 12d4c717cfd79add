"""Atomic file writes and the fault-injection points of the checkpoint tests.

`write_atomic` writes a uniquely named temp file beside the target, opened with
O_CREAT|O_EXCL|O_NOFOLLOW (so an existing file or symlink at the temp name is never written
through), fsyncs it, renames it over the target and fsyncs the directory. A failure removes the
temp file and leaves the target as it was.

`fault_point(name, step)` makes the process SIGKILL itself when the environment variable
SIMCLR_FAULT is `name` or `name@step`: tests use it to kill a real training run at a named phase
of a checkpoint write. Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

FAULT_ENV = "SIMCLR_FAULT"
_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)


def fault_point(name: str, step: int | None = None) -> None:
    want = os.environ.get(FAULT_ENV)
    if want and want in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (never reused: pid and random bits)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the `temp_name`s of `path` left by processes that no longer run (a SIGKILL leaves
    its temp file behind); those of live processes are theirs. Returns what was deleted."""
    gone = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, *, fault: str | None = None,
                 step: int | None = None) -> None:
    """Replace `path` by `data` (str: UTF-8) so that readers see the old or the new content, never
    a mix; `fault` names the fault point between the temp file's fsync and the rename."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    tmp = temp_name(path)
    fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if fault:
            fault_point(fault, step)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def unwritable(path: str | Path) -> str | None:
    """Why `write_atomic(path, ...)` would fail, found before the work that produces the data:
    `path` is a directory, or the nearest existing folder above it is not a directory or takes no
    new file (read-only, no permission: a probe file is created there and removed). None when it
    would succeed, as far as can be told before writing."""
    path = Path(path)
    if path.is_dir():
        return f"'{path}' is a directory"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"'{folder}' is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
    except OSError as e:
        return f"'{folder}' takes no new file ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def die_with_parent(parent: int) -> None:
    """Make this (worker) process die when `parent` does: Linux delivers SIGKILL on the parent's
    death (PR_SET_PDEATHSIG); a parent already gone is caught by checking it after. Elsewhere
    nothing is done. A SIGKILLed command then leaves no worker behind holding memory."""
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)


def remove_dead_temp_dirs(folder: Path, prefix: str) -> list[Path]:
    """Delete the directories `<prefix><pid>-*` in `folder` whose process no longer runs (what a
    SIGKILL left behind); those of live processes are theirs. Returns what was deleted."""
    gone = []
    for tmp in Path(folder).glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            gone.append(tmp)
    return gone


def replace_dir(work: Path, out: Path) -> None:
    """The finished folder `work` becomes `out`; an earlier `out` is swapped out (atomically where
    the system can: readers see the old folder or the new one, never a mix), then deleted."""
    if not out.exists():
        os.rename(work, out)
    elif exchange(work, out):  # `work` now holds the earlier folder
        shutil.rmtree(work)
    else:
        aside = temp_name(out)
        os.rename(out, aside)
        os.rename(work, out)
        shutil.rmtree(aside)
    fsync_dir(out.parent)
