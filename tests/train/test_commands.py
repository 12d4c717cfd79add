"""run_command: the one way the commands after pretraining end on a user's problem."""

from __future__ import annotations

import errno

import pytest
import torch

from pipelines.sources import DatasetError
from train.commands import run_command


def fails_with(e: BaseException):
    def work():
        raise e
    return work


def test_user_errors_are_one_line_with_status_2(capsys):
    assert run_command("tool", lambda: None) == 0
    assert run_command("tool", fails_with(DatasetError("no dataset at 'x': convert one"))) == 2
    assert capsys.readouterr().err == "tool: error: no dataset at 'x': convert one\n"
    full = OSError(errno.ENOSPC, "No space left on device", "/out/file")
    assert run_command("tool", fails_with(full), out_option="--json") == 2
    assert capsys.readouterr().err == ("tool: error: No space left on device on '/out/file': "
                                       "pass another --json or free disk space\n")


def test_out_of_memory_is_reported_only_where_a_fix_is_named(capsys):
    oom = torch.OutOfMemoryError("CUDA out of memory")
    assert run_command("tool", fails_with(oom), oom_fix="pass a smaller --batch-size") == 2
    assert capsys.readouterr().err == "tool: error: out of memory: pass a smaller --batch-size\n"
    with pytest.raises(torch.OutOfMemoryError):
        run_command("tool", fails_with(oom))


def test_other_errors_keep_their_traceback():
    class Own(Exception):
        pass

    with pytest.raises(KeyError):
        run_command("tool", fails_with(KeyError("bug")))
    assert run_command("tool", fails_with(Own("named")), errors=(Own,)) == 2
