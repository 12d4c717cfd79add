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
from train.lock import OutputBusy

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, BackendUnavailable, OutputBusy)


def run_command(prog: str, work: Callable[[], object], *, out_option: str = "--out",
                write_fix: str | None = None, oom_fix: str | None = None,
                errors: tuple[type[Exception], ...] = (), interrupted: str | None = None) -> int:
    """Run `work()`; 0 when it returns, 2 after the one-line message of a user error (also
    `errors`), of a failed write (naming `out_option`, or saying `write_fix`) or, with `oom_fix`,
    of running out of memory; with `interrupted`, 130 after that line on Ctrl-C. The message is
    printed on a line of its own: progress bars still drawn are closed first."""
    try:
        work()
        return 0
    except (*USER_ERRORS, *errors) as e:
        message = f"error: {e}"
    except torch.OutOfMemoryError:
        if oom_fix is None:
            raise
        message = f"error: out of memory: {oom_fix}"
    except OSError as e:  # e.g. the output on a read-only file system, or the disk is full
        where = f" on '{show_path(e.filename)}'" if e.filename else ""
        fix = write_fix or f"pass another {out_option} or free disk space"
        message = f"error: {e.strerror or e}{where}: {fix}"
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        _close_bars()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    _close_bars()
    print(f"{prog}: {message}", file=sys.stderr)
    return 2


def _close_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


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
