"""How the commands run after pretraining end on a problem the user can fix: one line on stderr,
`<prog>: error: <what and the fix>`, and exit status 2, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from pipelines.loader import BackendUnavailable
from pipelines.sources import DatasetError, show_path
from train.checkpoint import CheckpointError
from train.config import ConfigError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, BackendUnavailable)


def run_command(prog: str, work: Callable[[], object], *, out_option: str = "--out",
                oom_fix: str | None = None, errors: tuple[type[Exception], ...] = ()) -> int:
    """Run `work()`; 0 when it returns, 2 after the one-line message of a user error (also
    `errors`), of a failed write (naming `out_option`) or, with `oom_fix`, of running out of
    memory."""
    try:
        work()
        return 0
    except (*USER_ERRORS, *errors) as e:
        message = str(e)
    except torch.OutOfMemoryError:
        if oom_fix is None:
            raise
        message = f"out of memory: {oom_fix}"
    except OSError as e:  # e.g. the output on a read-only file system, or the disk is full
        where = f" on '{show_path(e.filename)}'" if e.filename else ""
        message = f"{e.strerror or e}{where}: pass another {out_option} or free disk space"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def print_report(tables: list, lines: list[str]) -> None:
    """A command's closing report: its rich tables, then `lines` (the paths it wrote among them)
    printed as they are, so a long path is never wrapped at the terminal's width and `[..]` in it
    is never read as markup."""
    from rich.console import Console

    console = Console()
    for table in tables:
        console.print(table)
    for line in lines:
        print(line)
