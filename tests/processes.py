"""Running the product's commands: as several gloo processes, the way users launch them, or as
their main() in the test's own process where no process boundary is under test."""

from __future__ import annotations

import signal
import socket
import sys

import torch


def main_here(main, args) -> int:
    """`main(args)` in this process, without a process start (about 2.5 s of imports); the signal
    handlers it installs and the torch thread count it sets are put back afterwards, and
    Accelerate's per-process state is forgotten, so the next run may choose another precision (as
    a new process would: the state refuses a second mixed_precision)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        return main([str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        state = sys.modules.get("accelerate.state")
        if state is not None:
            state.AcceleratorState._reset_state()


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
