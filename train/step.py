"""The SimCLR training step, one copy for the trainer (train/pretrain.py) and the benchmark
(tools/bench_train.py). It imports no Accelerate: the trainer passes its accelerator's autocast
and backward, the benchmark torch's own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from model.nt_xent import nt_xent
from pipelines.spec import TwoViewBatch


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TwoViewBatch,
                  lr: float, temperature: float, loss_impl: str,
                  autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                  loss_scale: float = 1.0) -> torch.Tensor:
    """Set `lr` on every parameter group, forward both views, NT-Xent, backward, optimizer step.
    Returns the (unscaled, detached) loss on the device: reading it is left to the caller, so the
    step itself never waits on the device."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    with autocast():
        _, z = model(torch.cat([batch.view1, batch.view2]))  # [2B, D]: both views in one pass
    z1, z2 = z.float().chunk(2)
    loss = nt_xent(z1, z2, temperature, impl=loss_impl)  # mean over the 2N anchors
    optimizer.zero_grad(set_to_none=True)
    backward(loss * loss_scale if loss_scale != 1.0 else loss)
    optimizer.step()
    return loss.detach()
