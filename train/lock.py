"""One writer per output: a command that writes a folder (or a set of files) holds an exclusive
`fcntl.flock` on a lock file for its whole life. The kernel releases it when the process ends,
however it ends, so a lock is never stale; a second command on the same output is refused with
one line naming the holder (pid, command, start time: written into the lock file).

Standard library only: train/, tools/ and pipelines/ all use it.

    lock = acquire(out / LOCK_NAME, f"train.out_dir '{out}'", "wait for it or choose another")
    ...
    lock.release()

`released_on_return` lets a function release the locks taken while it runs (`until_return`),
whether it returns or raises.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import os
import sys
from pathlib import Path

LOCK_NAME = ".lock"  # inside a pretraining run directory


class OutputBusy(Exception):
    """Another live process writes the same output."""


def lock_beside(out: Path) -> Path:
    """The lock file of an output that is replaced whole (a folder renamed into place, a set of
    files with one prefix): a hidden file beside it."""
    return out.with_name(f".{out.name}.lock")


class DirLock:
    """A held lock; `release` (or the end of the process) frees it."""

    def __init__(self, path: Path, fd: int, made_dir: bool = False):
        self.path, self.fd, self.made_dir = path, fd, made_dir

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # the file goes while still locked: a later command creates a fresh one
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.made_dir:  # a folder made only for the lock file goes too, if nothing came in
            try:
                os.rmdir(self.path.parent)
            except OSError:
                pass

    def until_return(self) -> DirLock:
        """Released when the innermost running `released_on_return` function ends."""
        if _scopes:
            _scopes[-1].append(self)
        return self

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


_scopes: list[list[DirLock]] = []


def released_on_return(fn):
    """Decorator: the locks `until_return` registers while `fn` runs are released when it ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _scopes.append([])
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in reversed(_scopes.pop()):
                lock.release()
    return wrapper


def holder(fd: int) -> str:
    """Who holds the lock, as its file says."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        return (f"pid {info['pid']} ({info['command']}, started {info['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (starting)"


def acquire(path: Path, what: str, fix: str) -> DirLock:
    """Hold the lock file `path` (created with its folder, which `release` removes again if it
    made it and the folder stayed empty), or raise OutputBusy: '<what> is in use by pid N
    (command, started T): <fix>'."""
    path = Path(path)
    made_dir = False
    while True:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dir = True
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(fd)
            os.close(fd)
            raise OutputBusy(f"{what} is in use by {who}: {fix}") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file as it released it
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    command = " ".join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    info = {"pid": os.getpid(), "command": command[:300],
            "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return DirLock(path, fd, made_dir)
