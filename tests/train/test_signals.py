"""train.signals.watch_launcher in this process: the parent's death becomes one SIGTERM, only in a
process a launcher started, and nothing is left watching after the block."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from train import signals
from train.signals import started_by_launcher, watch_launcher


@pytest.fixture
def sigterms():
    """The SIGTERMs this process receives while the test runs (instead of dying of them)."""
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGTERM, previous)


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "watch-launcher"]


def test_started_by_launcher_reads_the_launchers_environment_and_command():
    launch = "/venv/bin/python /venv/bin/accelerate launch -m train.pretrain"
    assert started_by_launcher({"ACCELERATE_MIXED_PRECISION": "no"}, launch)
    assert started_by_launcher({"TORCHELASTIC_RUN_ID": "none"}, "/venv/bin/torchrun")
    assert not started_by_launcher({"PATH": "/bin"}, launch)
    # a user's exported setting, in a process a shell started
    assert not started_by_launcher({"ACCELERATE_MIXED_PRECISION": "bf16"}, "-bash")


def test_parent_death_sends_one_sigterm(monkeypatch, sigterms, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    parent = os.getppid()
    with watch_launcher("pretrain", poll_s=0.01):
        assert len(_watchers()) == 1
        time.sleep(0.05)
        assert sigterms == []  # the parent lives: nothing
        monkeypatch.setattr(signals.os, "getppid", lambda: 1 if parent != 1 else 2)
        deadline = time.time() + 30
        while not sigterms and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    assert sigterms == [signal.SIGTERM]
    assert f"pretrain: the launcher (pid {parent}) has exited" in capsys.readouterr().err
    assert _watchers() == []


def test_no_watch_without_a_launcher(monkeypatch, sigterms):
    for name in signals.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(signals.os, "getppid", lambda: -1)
    with watch_launcher("pretrain", poll_s=0.01):
        assert _watchers() == []
        time.sleep(0.05)
    assert sigterms == []
