"""The suite's rules: GPU tests skip without CUDA; every `slow` mark says why; slow tests start
first (so the workers of `make test` finish together); tests over 20 s that are not marked slow
are listed at the end; one intra-op thread per pytest-xdist worker; and the shared fixtures."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.fashion_mnist import build_once, pretrain_tiny, shared_root, subset_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: intra-op threads in each would oversubscribe the cores (OpenMP's
    # spinning threads then slow every worker several-fold). Subprocesses inherit the setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SLOW_S = 20.0  # a test that takes longer on 2 cores is marked slow (README, "Tests")
_durations: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    trained = pytest.mark.slow(reason="uses the shared tiny run, pretrained in a subprocess")
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(trained)
        for mark in item.iter_markers("slow"):
            if not mark.kwargs.get("reason"):
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.slow needs reason='why it is slow' (what it "
                    f"trains, compiles or starts)")
    # Longest first: modules with slow tests start while quick ones fill the other workers'
    # gaps. Whole modules move, so a module-scoped fixture is still built once per worker.
    slow_modules = {item.module.__name__ for item in items
                    if item.get_closest_marker("slow") and hasattr(item, "module")}
    items.sort(key=lambda item: getattr(item, "module", None) is None
               or item.module.__name__ not in slow_modules)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and "slow" not in report.keywords:
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = sorted(((s, n) for n, s in _durations.items() if s > SLOW_S), reverse=True)
    if over:
        terminalreporter.section(f"tests over {SLOW_S:.0f} s not marked slow")
        for s, name in over:
            terminalreporter.write_line(f"{s:6.1f} s  {name}  (mark it slow(reason=...) or "
                                        f"make it faster)")


@pytest.fixture
def torch_threads():
    """torch.set_num_threads for one test: call it with the count; the old one comes back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---------------------------------------------------------------- shared data and runs
# Built once per test run, whichever worker asks first; read-only: copy before changing them.

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """400 train / 200 test real Fashion-MNIST images, converted (with train.beton where FFCV
    imports)."""
    return subset_dataset(tmp_path_factory, 400, 200)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """Three steps of the demo recipe on a width-1/8 network over `tiny_data`, logging every step
    with a kNN point at each: the run directory that the tools reading a run are tested on."""
    def build(out: Path) -> None:
        pretrain_tiny(out, tiny_data, "--train.log_every=1", "--train.knn_every=0",
                      "--train.knn_every_s=0.001", "--train.knn_train_samples=64", steps=3)

    return build_once(shared_root(tmp_path_factory), "tiny-run", build)


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of `tiny_run`, for tests that write into the run directory."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run", symlinks=True))
