"""The factory that picks a loader backend (`build_loader`), and the contract every backend keeps;
their base class, `TwoViewLoader`, is in `pipelines.loader_base`.

A loader is constructed for one split, one rank, and yields `TwoViewBatch`es:

    loader = build_loader("torchvision", split, spec, batch_size=256, rank=0, world=1,
                          seed=0, device=torch.device("cpu"), num_workers=2)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...            # len(loader) batches per epoch
    state = loader.state_dict()             # {"epoch": e, "batch": b}: position for resume
    loader.load_state_dict(state)           # next iteration resumes at batch b of epoch e

Contract shared by all backends:
  - view1/view2: float [B, 3, S, S], normalised with spec.mean/std, channels_last, on `device`,
    in `dtype` (float32 by default; bfloat16 when training in bf16 on a GPU).
  - label: int64 [B]; index: int64 [B], the sample's position in the split.
  - the samples of epoch e on `rank` are `sharding.shard_indices(len(split), rank, world,
    seed=seed, epoch=e, shuffle=shuffle, batch_size=batch_size, drop_last=drop_last)`, read in
    that order; the last batch may be short when drop_last is False. With `subset` (indices of
    the split, e.g. the labelled images of semi-supervised fine-tuning) the epoch is over
    `subset` instead: position p of the shard reads sample `subset[p]`, so `index` and the
    augmentation keys stay the split's own indices.
  - the augmentation of a sample depends only on (seed, epoch, index), not on rank or workers,
    so resuming and changing the worker count reproduce the same batches.
"""

from __future__ import annotations

import importlib

from pipelines.loader_base import TwoViewLoader
from pipelines.sources import Split
from pipelines.spec import AugmentSpec

BACKENDS = ("torchvision", "dali", "ffcv")
# backend -> (module it needs, what to install)
_NEEDS = {"dali": ("nvidia.dali", "nvidia-dali-cuda130"),
          "ffcv": ("ffcv", "ffcv (after apt-get install libopencv-dev libturbojpeg0-dev)")}


class BackendUnavailable(RuntimeError):
    """A loader backend whose library does not import here; the message says what to do."""


def require_backend(backend: str) -> None:
    """Raise BackendUnavailable, naming the package and the alternative, when `backend` cannot
    load."""
    if backend not in _NEEDS:
        return
    module, package = _NEEDS[backend]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install's OSError
        raise BackendUnavailable(f"data.backend '{backend}' needs {module}, which does not import "
                                 f"here ({type(e).__name__}: {e}): install {package}, or use "
                                 f"--data.backend=torchvision") from None


def build_loader(backend: str, split: Split, spec: AugmentSpec, **settings) -> TwoViewLoader:
    """The `backend` loader of `split`; `settings` are `TwoViewLoader`'s keyword arguments."""
    require_backend(backend)
    if backend == "torchvision":
        from pipelines.torchvision_loader import TorchvisionTwoViewLoader

        return TorchvisionTwoViewLoader(split, spec, **settings)
    if backend == "dali":
        from pipelines.dali_loader import DaliTwoViewLoader

        return DaliTwoViewLoader(split, spec, **settings)
    if backend == "ffcv":
        from pipelines.ffcv_loader import FfcvTwoViewLoader

        return FfcvTwoViewLoader(split, spec, **settings)
    raise ValueError(f"unknown loader backend '{backend}': choose one of {', '.join(BACKENDS)}")
