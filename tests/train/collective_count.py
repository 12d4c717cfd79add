"""`python -m train.pretrain` with every torch.distributed collective counted by the training step
it follows (launched by test_pretrain's collective-count test, once per process). Writes
$COLLECTIVE_COUNT-<rank>.json: [[step, name], ...], step null for the calls outside
`Bookkeeper.after_step` (set-up, the final checkpoint)."""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from train import bookkeeping
from train.pretrain import main

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
               "broadcast_object_list", "gather", "scatter", "all_to_all", "barrier")
calls: list[tuple[int | None, str]] = []
current: list[int | None] = [None]


def _counting(name: str, fn):
    def counted(*args, **kwargs):
        calls.append((current[0], name))
        return fn(*args, **kwargs)
    return counted


def _install() -> None:
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counting(name, getattr(dist, name)))
    after_step = bookkeeping.Bookkeeper.after_step

    def counted_after_step(self, rec):
        current[0] = rec.step
        try:
            return after_step(self, rec)
        finally:
            current[0] = None

    bookkeeping.Bookkeeper.after_step = counted_after_step


if __name__ == "__main__":
    _install()
    code = main(sys.argv[1:])
    rank = os.environ.get("RANK", "0")
    with open(f"{os.environ['COLLECTIVE_COUNT']}-{rank}.json", "w") as f:
        json.dump(calls, f)
    sys.exit(code)
