"""`pipelines.render_cpu`'s kernel as a DALI operator of the CPU graph, run per sample on DALI's
threads. Imported only where a DALI CPU pipeline is built: its entry points compile (or load from
numba's cache) on import.
"""

from __future__ import annotations

import numba
import numpy as np

from pipelines.render_cpu import as_voidptr, render_tail

# DALI's NumbaFunction compiles a generic C entry point around the kernel in every process (about
# 3 s on top of the kernel's own compilation). The two entry points below are that wrapper written
# for this one operator (one uint8 HWC output; a uint8 HWC image and float64 params in) and cached
# on disk like the kernels, so a DALI CPU pipeline builds in a fraction of a second once a
# machine has compiled them. DALI's calling convention (nvidia.dali.plugin.numba, sample mode):
# every `*_ptr` is an address; `ptrs` holds one data address per tensor; `shapes` holds, per
# tensor and per sample, the address of that sample's int64 shape; `ndims` is int32 per tensor.

@numba.njit(inline="always")
def _shape(shapes, tensor, samples, sample, ndim):
    table = numba.carray(as_voidptr(shapes), (tensor + 1) * samples, np.int64)
    return numba.carray(as_voidptr(table[tensor * samples + sample]), ndim, np.int64)


_U64, _I32 = numba.types.uint64, numba.types.int32
_RUN_SIG = numba.types.void(_U64, _U64, _U64, _I32, _U64, _U64, _U64, _I32)
_SETUP_SIG = numba.types.void(_U64, _U64, _I32, _U64, _U64, _I32, _I32)


@numba.cfunc(_RUN_SIG, nopython=True, cache=True)
def _dali_run(out_ptrs, out_shapes, out_ndims, num_outs, in_ptrs, in_shapes, in_ndims, num_ins):
    outs = numba.carray(as_voidptr(out_ptrs), 1, np.int64)
    ins = numba.carray(as_voidptr(in_ptrs), 2, np.int64)
    s = _shape(out_shapes, 0, 1, 0, 3)
    out = numba.carray(as_voidptr(outs[0]), (s[0], s[1], s[2]), np.uint8)  # [H, W, 3]
    s = _shape(in_shapes, 0, 1, 0, 3)
    image = numba.carray(as_voidptr(ins[0]), (s[0], s[1], s[2]), np.uint8)  # [H, W, 3]
    params = numba.carray(as_voidptr(ins[1]), _shape(in_shapes, 1, 1, 0, 1)[0], np.float64)
    out[:] = image
    render_tail(out, params)


@numba.cfunc(_SETUP_SIG, nopython=True, cache=True)
def _dali_setup(out_shapes, out_ndims, num_outs, in_shapes, in_ndims, num_ins, num_samples):
    """Each output has its input image's shape."""
    for i in range(num_samples):
        src = _shape(in_shapes, 0, num_samples, i, 3)
        dst = _shape(out_shapes, 0, num_samples, i, 3)
        for d in range(3):
            dst[d] = src[d]


def dali_tail():
    """A DALI CPU operator: (uint8 HWC image, float64 [N_P] params) -> the rendered uint8 HWC image.
    DALI runs it per sample on its own threads."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba import NumbaFunction

    class CachedTail(NumbaFunction):
        """DALI's NumbaFunction with the cached entry points above instead of its own."""

        def _get_run_fn_cpu(self, *args):
            return _dali_run.address

        def _get_setup_fn_cpu(self, setup_fn):
            return _dali_setup.address

    return CachedTail(run_fn=None, out_types=[types.UINT8],
                      in_types=[types.UINT8, types.FLOAT64], outs_ndim=[3], ins_ndim=[3, 1])
