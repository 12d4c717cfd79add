"""numba's on-disk cache for the loader kernels, keyed by every source file they compile in.

numba keys a cached function by the file that defines it. The loader kernels reach across files:
`render_cpu` inlines the sampler of `augment_params` (and its `P_*` constants), and the entry
points of `dali_tail` link `render_cpu`'s kernel. After an update that changed only
`augment_params.py`, their cached machine code would still draw the old parameters. So the
functions of these three files are cached under a stamp of all three: any change recompiles them
all, once. Importing this module installs that (`augment_params` does, before its kernels).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numba.core.caching as caching

SOURCES = tuple(Path(__file__).resolve().parent / name
                for name in ("augment_params.py", "render_cpu.py", "dali_tail.py"))


@functools.cache
def sources_stamp() -> str:
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _for_kernels(locator: type) -> type:
    """`locator` (one of numba's file-backed cache locators) for the functions of SOURCES only,
    stamped by all of them."""

    class KernelLocator(locator):
        @classmethod
        def from_function(cls, py_func, py_file):
            if Path(py_file).resolve() not in SOURCES:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return sources_stamp()

    return KernelLocator


def _install() -> None:
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    found = [getattr(caching, n, None) or getattr(caching, "_" + n, None) for n in names]
    if impl is None or None in found:  # another numba layout: per-file stamps, as numba has them
        return
    # In numba's order (NUMBA_CACHE_DIR, then __pycache__ beside the source, then the user's
    # cache folder), ahead of numba's own locators, which serve every other function.
    impl._locator_classes[:0] = [_for_kernels(cls) for cls in found]


_install()
