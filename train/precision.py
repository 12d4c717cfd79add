"""Which precision a run computes in: bf16 autocast where the hardware has native bf16 (every
recent GPU; CPUs with AVX512-BF16 or AMX, and Arm CPUs with the BF16 extension), float32
elsewhere.

Under bf16 autocast the convolutions and matrix products run in bf16 while the parameters, the
optimizer (LARS's norms and momentum), BatchNorm's running statistics and the loss stay float32
(train/step.py casts the projections to float32 before the loss). A CPU without native bf16 runs
bf16 through conversions, several times slower than float32, so `auto` never picks it there.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively: x86 AVX512-BF16 or AMX tiles (as torch
    detects them), or the Arm BF16 extension ('bf16' among /proc/cpuinfo's features)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            text = CPUINFO.read_text()
        except OSError:
            return False
        return any(line.split(":", 1)[0].strip() == "Features" and "bf16" in line.split()
                   for line in text.splitlines())
    return False


def accelerate_precision(setting: str, cuda: bool) -> str:
    """Accelerate's mixed_precision for train.mixed_precision: auto is bf16 on a GPU and on a CPU
    with native bf16 (`cpu_native_bf16`), else float32; fp32 is Accelerate's "no"."""
    if setting == "auto":
        return "bf16" if cuda or cpu_native_bf16() else "no"
    return {"fp32": "no"}.get(setting, setting)


def autocast(precision: str, device: torch.device | str):
    """A factory of the autocast context for Accelerate's `precision` ("bf16" or "no") on
    `device`: bf16 autocast, or no autocast."""
    device = torch.device(device)
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
