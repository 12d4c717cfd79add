"""Every numba kernel of the loaders compiles once per machine: a fresh process with an empty
cache compiles each and writes it to the cache; the next fresh process loads each from there and
compiles none; a change to the sampler's file alone recompiles the kernels that inline it.
(numba's own per-dispatcher counters are the oracle, not the clock.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.fashion_mnist import REPO

# Runs every kernel once on tiny inputs (with "tail": the FFCV one only), then prints each one's
# (cache hits, cache misses).
_RUN_KERNELS = """
import json, sys
import numpy as np
from pipelines import augment_params as ap, render_cpu
from pipelines.spec import AugmentSpec

spec = AugmentSpec(size=8, blur_p=0.5)
idx = np.arange(3, dtype=np.int64)
images = np.full((3, 8, 8, 3), 100, np.uint8)
key = np.uint64(12345)
render_cpu.tail_batch(images, idx, key, *ap.spec_constants(spec)[4:])
kernels = {"tail_batch": render_cpu.tail_batch}
if sys.argv[2] != "tail":
    _, params = ap.sample_views(spec, 1, 2, idx, 0, 8, 8)
    render_cpu.render_batch(images, params)
    kernels.update(view_key=ap._view_key, sample=ap._sample, render_batch=render_cpu.render_batch)
stats = {name: (sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
         for name, k in kernels.items()}
if sys.argv[1] == "dali":  # the DALI operator's C entry points: compiled at import
    from pipelines import dali_tail
    stats["dali_run"] = (dali_tail._dali_run.cache_hits, int(dali_tail._dali_run.cache_hits == 0))
    stats["dali_setup"] = (dali_tail._dali_setup.cache_hits,
                           int(dali_tail._dali_setup.cache_hits == 0))
print("STATS " + json.dumps(stats))
"""


def kernel_stats(root, with_dali: bool, which: str = "all") -> dict[str, list[int]]:
    """The kernels of `root/pipelines` run in a fresh process with its numba cache in
    `root/cache`: {kernel: [cache hits, cache misses]}."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root / "cache"), "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _RUN_KERNELS, "dali" if with_dali else "-",
                           which], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STATS "))
    return json.loads(line.removeprefix("STATS "))


@pytest.mark.slow(reason="compiles every loader kernel from an empty cache in a fresh process")
@pytest.mark.timeout(900)
def test_kernels_compile_in_the_first_process_and_load_in_the_next(tmp_path):
    """On a copy of pipelines/, so that its sampler can be changed."""
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with_dali = importlib.util.find_spec("nvidia.dali") is not None
    cold = kernel_stats(tmp_path, with_dali)
    assert all(hits == 0 and misses >= 1 for hits, misses in cold.values()), cold
    assert any(p.suffix == ".nbi" for p in (tmp_path / "cache").rglob("*"))
    warm = kernel_stats(tmp_path, with_dali)
    assert warm.keys() == cold.keys()
    assert all(hits >= 1 and misses == 0 for hits, misses in warm.values()), warm
    # numba keys a cached function by its own file: FFCV's kernel (render_cpu) and DALI's entry
    # points (dali_tail) inline the sampler of augment_params, so a change there must recompile
    # them too (pipelines/kernel_cache.py)
    with open(tmp_path / "pipelines" / "augment_params.py", "a") as f:
        f.write("\n# a change to the sampler's file\n")
    changed = kernel_stats(tmp_path, with_dali, "tail")
    assert all(hits == 0 and misses >= 1 for hits, misses in changed.values()), changed
