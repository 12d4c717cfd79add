"""The pieces of a training step, one copy for the pretraining loop (train/pretrain.py), the
fine-tuning loop (train/finetune.py) and the benchmark (tools/bench_train.py). A loop reads

    lr = set_lr(optimizer, lrs[step])
    loss, accuracy = two_view_step(model, optimizer, batch, criterion, ...)  # fwd..step
    finite = step_finite(optimizer, loss)   # the step's health, a flag left on the device

where `two_view_step` is either the plain step

    loss, accuracy = two_view_loss(model, batch, criterion, autocast)  # forward, the loss
    optimizer_step(optimizer, loss, backward)                        # backward, step

or, with `micro_batch` images per forward chunk, `micro_batched_step`: the same loss and update
for the whole batch with the activations of one chunk in memory (gradient caching).

It imports no Accelerate: the trainer passes its accelerator's autocast, backward and no_sync,
the benchmark torch's own. Nothing here reads a value back from the device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from model.losses import contrastive_loss
from pipelines.spec import TwoViewBatch

Context = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Criterion:
    """The contrastive loss a step minimises (model/losses.py: NT-Xent by default), called on the
    two views' projections: (loss, contrastive accuracy), both 0-dim tensors on the device, the
    accuracy from the loss's own pass (the share of anchors whose positive is the most similar
    of every candidate)."""

    temperature: float
    impl: str = "auto"
    loss: str = "nt_xent"
    similarity: str = "cosine"
    semi_hard: bool = False
    margin: float = 0.5

    @classmethod
    def of(cls, loss_cfg, impl: str) -> Criterion:
        """The criterion a `train.config.LossConfig` describes, run by implementation `impl`."""
        return cls(loss_cfg.temperature, impl, loss_cfg.name, loss_cfg.similarity,
                   loss_cfg.semi_hard, loss_cfg.margin)

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return contrastive_loss(z1, z2, loss=self.loss, temperature=self.temperature,
                                margin=self.margin, similarity=self.similarity,
                                semi_hard=self.semi_hard, impl=self.impl, with_accuracy=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set `lr` on every parameter group; returns it."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def two_view_loss(model: torch.nn.Module, batch: TwoViewBatch, criterion: Criterion,
                  autocast: Context = contextlib.nullcontext
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views through the SimCLR model in one pass, then the criterion (the mean over the 2N
    anchors) in float32: (loss, contrastive accuracy)."""
    with autocast():
        _, z = model(torch.cat([batch.view1, batch.view2]))  # [2B, D]
    z1, z2 = _at_least_float32(z).chunk(2)
    return criterion(z1, z2)


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    """Projections made under autocast, in float32 for the loss (float64 stays float64)."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                   loss_scale: float = 1.0) -> torch.Tensor:
    """Zero the gradients, backward `loss` (times `loss_scale`), step; returns the detached,
    unscaled loss, still on the device."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss * loss_scale if loss_scale != 1.0 else loss)
    optimizer.step()
    return loss.detach()


def chunks(rows: int, micro_batch: int) -> list[slice]:
    """The forward chunks of a per-process batch of `rows` images: `micro_batch` each, the last
    one smaller when it does not divide; one chunk when `micro_batch` is 0 or >= rows."""
    size = micro_batch if 0 < micro_batch < rows else rows
    return [slice(s, min(s + size, rows)) for s in range(0, rows, size)]


def _running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm's running mean, variance and count (what a train-mode forward updates)."""
    return [b for m in model.modules() if isinstance(m, _BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def micro_batched_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       batch: TwoViewBatch, criterion: Criterion, micro_batch: int,
                       autocast: Context = contextlib.nullcontext,
                       backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                       no_sync: Context = contextlib.nullcontext,
                       loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the whole batch holding the activations of `micro_batch` images
    (both views) at a time (gradient caching, Gao et al., 2021):

    1. every chunk of both views forward without autograd, keeping only the projections z
       [2B, D]; BatchNorm running statistics are put back afterwards, so this pass leaves none;
    2. the criterion on all of z (negatives gathered across processes as in the plain step)
       and its gradient with respect to this process's z;
    3. every chunk forward again with autograd, back-propagating its rows of that gradient; the
       parameter gradients add up over the chunks, and `no_sync` (the accelerator's, which holds
       back DDP's gradient all-reduce) wraps every chunk but the last;
    4. the optimizer step.

    The loss, its negatives and the update are the whole batch's; only BatchNorm sees chunks: in
    train mode each chunk (both views of its images) is normalised with its own statistics, and
    the running statistics are updated once per chunk, by the second pass. With the model's
    BatchNorm in eval mode (or absent) the gradients equal the plain step's. Returns the detached,
    unscaled loss and the contrastive accuracy, still on the device."""
    parts = chunks(len(batch.index), micro_batch)
    v1, v2 = batch.view1, batch.view2

    def forward(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            _, z = model(torch.cat([v1[rows], v2[rows]]))  # [2b, D]
        return _at_least_float32(z).chunk(2)

    stats = _running_stats(model)
    saved = [b.clone() for b in stats]
    with torch.no_grad():
        z1, z2 = (torch.cat(zs) for zs in zip(*(forward(rows) for rows in parts)))  # [B, D] x2
    for b, s in zip(stats, saved):
        b.copy_(s)

    z1.requires_grad_(True)
    z2.requires_grad_(True)
    with torch.enable_grad():
        loss, accuracy = criterion(z1, z2)
        g1, g2 = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, (z1, z2))

    optimizer.zero_grad(set_to_none=True)
    for i, rows in enumerate(parts):
        with no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
            c1, c2 = forward(rows)
            # d/dc of <c, g> is g: the chunk's share of the whole batch's loss gradient
            backward((c1 * g1[rows]).sum() + (c2 * g2[rows]).sum())
    optimizer.step()
    return loss.detach(), accuracy


def two_view_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TwoViewBatch,
                  criterion: Criterion, autocast: Context = contextlib.nullcontext,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                  loss_scale: float = 1.0, micro_batch: int = 0,
                  no_sync: Context = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, the criterion, backward and the optimizer step on `batch`: the plain step, or
    `micro_batched_step` when `micro_batch` is smaller than the per-process batch. The detached,
    unscaled loss and the contrastive accuracy, on the device."""
    if len(chunks(len(batch.index), micro_batch)) > 1:
        return micro_batched_step(model, optimizer, batch, criterion, micro_batch, autocast,
                                  backward, no_sync, loss_scale)
    loss, accuracy = two_view_loss(model, batch, criterion, autocast)
    return optimizer_step(optimizer, loss, backward, loss_scale), accuracy


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
                  lr: float, criterion: Criterion, autocast: Context = contextlib.nullcontext,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                  loss_scale: float = 1.0, micro_batch: int = 0) -> torch.Tensor:
    """The pretraining loop's step for the benchmark: `set_lr`, then `two_view_step`; the
    detached loss."""
    set_lr(optimizer, lr)
    return two_view_step(model, optimizer, batch, criterion, autocast, backward, loss_scale,
                         micro_batch)[0]
