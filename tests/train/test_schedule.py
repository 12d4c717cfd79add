"""LR scaling rules and the warmup + cosine schedule against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from train.schedule import SIMCLR_BASE_LR, epochs_to_steps, lr_schedule, scaled_lr, steps_per_epoch


def test_scaled_lr_rules():
    assert scaled_lr(0.3, 256, "linear") == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 1024, "sqrt") == pytest.approx(2.4)
    # the paper's two defaults meet at B = 4096
    assert scaled_lr(SIMCLR_BASE_LR["sqrt"], 4096, "sqrt") == pytest.approx(
        scaled_lr(SIMCLR_BASE_LR["linear"], 4096, "linear"))
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)  # linear is the default


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.3, 256, "log"), "unknown LR scaling rule 'log'"),
        ((0.3, 0, "linear"), "batch_size"),
        ((0.3, 256.0, "linear"), "batch_size"),
        ((-0.3, 256, "sqrt"), "base_lr"),
        ((float("nan"), 256, "sqrt"), "base_lr"),
    ],
)
def test_scaled_lr_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        scaled_lr(*args)


def _closed_form(peak, total, warmup, final):
    out = []
    for s in range(total):
        if s < warmup:
            out.append(peak * (s + 1) / warmup)
        else:
            p = (s - warmup + 1) / (total - warmup)
            out.append(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * p)))
    return out


@pytest.mark.parametrize("peak, total, warmup, final", [(4.8, 110, 10, 0.0), (1.0, 37, 5, 0.01)])
def test_schedule_closed_form(peak, total, warmup, final):
    lrs = lr_schedule(peak, total, warmup, final)
    assert lrs.dtype == torch.float64 and lrs.shape == (total,)
    assert lrs[0].item() == pytest.approx(peak / warmup)  # first step is not zero
    assert lrs[warmup - 1].item() == pytest.approx(peak)  # warmup ends exactly at the peak
    assert lrs[-1].item() == pytest.approx(final, abs=1e-15)  # decays to final_lr at the end
    torch.testing.assert_close(lrs, torch.tensor(_closed_form(peak, total, warmup, final),
                                                 dtype=torch.float64))
    assert (lrs[1:warmup] > lrs[: warmup - 1]).all()
    assert (lrs[warmup:] < lrs[warmup - 1 : -1]).all()


def test_schedule_cosine_midpoint():
    peak, final, warmup, total = 2.0, 0.2, 10, 110  # 100 decay steps
    lrs = lr_schedule(peak, total, warmup, final)
    assert lrs[warmup - 1 + 50].item() == pytest.approx((peak + final) / 2)
    assert (lrs[warmup - 1 + 25].item()
            == pytest.approx(final + (peak - final) * (0.5 + 0.5 * math.sqrt(0.5))))


def test_schedule_edge_cases():
    only_cosine = lr_schedule(1.0, 4, 0)
    torch.testing.assert_close(
        only_cosine, torch.tensor([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)],
                                  dtype=torch.float64))
    only_warmup = lr_schedule(1.0, 4, 4)
    torch.testing.assert_close(only_warmup,
                               torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert lr_schedule(3.0, 1, 0).tolist() == [0.0]


@pytest.mark.parametrize(
    "args, match",
    [
        ((1.0, 0, 0), "total_steps"),
        ((1.0, 10, 11), "warmup_steps"),
        ((1.0, 10, -1), "warmup_steps"),
        ((1.0, 10.0, 2), "total_steps"),
        ((-1.0, 10, 2), "peak_lr"),
        ((1.0, 10, 2, float("inf")), "final_lr"),
    ],
)
def test_schedule_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        lr_schedule(*args)


def test_epochs_and_steps():
    assert steps_per_epoch(50_000, 512) == 97
    assert steps_per_epoch(50_000, 512, drop_last=False) == 98
    assert steps_per_epoch(1024, 512, drop_last=False) == 2
    assert epochs_to_steps(10, 97) == 970
    assert epochs_to_steps(0.5, 97) == 49  # 48.5 rounds up
    assert epochs_to_steps(0, 97) == 0
    with pytest.raises(ValueError, match="exceeds"):
        steps_per_epoch(100, 512)
    with pytest.raises(ValueError, match="epochs"):
        epochs_to_steps(-1, 97)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        epochs_to_steps(1, 0)


def test_base_lr_defaults_to_the_papers_for_each_rule_and_an_explicit_lr_wins():
    from train.config import load_config
    from train.schedule import base_lr

    for rule, paper in (("linear", 0.3), ("sqrt", 0.075)):
        cfg = load_config(None, [f"--optim.lr_scaling={rule}"])
        assert cfg.optim.lr == 0.0 and base_lr(cfg.optim.lr, rule) == paper
        assert base_lr(0.5, rule) == 0.5
    # 4.8, as linear at 0.3
    assert scaled_lr(base_lr(0.0, "sqrt"), 4096, "sqrt") == pytest.approx(0.075 * 64)
    with pytest.raises(ValueError, match="rule"):
        base_lr(0.0, "log")


# ---------------------------------------------------------------- Schedule and TrainClock

def test_schedule_times_steps_up_to_a_logged_step():
    """The budget's timed steps start 10 steps in and end at the first logged step (a multiple of
    log_every) at least 20 steps later, where the processes exchange their clocks."""
    from train.schedule import Schedule

    for first, log_every, window in [(0, 10, (10, 30)), (0, 1, (10, 30)), (17, 10, (27, 50)),
                                     (5, 7, (15, 35)), (0, 100, (10, 100))]:
        s = Schedule(1.0, 5, 200, budget_s=60.0)
        s.time_steps(first, log_every)
        assert (s.timed_from, s.timed_to) == window
        assert s.timed_to % log_every == 0
        assert s.fit_due(window[1]) and not s.fit_due(window[1] - 1)


def test_schedule_fit_to_budget_and_overrun():
    from train.schedule import Schedule

    s = Schedule(1.0, 5, 100, max_steps=0, budget_s=60.0)
    assert not s.planned and s.planned_steps is None and s.last_step == 100
    s.fit(elapsed_s=20.0, step=30, step_s=0.5)  # 30 + floor((0.99 * 60 - 20) / 0.5) = 108 > cap
    assert s.planned and s.total_steps == s.planned_steps == s.last_step == 100
    assert not s.fit_due(s.timed_to)
    s.fit(elapsed_s=20.0, step=30, step_s=1.0)  # 30 + floor(39.4) = 69
    assert s.total_steps == 69 and s.lrs == lr_schedule(1.0, 69, 5).tolist()
    assert s.overrun(50, 72.0) is None  # 1.2 x 60 = 72 is still within
    assert s.overrun(50, 72.1) == "time budget: 72 s > 1.2 x train.time_budget_s"
    assert s.overrun(69, 100.0) is None  # the last step: nothing left to cut

    capped = Schedule(1.0, 5, 100, max_steps=40)  # no budget: the epochs' schedule, cut
    assert capped.planned and capped.planned_steps is None
    assert (capped.total_steps, capped.last_step) == (100, 40)
    assert capped.lrs == lr_schedule(1.0, 100, 5).tolist()


def test_a_budget_shorter_than_the_warmup_cuts_the_warmup():
    from train.schedule import Schedule

    s = Schedule(2.0, 50, 100, budget_s=10.0)
    s.fix(20)
    assert s.lrs == lr_schedule(2.0, 20, 20).tolist()  # the warmup fills the 20 steps


def test_train_clock_spans_invocations_and_leaves_pauses_out(monkeypatch):
    import time

    from train.schedule import TrainClock

    clock = TrainClock(seconds_before=100.0)
    clock.start(now=0.0)
    reads = iter([2.0, 5.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(reads))
    with clock.paused():  # [2, 5): an evaluation
        pass
    assert clock.paused_s == 3.0
    assert clock.wall(10.0) == 10.0
    assert clock.seconds(10.0) == 100.0 + 10.0 - 3.0


def test_replan_fits_what_is_left_to_the_new_budget_at_the_pace_so_far():
    from train.schedule import Schedule

    s = Schedule(1.0, 5, 100, budget_s=60.0)
    s.fix(50)  # the plan the checkpoint recorded, 40 steps done in 40 s
    s.budget_s = 100.0  # the resumed run's budget
    s.replan(elapsed_s=40.0, step=40)  # 40 + floor((0.99 * 100 - 40) / 1.0) = 99
    assert s.planned and s.total_steps == s.last_step == 99
    assert s.lrs == lr_schedule(1.0, 99, 5).tolist()
    s.budget_s = 30.0  # less than already spent: the run ends where it is
    s.replan(elapsed_s=40.0, step=40)
    assert s.total_steps == 40
    s.budget_s = 0.0  # no budget now: the epochs' schedule
    s.replan(elapsed_s=40.0, step=40)
    assert s.planned and s.total_steps == 100 and s.planned_steps is None
    fresh = Schedule(1.0, 5, 100, budget_s=60.0)
    fresh.replan(elapsed_s=0.0, step=0)
    assert not fresh.planned  # nothing trained: the first steps are timed as usual


def test_refits_keep_the_end_within_the_budget_as_the_pace_changes():
    """After the first fit, a logged step re-fits the length at the pace since the timed steps
    began: a pace within 1% of the budget of the plan keeps it; a slower or faster one moves the
    end back to 99% of the budget (closed form); a run past its budget ends at the step."""
    from train.schedule import Schedule

    s = Schedule(1.0, 5, 1000, budget_s=100.0)
    s.time_steps(0, 10)  # timed 10..30
    assert not s.refit_due(40)  # nothing to re-fit before the first fit
    s.fit(elapsed_s=20.0, step=30, step_s=0.5)  # 30 + round((99 - 20) / 0.5) = 188
    assert s.total_steps == 188 and not s.refit_due(30) and s.refit_due(40)
    assert not s.refit(elapsed_s=25.0, step=40, step_s=0.502)  # 187: 0.5 s off, kept
    assert s.total_steps == 188
    assert s.refit(elapsed_s=30.0, step=40, step_s=0.75)  # slower: 40 + round(69 / 0.75) = 132
    assert s.total_steps == s.last_step == 132 and s.lrs == lr_schedule(1.0, 132, 5).tolist()
    assert s.refit(elapsed_s=40.0, step=60, step_s=0.4)  # faster: 60 + round(147.5) = 208
    assert s.total_steps == 208
    assert s.refit(elapsed_s=100.5, step=150, step_s=1.0)  # past the budget: ends here
    assert s.total_steps == s.last_step == 150 and not s.refit_due(150)
