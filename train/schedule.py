"""Learning-rate scaling, the warmup + cosine schedule of SimCLR, its fit to a time budget, and the
training clock.

SimCLR (Chen et al. 2020, arXiv:2002.05709, Sec. B.1 and Fig. B.1) scales the base learning rate
with the batch size (linearly, or by the square root for long/small-batch runs), warms up linearly
for 10 epochs and then decays with a cosine schedule without restarts. The training loop reads
``Schedule.lrs[step]``, a list built up front (again once, when a time budget fixes the length);
nothing is parsed or recomputed inside the loop.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

__all__ = [
    "SCALING_RULES",
    "SIMCLR_BASE_LR",
    "Schedule",
    "TrainClock",
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


# The share of a time budget a fitted schedule plans to fill: the rest is room for the final
# checkpoint and what the pace measured missed. Re-fits (`Schedule.refit`) keep the end within
# REFIT_TOLERANCE of the budget, so a run trains its budget to within 2%.
BUDGET_MARGIN = 0.99
REFIT_TOLERANCE = 0.01


def steps_within_budget(budget_s: float, elapsed_s: float, step: int, step_s: float, cap: int,
                        margin: float = 0.97) -> int:
    """Schedule length that ends a run near a wall-clock budget (``train.time_budget_s``).

    After ``step`` steps and ``elapsed_s`` seconds, at a measured ``step_s`` seconds per step, the
    run takes the whole number of further steps nearest to ``(margin * budget_s - elapsed_s) /
    step_s``, so it ends within half a step of ``margin * budget_s`` (rounding down would lose up
    to a whole step, 2% of a budget of 50 steps); the result is that total, at least ``step`` (the
    steps already taken) and at most ``cap`` (the configured epochs). ``margin`` leaves room for
    what the measurement missed (epoch restarts, the final checkpoint).
    """
    for name, value in (("budget_s", budget_s), ("step_s", step_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    if not 0 <= step <= cap:
        raise ValueError(f"step must be in [0, cap={cap}], got {step}")
    more = math.floor(max(0.0, margin * budget_s - elapsed_s) / step_s + 0.5)
    return max(step, min(cap, step + more))


class Schedule:
    """The learning rate of every step (`lrs`) and the step the run ends at (`last_step`).

    Without a time budget it spans `cap_steps` (optim.epochs), cut at `max_steps` when that is set.
    With `budget_s` (train.time_budget_s) steps [timed_from, timed_to) are timed first, past the
    warm-up steps that pay for autotuning, compilation and worker start-up, and the schedule's
    length is then fitted to the budget (`fit`); until then the steps follow the schedule of
    `cap_steps`, which is the same while they lie in the warmup. A resumed run takes the length
    fitted before (`fix`).
    """

    def __init__(self, peak_lr: float, warmup_steps: int, cap_steps: int, max_steps: int = 0,
                 budget_s: float = 0.0):
        self.peak_lr, self.warmup_steps, self.cap_steps = peak_lr, warmup_steps, cap_steps
        self.max_steps, self.budget_s = max_steps, budget_s
        self.planned = budget_s <= 0
        self.timed_from = self.timed_to = -1
        self._plan(cap_steps)

    def _plan(self, total: int) -> None:
        # a budget can cut the schedule inside the warmup
        warmup = min(self.warmup_steps, total) if self.budget_s > 0 else self.warmup_steps
        self.lrs = lr_schedule(self.peak_lr, total, warmup).tolist()
        self.total_steps = total
        self.last_step = min(total, self.max_steps) if self.max_steps > 0 else total

    def fix(self, total: int) -> None:
        """Set the schedule's length once and for all."""
        self._plan(total)
        self.planned = True

    def replan(self, elapsed_s: float, step: int) -> None:
        """A resumed run with another time budget (`budget_s` set to it): what is left is fitted
        to it at once, at the mean pace of the `step` steps so far (`elapsed_s` seconds, warm-up
        steps included, so the pace errs slow); with no budget now, the schedule of the epochs."""
        if self.budget_s <= 0:
            self.fix(self.cap_steps)
        elif step > 0 and elapsed_s > 0:
            self.fit(elapsed_s, step, elapsed_s / step)
        else:
            self.planned = False  # nothing trained yet: time the first steps as usual

    @property
    def planned_steps(self) -> int | None:
        """The length fitted to the time budget (None without a budget or before the fit)."""
        return self.total_steps if self.budget_s > 0 and self.planned else None

    def time_steps(self, first_step: int, log_every: int) -> None:
        """Time from `first_step` + 10 to the first logged step (a multiple of `log_every`) at
        least 20 steps later: the fit happens where the processes exchange their clocks."""
        self.timed_from = first_step + 10
        self.timed_to = -(-(self.timed_from + 20) // log_every) * log_every

    def fit_due(self, step: int) -> bool:
        return not self.planned and step == self.timed_to

    def fit(self, elapsed_s: float, step: int, step_s: float) -> None:
        """Fit the length to the budget after `elapsed_s` seconds and `step` steps, at `step_s`
        seconds a step (the slowest process's figures, so that every process plans alike)."""
        self.fix(steps_within_budget(self.budget_s, elapsed_s, step, step_s, self.cap_steps,
                                     BUDGET_MARGIN))

    def refit_due(self, step: int) -> bool:
        """Whether a logged `step` re-fits the length: a budgeted run past its first fit (or a
        resumed one past its timed steps) that has steps left."""
        return (self.budget_s > 0 and self.planned and 0 <= self.timed_to < step
                and step < self.last_step)

    def refit(self, elapsed_s: float, step: int, step_s: float) -> bool:
        """Re-fit the length at a later logged step at the pace measured since the timed steps
        began (`step_s`), when the plan would otherwise end more than REFIT_TOLERANCE of the
        budget away from it: a pace that changed (another job on the machine, slower epochs)
        still ends the run on time, and a run already past the budget ends at `step`. The
        warmup + cosine is stretched or shrunk to the new length (the learning rate moves by a
        small step where it happens). Returns whether the length changed."""
        total = steps_within_budget(self.budget_s, elapsed_s, step, step_s, self.cap_steps,
                                    BUDGET_MARGIN)
        if total == self.total_steps or (
                abs(total - self.total_steps) * step_s <= REFIT_TOLERANCE * self.budget_s
                and total > step):
            return False
        self.fix(total)
        return True

    def overrun(self, step: int, elapsed_s: float) -> str | None:
        """Why the run stops when the fitted plan was too optimistic, else None."""
        if (self.budget_s > 0 and self.planned and step < self.last_step
                and elapsed_s > 1.2 * self.budget_s):
            return f"time budget: {elapsed_s:.0f} s > 1.2 x train.time_budget_s"
        return None


class TrainClock:
    """Seconds of training over every invocation of a run: wall time less the pauses for
    evaluation. The time budget, the timed kNN points and the throughput all read this one clock.
    """

    def __init__(self, seconds_before: float = 0.0):
        self.seconds_before = seconds_before  # earlier invocations' training seconds
        self.start()

    def start(self, now: float | None = None) -> None:
        self.t_start = time.perf_counter() if now is None else now
        self.paused_s = 0.0

    def seconds(self, now: float | None = None) -> float:
        """Training seconds of the run so far (every invocation)."""
        return self.seconds_before + self.wall(now) - self.paused_s

    def wall(self, now: float | None = None) -> float:
        """Wall seconds of this invocation, pauses included."""
        return (time.perf_counter() if now is None else now) - self.t_start

    @contextlib.contextmanager
    def paused(self):
        """The time spent in the block is off the clock."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0
