"""A process that a launcher started stops when the launcher is gone (`watch_launcher`).

`accelerate launch --num_processes 1` (what `make demo` runs) starts its one worker with
subprocess.Popen and forwards no signal: SIGTERM or SIGHUP kills the launcher at once and the
worker trains on, owned by nobody. A worker started by a launcher therefore watches its parent
and, when the parent is gone, sends itself SIGTERM: pretraining then checkpoints and exits as on a
SIGTERM of its own (train/bookkeeping.py: StopSignals); a command without checkpoints
(fine-tuning) simply ends. torchrun (the multi-process form) forwards signals, and its workers
watch their parent the same way in case it is killed outright.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# torchrun sets TORCHELASTIC_RUN_ID in its workers' environment; `accelerate launch` (either form)
# sets ACCELERATE_MIXED_PRECISION, which a user may also export for a plain `python -m ...` run:
# that one counts only when the parent is an `accelerate` process.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
PARENT_POLL_S = 0.25


def started_by_launcher(environ=os.environ, parent_cmdline: str | None = None) -> bool:
    """Whether `accelerate launch` or torchrun started this process (`parent_cmdline`: the
    parent's command line, by default read from /proc where there is one)."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return True
    if "ACCELERATE_MIXED_PRECISION" not in environ:
        return False
    if parent_cmdline is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                parent_cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # no /proc (macOS): the environment decides
            return True
    return "accelerate" in parent_cmdline


@contextmanager
def watch_launcher(prog: str, poll_s: float = PARENT_POLL_S) -> Iterator[None]:
    """While the block runs, in a process a launcher started: once the parent process is gone
    (the process was re-parented), say so on stderr and send this process SIGTERM, once. Does
    nothing in a process started otherwise (a shell may well exit before a command it put in
    the background, and that command must run on)."""
    if not started_by_launcher():
        yield
        return
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent:
                try:
                    print(f"{prog}: the launcher (pid {parent}) has exited: stopping as on "
                          f"SIGTERM", file=sys.stderr, flush=True)
                except (OSError, ValueError):  # no terminal any more: stop all the same
                    pass
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
