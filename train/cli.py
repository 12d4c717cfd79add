"""Argument types shared by the command-line tools and commands (tools/, train/).

A number outside its range becomes argparse's one-line usage error naming the option
(`error: argument --workers: must be >= 1, got 0`), not a traceback or a silent NaN later.

    p.add_argument("--workers", type=at_least(1))
    p.add_argument("--json", type=writable_file)  # checked before the work
    p.add_argument("--temperature", type=above(0.0))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    """--checkpoint, as every command that reads a trained model takes it."""
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ folder, or a step-* checkpoint")


def at_least(lo: int) -> Callable[[str], int]:
    """An integer >= lo."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"  # argparse names the type in some messages
    return parse


def above(lo: float) -> Callable[[str], float]:
    """A finite number > lo."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and value > lo):
            raise argparse.ArgumentTypeError(f"must be a finite number > {lo:g}, got {text}")
        return value

    parse.__name__ = f"number > {lo:g}"
    return parse


def writable_file(text: str) -> Path:
    """A path a result file can be written to (checked before the work that produces it: not a
    directory, under a folder that takes new files)."""
    from train.atomic import unwritable

    problem = unwritable(text)
    if problem:
        raise argparse.ArgumentTypeError(f"cannot write '{text}': {problem}")
    return Path(text)


writable_file.__name__ = "writable file path"
