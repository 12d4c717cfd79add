"""Launching the product's commands as several gloo processes, the way users do."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(module: str, processes: int = 2) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N -m MODULE` (gloo processes on a machine
    without GPUs) on a free port, so concurrent test runs do not collide on Accelerate's 29500."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
            "--num_processes", str(processes), "--main_process_port", str(free_port()),
            "-m", module]
