"""The pieces of a training step, one copy for the pretraining loop (train/pretrain.py), the
fine-tuning loop (train/finetune.py) and the benchmark (tools/bench_train.py). A loop reads

    lr = set_lr(optimizer, lrs[step])
    loss = two_view_loss(model, batch, temperature, loss_impl, autocast)  # forward, NT-Xent
    optimizer_step(optimizer, loss, backward)                          # backward, step
    finite = step_finite(optimizer, loss)   # the step's health, a flag left on the device

It imports no Accelerate: the trainer passes its accelerator's autocast and backward, the
benchmark torch's own. Nothing here reads a value back from the device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from model.nt_xent import nt_xent
from pipelines.spec import TwoViewBatch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set `lr` on every parameter group; returns it."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def two_view_loss(model: torch.nn.Module, batch: TwoViewBatch, temperature: float,
                  loss_impl: str,
                  autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext
                  ) -> torch.Tensor:
    """Both views through the SimCLR model in one pass, then NT-Xent (the mean over the 2N
    anchors) in float32."""
    with autocast():
        _, z = model(torch.cat([batch.view1, batch.view2]))  # [2B, D]
    z1, z2 = z.float().chunk(2)
    return nt_xent(z1, z2, temperature, impl=loss_impl)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                   loss_scale: float = 1.0) -> torch.Tensor:
    """Zero the gradients, backward `loss` (times `loss_scale`), step; returns the detached,
    unscaled loss, still on the device."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss * loss_scale if loss_scale != 1.0 else loss)
    optimizer.step()
    return loss.detach()


def step_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """Whether the step just taken was sound: its loss and the norm of every gradient finite (a
    NaN or infinite gradient, or one whose norm overflows float32). A 0-dim bool tensor left on
    the device: called after `optimizer_step` (the gradients stay until the next step's
    zero_grad), it reads nothing back and changes nothing."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    total = loss.detach().float().reshape(())
    if grads:
        total = total + torch.stack(torch._foreach_norm(grads)).float().sum().to(total.device)
    return torch.isfinite(total)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TwoViewBatch,
                  lr: float, temperature: float, loss_impl: str,
                  autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                  loss_scale: float = 1.0) -> torch.Tensor:
    """The three pieces in the pretraining loop's order, for the benchmark: the detached loss."""
    set_lr(optimizer, lr)
    loss = two_view_loss(model, batch, temperature, loss_impl, autocast)
    return optimizer_step(optimizer, loss, backward, loss_scale)
