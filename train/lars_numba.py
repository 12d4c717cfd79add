"""The CPU step of LARS's adapted tensors: one numba kernel per tensor, spread over threads.

A LARS step is memory-bound on the CPU. Per tensor, the kernel reads ``w`` and ``g`` once for the
three sums ``<w, w>``, ``<g, g>`` and ``<g, w>`` (float64 accumulators), forms the trust ratio in
registers, then makes one pass that reads ``w``, ``g``, ``v`` and writes ``v``, ``w``. The second
pass finds ``w`` and ``g`` still in cache for all but the largest tensors, so the step moves about
as many bytes as torch's foreach momentum SGD (which makes three passes over the velocity).

The kernels release the GIL, so ``torch.get_num_threads()`` Python threads step the tensors, each
taking the largest one left when it is free. The learning rate is read inside the kernel from a
one-element array, so a 0-d tensor LR is never copied to a Python float.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["Workers", "adapted_step"]

# reassociation lets LLVM vectorise the sums; no "nnan"/"ninf", so NaN and inf propagate as in torch
_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(fastmath=_FASTMATH, nogil=True, cache=True)
def _lars_kernel(w, g, v, lr, wd, eta, momentum):  # pragma: no cover - compiled
    """One tensor: its three sums in float64, then its update (w and g mostly still in cache)."""
    ww = 0.0
    gg = 0.0
    gw = 0.0
    for i in range(w.size):
        wi = w[i]
        gi = g[i]
        ww += wi * wi
        gg += gi * gi
        gw += gi * wi
    uu = gg + wd * (2.0 * gw + wd * ww)  # ||g + wd w||^2 without forming g + wd w
    w_norm = math.sqrt(ww)
    u_norm = math.sqrt(max(uu, 0.0))
    trust = eta * w_norm / u_norm if (w_norm > 0.0 and u_norm > 0.0) else 1.0
    a = w.dtype.type(lr[0] * trust)  # the vector loop stays in the element dtype
    b = w.dtype.type(lr[0] * trust * wd)
    m = w.dtype.type(momentum)
    for i in range(w.size):
        vi = m * v[i] + a * g[i] + b * w[i]
        v[i] = vi
        w[i] -= vi


def _flat_array(t: Tensor) -> np.ndarray | None:
    """A 1-D numpy array on ``t``'s memory in storage order (e.g. channels_last), or None when
    that memory has gaps."""
    t = t.detach()
    if not t.is_contiguous():
        order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
        t = t.permute(order)
        if not t.is_contiguous():
            return None
    return t.view(-1).numpy()


def _aliases(w: Tensor, g: Tensor, v: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if w.dtype not in (torch.float32, torch.float64) or w.device.type != "cpu":
        return None
    if not (w.stride() == g.stride() == v.stride() and w.dtype == g.dtype == v.dtype):
        return None
    arrays = (_flat_array(w), _flat_array(g), _flat_array(v))
    return None if any(a is None for a in arrays) else arrays  # type: ignore[return-value]


class Workers:
    """The threads that step tensors beside the caller's, one set per optimizer.

    Made on first use, and made again when the count changes or in a forked child (which copies
    the pool but none of its threads).
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._key = (0, 0)

    def pool(self, n: int) -> ThreadPoolExecutor:
        key = (os.getpid(), n)
        if self._pool is None or self._key != key:
            if self._pool is not None and self._key[0] == key[0]:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="lars")
            self._key = key
        return self._pool


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _work(jobs: list[Arrays], order: Iterator[int], hyper: tuple[Any, ...]) -> None:
    """Step tensors until ``order`` (shared by all threads) runs out."""
    for i in order:  # next() on a shared iterator is atomic under the GIL
        w, g, v = jobs[i]
        _lars_kernel(w, g, v, *hyper)


def adapted_step(
    w: list[Tensor], g: list[Tensor], v: list[Tensor], group: dict[str, Any], workers: Workers
) -> list[int]:
    """Step the adapted CPU tensors ``w`` in place; return the indices of those left to the caller.

    Tensors whose ``w``, ``g`` and ``v`` do not share one dense layout and a float32/float64 dtype
    are left.
    """
    jobs: list[Arrays] = []
    taken, left = [], []
    for i, (wi, gi, vi) in enumerate(zip(w, g, v, strict=True)):
        arrays = _aliases(wi, gi, vi)
        if arrays is None:
            left.append(i)
        else:
            jobs.append(arrays)
            taken.append(i)
    if not jobs:
        return left
    lr = group["lr"]
    if isinstance(lr, Tensor):  # read by the kernel, not copied to the host by a .item()
        lr_arr = lr.detach().to(device="cpu", dtype=torch.float64).reshape(1).numpy()
    else:
        lr_arr = np.array([lr], dtype=np.float64)
    hyper = (lr_arr, float(group["weight_decay"]), float(group["eta"]), float(group["momentum"]))
    # Largest first, each thread taking the next tensor when it is free: a thread slowed down
    # (e.g. sharing its core with an OpenMP worker still spinning after the backward pass) simply
    # takes fewer tensors. Which thread steps a tensor does not change the result.
    order = iter(sorted(range(len(jobs)), key=lambda i: -jobs[i][0].size))
    threads = max(1, min(torch.get_num_threads(), len(jobs)))
    futures: list[Future] = []
    if threads > 1:
        # sized by torch's count, not this call's, so groups of other sizes reuse it
        pool = workers.pool(torch.get_num_threads() - 1)
        futures = [pool.submit(_work, jobs, order, hyper) for _ in range(threads - 1)]
    try:
        _work(jobs, order, hyper)
    finally:
        for f in futures:  # wait for every thread before leaving, even after an error here
            f.exception()
    for f in futures:
        f.result()
    # writes through numpy skip the version counters that autograd checks
    for i in taken:
        torch.autograd.graph.increment_version(w[i])
        torch.autograd.graph.increment_version(v[i])
    return left
