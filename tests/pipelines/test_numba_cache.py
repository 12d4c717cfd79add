"""Every numba kernel of the loaders compiles once per machine: a fresh process with an empty
cache compiles each and writes it to the cache; the next fresh process loads each from there and
compiles none. (numba's own per-dispatcher counters are the oracle, not the clock.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.fashion_mnist import REPO

# Runs every kernel once on tiny inputs, then prints each one's (cache hits, cache misses).
_RUN_KERNELS = """
import json, sys
import numpy as np
from pipelines import augment_params as ap, render_cpu
from pipelines.spec import AugmentSpec

spec = AugmentSpec(size=8, blur_p=0.5)
idx = np.arange(3, dtype=np.int64)
images = np.full((3, 8, 8, 3), 100, np.uint8)
render_cpu.tail_batch(images, idx, ap.view_key(1, 2, 0), *ap.spec_constants(spec)[4:])
_, params = ap.sample_views(spec, 1, 2, idx, 0, 8, 8)
render_cpu.render_batch(images, params)
kernels = {"view_key": ap._view_key, "sample": ap._sample, "tail_batch": render_cpu.tail_batch,
           "render_batch": render_cpu.render_batch}
stats = {name: (sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
         for name, k in kernels.items()}
if sys.argv[1] == "dali":  # the DALI operator's C entry points: compiled at import
    from pipelines import dali_tail
    stats["dali_run"] = (dali_tail._dali_run.cache_hits, int(dali_tail._dali_run.cache_hits == 0))
    stats["dali_setup"] = (dali_tail._dali_setup.cache_hits,
                           int(dali_tail._dali_setup.cache_hits == 0))
print("STATS " + json.dumps(stats))
"""


def kernel_stats(cache_dir, with_dali: bool) -> dict[str, list[int]]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _RUN_KERNELS, "dali" if with_dali else "-"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STATS "))
    return json.loads(line.removeprefix("STATS "))


@pytest.mark.slow(reason="compiles every loader kernel from an empty cache in a fresh process")
@pytest.mark.timeout(900)
def test_kernels_compile_in_the_first_process_and_load_in_the_next(tmp_path):
    with_dali = importlib.util.find_spec("nvidia.dali") is not None
    cold = kernel_stats(tmp_path / "cache", with_dali)
    assert all(hits == 0 and misses >= 1 for hits, misses in cold.values()), cold
    assert any(p.suffix == ".nbi" for p in (tmp_path / "cache").rglob("*"))
    warm = kernel_stats(tmp_path / "cache", with_dali)
    assert warm.keys() == cold.keys()
    assert all(hits >= 1 and misses == 0 for hits, misses in warm.values()), warm
