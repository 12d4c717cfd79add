"""The reasons a test is slow, as marks (`make test-fast` leaves slow tests out; see conftest)."""

from __future__ import annotations

import pytest

# FFCV compiles every new Loader's pipeline with numba (seconds each, uncached: its generated code
# cannot be cached on disk).
FFCV = pytest.mark.slow(reason="builds an FFCV loader, whose pipeline numba compiles")


def backends(names) -> list:
    """`names` for a parametrize over loader backends, the FFCV one marked slow."""
    return [pytest.param(b, marks=FFCV) if b == "ffcv" else b for b in names]


# Several processes on the cores of one machine (each on a free port: see tests/processes.py).
multi = pytest.mark.slow(reason="starts several gloo processes")
