"""Learning-rate scaling and the warmup + cosine schedule of SimCLR, computed up front.

SimCLR (Chen et al. 2020, arXiv:2002.05709, Sec. B.1 and Fig. B.1) scales the base learning rate
with the batch size (linearly, or by the square root for long/small-batch runs), warms up linearly
for 10 epochs and then decays with a cosine schedule without restarts. The training loop reads
``lrs[step]`` from a tensor built once here; nothing is parsed or recomputed inside the loop.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SCALING_RULES",
    "SIMCLR_BASE_LR",
    "base_lr",
    "epochs_to_steps",
    "steps_within_budget",
    "lr_schedule",
    "scaled_lr",
    "steps_per_epoch",
]

# Paper defaults for the base learning rate of each scaling rule (LARS, Sec. B.1).
SIMCLR_BASE_LR = {"linear": 0.3, "sqrt": 0.075}
SCALING_RULES = tuple(SIMCLR_BASE_LR)


def base_lr(lr: float, rule: str) -> float:
    """The base learning rate a run uses: `lr` when set (> 0), else the paper's base for `rule`
    (0.3 for linear scaling, 0.075 for square-root scaling; Sec. B.1)."""
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}: use one of {', '.join(SCALING_RULES)}")
    return lr if lr > 0 else SIMCLR_BASE_LR[rule]


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """Peak learning rate for a global batch of ``batch_size`` examples.

    ``rule="linear"``: ``base_lr * batch_size / 256`` (SimCLR: base_lr = 0.3).
    ``rule="sqrt"``:   ``base_lr * sqrt(batch_size)`` (SimCLR: base_lr = 0.075).
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}: use one of {', '.join(SCALING_RULES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be finite and >= 0, got {base_lr!r}")
    if rule == "linear":
        return base_lr * batch_size / 256.0
    return base_lr * math.sqrt(batch_size)


def lr_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int, final_lr: float = 0.0
) -> torch.Tensor:
    """Learning rate of every optimizer step, float64 ``[total_steps]``.

    With ``S = total_steps``, ``W = warmup_steps`` and step index ``s`` (0-based):

    - warmup, ``0 <= s < W``:  ``lr[s] = peak_lr * (s + 1) / W``, so the first step is
      ``peak_lr / W`` (not zero) and the last warmup step ``s = W - 1`` is exactly ``peak_lr``;
    - cosine, ``W <= s < S``:  ``lr[s] = final_lr + (peak_lr - final_lr) * 0.5 * (1 + cos(pi * p))``
      with ``p = (s - W + 1) / (S - W)``, so the last step ``s = S - 1`` is exactly ``final_lr`` and
      ``s = W - 1 + (S - W) / 2`` (when ``S - W`` is even) is exactly ``(peak_lr + final_lr) / 2``.

    ``W = 0`` gives a pure cosine decay, ``W = S`` a pure warmup.
    """
    for name, value in (("total_steps", total_steps), ("warmup_steps", warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    for name, lr in (("peak_lr", peak_lr), ("final_lr", final_lr)):
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {lr!r}")

    s = torch.arange(total_steps, dtype=torch.float64)  # [S]
    lrs = torch.empty(total_steps, dtype=torch.float64)  # [S]
    if warmup_steps > 0:
        lrs[:warmup_steps] = peak_lr * (s[:warmup_steps] + 1.0) / warmup_steps
    decay = total_steps - warmup_steps
    if decay > 0:
        p = (s[warmup_steps:] - warmup_steps + 1.0) / decay  # (0, 1]
        lrs[warmup_steps:] = final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + torch.cos(math.pi * p))
    return lrs


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_last: bool = True) -> int:
    """Optimizer steps in one pass over ``num_examples``: ``floor(N / B)``, or ``ceil(N / B)`` when
    the last partial batch is kept (``drop_last=False``)."""
    if num_examples <= 0 or global_batch_size <= 0:
        raise ValueError(f"num_examples and global_batch_size must be > 0, got {num_examples} "
                         f"and {global_batch_size}")
    if drop_last:
        steps = num_examples // global_batch_size
        if steps == 0:
            raise ValueError(f"global_batch_size {global_batch_size} exceeds num_examples "
                             f"{num_examples} with drop_last")
        return steps
    return -(-num_examples // global_batch_size)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``epochs * steps_per_epoch`` rounded to the nearest step (halves round up); fractional epochs
    are allowed (e.g. a 0.5-epoch warmup)."""
    if not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"epochs must be finite and >= 0, got {epochs!r}")
    if (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
            or steps_per_epoch <= 0):
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    return int(math.floor(epochs * steps_per_epoch + 0.5))


def steps_within_budget(budget_s: float, elapsed_s: float, step: int, step_s: float, cap: int,
                        margin: float = 0.97) -> int:
    """Schedule length that ends a run near a wall-clock budget (``train.time_budget_s``).

    After ``step`` steps and ``elapsed_s`` seconds, at a measured ``step_s`` seconds per step, the
    run can take ``floor((margin * budget_s - elapsed_s) / step_s)`` more steps; the result is that
    total, at least ``step`` (the steps already taken) and at most ``cap`` (the configured epochs).
    ``margin`` leaves room for what the measurement missed (epoch restarts, the final checkpoint).
    """
    for name, value in (("budget_s", budget_s), ("step_s", step_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    if not 0 <= step <= cap:
        raise ValueError(f"step must be in [0, cap={cap}], got {step}")
    more = math.floor(max(0.0, margin * budget_s - elapsed_s) / step_s)
    return max(step, min(cap, step + more))
