"""Everything that follows a pretraining step, behind one call: `Bookkeeper.after_step` receives
one `StepRecord` per step and keeps the throughput, the progress bar, the time budget, the log,
stop signals, kNN points and checkpoints.

At a logged step (every train.log_every steps and the last) the processes exchange what they must
agree on (the loss, a stop signal, their training clocks, the budget's step time) in ONE
all-reduce (`agree`) and every decision is taken from its result, the same table on every
process, so no condition can come out differently on two processes and leave one waiting. Other
steps exchange nothing and read nothing back from the device. (A kNN evaluation adds a barrier:
the other processes wait for the main one to evaluate.)
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.flops import model_flops_utilisation
from train.config import Config
from train.features import knn_top1
from train.run import Run
from train.schedule import TrainClock


@dataclass
class StepRecord:
    """What one training step hands to the bookkeeping."""

    step: int  # steps done, this one included
    loss: torch.Tensor  # detached and still on the device: read at logged steps only
    lr: float
    images: int  # images (each two views) of the global batch
    wait_s: float  # seconds this process waited for the batch
    finite: torch.Tensor | None = None  # 0-dim bool on the device: loss and gradients finite
    # 0-dim on the device: the share of anchors whose positive was the most similar candidate
    accuracy: torch.Tensor | None = None


@dataclass
class Agreed:
    """What every process decides from at a logged step."""

    loss: float  # the mean over the processes
    stop: bool  # a signal reached some process
    clock_s: float  # the slowest process's training seconds
    step_s: float  # the slowest process's seconds per timed step (0 outside the budget's fit)
    diverged_at: int = 0  # the first unsound step any process saw (0: none)
    accuracy: float | None = None  # the contrastive accuracy, the mean over the processes


def agree(loss: torch.Tensor, signalled: bool, clock_s: float, step_s: float, *, world: int,
          rank: int, bad_step: torch.Tensor | float = 0.0,
          accuracy: torch.Tensor | None = None) -> Agreed:
    """The one collective of a logged step. Each process writes its row (loss, signal, clock, step
    time, its first unsound step or 0, its contrastive accuracy or NaN) into a [world, 6] table of
    zeros that one all-reduce (sum) completes; the table is read back once. One process: no
    collective, the same one read."""
    row = torch.tensor([0.0, float(signalled), clock_s, step_s, 0.0, math.nan],
                       dtype=torch.float64, device=loss.device)
    row[0] = loss
    row[4] = bad_step
    if accuracy is not None:
        row[5] = accuracy
    if world > 1:
        import torch.distributed as dist

        table = torch.zeros(world, 6, dtype=torch.float64, device=loss.device)
        table[rank] = row
        dist.all_reduce(table)
    else:
        table = row[None]
    rows = table.tolist()
    losses = torch.tensor([r[0] for r in rows], dtype=torch.float32)  # each process's float32
    accuracy = sum(r[5] for r in rows) / world  # NaN when no process measured it
    return Agreed(loss=(losses.sum() / world).item(), stop=max(r[1] for r in rows) > 0,
                  clock_s=max(r[2] for r in rows), step_s=max(r[3] for r in rows),
                  diverged_at=int(min((r[4] for r in rows if r[4] > 0), default=0)),
                  accuracy=None if math.isnan(accuracy) else accuracy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bookkeeper:
    """The bookkeeping of one invocation of `train.pretrain.train`; starts the training clock."""

    def __init__(self, run: Run, checkpoint: Callable[[], Path]):
        from tqdm import tqdm

        self.run, self.checkpoint = run, checkpoint
        self.stop = StopSignals(run.world)
        self.knn = KnnMonitor(run)
        run.schedule.time_steps(run.step, run.cfg.train.log_every)
        self.bar = tqdm(total=run.schedule.last_step, initial=run.step, dynamic_ncols=True,
                        disable=not run.acc.is_main_process, unit="step")
        run.clock.start()
        self.meter = ThroughputMeter(run.flops_per_image, run.peak, run.clock)
        self._timed_s = 0.0  # the clock where the budget's timed steps began
        # The first step whose loss or gradients were not finite (0: none), kept on the device
        # and read at logged steps and checkpoints only; the step whose whole state was last
        # found sound (a resumed checkpoint was verified when it was loaded).
        self._bad_step = torch.zeros((), dtype=torch.float64, device=run.device)
        self._sound_at, self._lr = run.step, 0.0
        self.accuracy: float | None = None  # the contrastive accuracy at the last logged step

    def logged(self, step: int) -> bool:
        return step % self.run.cfg.train.log_every == 0 or step == self.run.schedule.last_step

    def after_step(self, rec: StepRecord) -> None:
        run = self.run
        self.meter.add(rec.images, rec.wait_s)
        self.bar.update(1)
        self._lr = rec.lr
        if rec.finite is not None:  # device ops only: no read back
            first = (self._bad_step == 0) & ~rec.finite
            self._bad_step = torch.where(first, float(rec.step), self._bad_step)
        if rec.step == run.schedule.timed_from:  # the pace of the fit and every re-fit
            _sync(run.device)
            self._timed_s = run.clock.seconds()
        if self.logged(rec.step):
            self._at_logged_step(rec)
        every = run.cfg.train.checkpoint_every
        if every > 0 and rec.step % every == 0:
            self.check_sound(rec.step)
            self.checkpoint()

    def after_epoch(self) -> None:
        self.knn.after_epoch()

    def close(self) -> dict:
        """The end of the loop: the final kNN point (before the last checkpoint, which holds it)
        and the throughput over this invocation."""
        self.bar.close()
        self.check_sound(self.run.step)  # the final checkpoint follows
        self.knn.at_end(stopped=self.stop.now)
        return self.meter.finish()

    def _bad_so_far(self, step: int) -> torch.Tensor:
        """The first unsound step (0: none), the model's and optimizer's whole state looked at
        too: a NaN, an infinity or a value beyond SOUND_LIMIT there counts as unsound at `step`.
        On the device."""
        from train.checkpoint import training_state, unsound_flag

        state_bad = unsound_flag(training_state(self.run.model, self.run.optimizer))
        if state_bad is None:
            return self._bad_step
        return torch.where((self._bad_step == 0) & state_bad, float(step), self._bad_step)

    def check_sound(self, step: int) -> None:
        """Before a checkpoint: every process agrees that no step since the last check was
        unsound and that the state is sound, or the run stops (FloatingPointError) keeping its
        last sound checkpoint. Nothing to do right after a logged step, which checked it all; else
        one read back (and, over several processes, one all-reduce)."""
        if self._sound_at == step:
            return
        bad = self._bad_so_far(step)
        if self.run.world > 1:
            import torch.distributed as dist

            bad = bad.clone()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._stop_if_diverged(int(bad.item()), step)

    def _stop_if_diverged(self, bad_step: int, step: int, loss: float = 0.0) -> None:
        if not bad_step and math.isfinite(loss):
            self._sound_at = step
            return
        from train.checkpoint import SOUND_LIMIT, last_sound_checkpoint

        kept = last_sound_checkpoint(self.run.ckpt_root)
        kept = (f"its last good checkpoint '{kept}' is kept as `latest`" if kept
                else "it has no good checkpoint yet")
        raise FloatingPointError(
            f"training diverged by step {bad_step or step} (its loss, a gradient or a weight "
            f"became NaN, infinite or beyond {SOUND_LIMIT:.1e}; loss at step {step}: {loss:.4g}) "
            f"and was stopped before any checkpoint of it; {kept}: lower optim.lr (now "
            f"{self._lr:.3g}) or raise loss.temperature (or fix augment.mean/std if the inputs "
            f"overflow) and start again with --overwrite or another train.out_dir")

    def _at_logged_step(self, rec: StepRecord) -> None:
        run, sched = self.run, self.run.schedule
        fit = sched.fit_due(rec.step)
        refit = sched.refit_due(rec.step)
        _sync(run.device)  # the loss is read below anyway; the clock then counts the step whole
        now = time.perf_counter()
        clock_s = run.clock.seconds(now)
        step_s = ((clock_s - self._timed_s) / (rec.step - sched.timed_from) if fit or refit
                  else 0.0)
        agreed = agree(rec.loss, self.stop.signal is not None, clock_s, step_s, world=run.world,
                       rank=run.acc.process_index, bad_step=self._bad_so_far(rec.step),
                       accuracy=rec.accuracy)
        self.stop.now = self.stop.now or agreed.stop
        self._stop_if_diverged(agreed.diverged_at, rec.step, agreed.loss)
        if fit or (refit and agreed.step_s > 0):
            self._fit_budget(rec.step, agreed, refit=not fit)
        record = {"step": rec.step, "epoch": rec.step / run.steps_per_epoch, "loss": agreed.loss,
                  "lr": rec.lr, **self.meter.interval(now)}
        if agreed.accuracy is not None:  # the logged step's own batch, not a running mean
            record["contrastive_acc"] = self.accuracy = agreed.accuracy
        run.log(record)
        overrun = sched.overrun(rec.step, agreed.clock_s)
        if overrun:
            self.stop.reason, self.stop.now = overrun, True
        self.bar.set_postfix(loss=f"{agreed.loss:.4f}", lr=f"{rec.lr:.3g}",
                             img_s=f"{record['images_per_s']:.0f}")
        self.knn.at_logged_step(agreed.clock_s)

    def _fit_budget(self, step: int, agreed: Agreed, refit: bool = False) -> None:
        run, sched = self.run, self.run.schedule
        if refit:
            if not sched.refit(agreed.clock_s, step, agreed.step_s):
                return
        else:
            sched.fit(agreed.clock_s, step, agreed.step_s)
        self.bar.total = sched.last_step
        self.bar.refresh()
        run.log({"event": "time_budget", "refit": refit, "step": step, "budget_s": sched.budget_s,
                 "elapsed_s": agreed.clock_s, "step_s": agreed.step_s,
                 "planned_steps": sched.total_steps,
                 "planned_epochs": sched.total_steps / run.steps_per_epoch})


class StopSignals:
    """SIGTERM, SIGHUP (the terminal closed) or a first SIGINT: stop after this step and
    checkpoint; a second SIGINT aborts, a further SIGTERM or SIGHUP changes nothing; an ignored
    SIGHUP (`nohup`) stays ignored. The death of the launcher arrives as SIGTERM
    (train/signals.py: watch_launcher). Several processes stop together at the next logged
    step (a signal may reach them at different steps, and one that stopped alone would leave
    the others waiting). A time-budget overrun stops the run too, with its `reason`."""

    def __init__(self, world: int):
        self.world = world
        self.now = False
        self.signal: str | None = None
        self.reason: str | None = None
        self._pid = os.getpid()
        self._previous = {}

    def install(self) -> None:
        self._previous = {sig: signal.signal(sig, self._on_signal)
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        from tqdm import tqdm

        if os.getpid() != self._pid:  # a forked loader worker: it keeps serving batches
            return
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping (Ctrl-C to the group, then the launcher's death)
        self.signal = signal.Signals(signum).name
        self.now = self.now or self.world == 1
        where = "this step" if self.world == 1 else "the next logged step"
        try:
            tqdm.write(f"pretrain: {self.signal}: stopping after {where} and writing a "
                       f"checkpoint (Ctrl-C again aborts)", file=sys.stderr)
        except OSError:  # no terminal any more (SIGHUP): stop all the same
            pass


class ThroughputMeter:
    """Images (each two views), data-wait seconds and model FLOP/s, per log interval and over the
    invocation, on the training clock (time spent on evaluations is left out)."""

    def __init__(self, flops_per_image: float, peak: float | None, clock: TrainClock):
        self.flops_per_image, self.peak, self.clock = flops_per_image, peak, clock
        self.images, self.wait_s = 0, 0.0  # up to the last interval
        self.tick, self.tick_images, self.tick_wait = clock.seconds(clock.t_start), 0, 0.0

    def add(self, images: int, wait_s: float) -> None:
        self.tick_images += images
        self.tick_wait += wait_s

    def interval(self, now: float) -> dict:
        """The log record's throughput since the last interval, which ends at `now`
        (perf_counter)."""
        t = self.clock.seconds(now)
        ips = self.tick_images / (t - self.tick)
        record = {"images_per_s": ips, "data_wait_frac": self.tick_wait / (t - self.tick),
                  "tflops": ips * self.flops_per_image / 1e12}
        mfu = model_flops_utilisation(self.flops_per_image, ips, self.peak)
        if mfu is not None:
            record["mfu"] = mfu
        self.images += self.tick_images
        self.wait_s += self.tick_wait
        self.tick, self.tick_images, self.tick_wait = t, 0, 0.0
        return record

    def finish(self) -> dict:
        """The summary's throughput over this invocation's training time; the data wait is that
        of the logged intervals."""
        now = time.perf_counter()
        wall = self.clock.wall(now)
        train_s = self.clock.seconds(now) - self.clock.seconds_before
        self.images += self.tick_images
        ips = self.images / train_s if train_s > 0 else 0.0
        return {"images_per_s": ips, "wall_s": wall,
                "data_wait_frac": self.wait_s / train_s if train_s > 0 else 0.0,
                "tflops": ips * self.flops_per_image / 1e12,
                "mfu": model_flops_utilisation(self.flops_per_image, ips, self.peak)
                if wall > 0 else None}


def run_knn(cfg: Config, model, train_split, eval_split, device) -> float:
    """kNN top-1 of the (possibly DDP-wrapped) SimCLR model's encoder."""
    return knn_top1(cfg, getattr(model, "module", model).encoder, train_split, eval_split, device)


class KnnMonitor:
    """kNN top-1 of the encoder on data.eval_split, on the main process: every train.knn_every
    epochs, every train.knn_every_s seconds of training, and at the end (train.knn_every 0: at
    the end only; < 0: never). Each result is a log record (a curve in TensorBoard) and joins
    run.knn_history, which checkpoints carry so that the best value survives a resume. An
    evaluation pauses the training clock."""

    def __init__(self, run: Run):
        self.run = run
        self.result: float | None = None
        self.skipped = knn_skip_reason(run.cfg, run.ds, run.train_split)
        if self.skipped and run.acc.is_main_process:  # said once; the summary repeats the reason
            print(f"pretrain: warning: no kNN monitor: {self.skipped}", file=sys.stderr)
            run.log({"event": "knn_skipped", "step": run.step, "reason": self.skipped})
        # the next point on the training clock (resumed runs continue the same grid)
        self.next_s = _next_point(run.clock.seconds_before, run.cfg.train.knn_every_s)

    def after_epoch(self) -> None:
        run = self.run
        every, spe = run.cfg.train.knn_every, run.steps_per_epoch
        if (run.step % spe == 0 and every > 0 and not self.skipped
                and (run.step // spe) % every == 0 and not self._evaluated_here()):
            self._evaluate()

    def at_logged_step(self, clock_s: float) -> None:
        """train.knn_every_s, from the slowest process's clock, which every process sees."""
        run = self.run
        if (not self.next_s or self.skipped or run.cfg.train.knn_every < 0
                or run.step >= run.schedule.last_step):
            return
        if clock_s >= self.next_s:
            self.next_s = _next_point(clock_s, run.cfg.train.knn_every_s)
            self._evaluate()

    def at_end(self, stopped: bool) -> None:
        run = self.run
        if (run.cfg.train.knn_every >= 0 and not self.skipped and not stopped
                and run.step == run.schedule.last_step and not self._evaluated_here()):
            self._evaluate()
        elif self.result is None and run.knn_history and not stopped:
            self.result = run.knn_history[-1][1]  # resumed after the last evaluation
        elif self.result is None and not self.skipped:
            self.skipped = ("disabled (train.knn_every < 0)" if run.cfg.train.knn_every < 0
                            else f"the run stopped at step {run.step} before the final kNN "
                                 f"evaluation")

    def best(self) -> tuple[float, int] | tuple[None, None]:
        """The highest kNN top-1 of the run (every invocation) and its step."""
        if not self.run.knn_history:
            return None, None
        step, top1 = max(self.run.knn_history, key=lambda h: (h[1], -h[0]))
        return top1, step

    def _evaluated_here(self) -> bool:
        """Whether this step was evaluated already (two cadences, or a resumed run)."""
        history = self.run.knn_history
        return bool(history) and history[-1][0] == self.run.step

    def _evaluate(self) -> None:
        run, cfg, acc = self.run, self.run.cfg, self.run.acc
        with run.clock.paused():
            train_s = run.clock.seconds()
            self.result = None
            if acc.is_main_process:
                self.result = run_knn(cfg, run.model, run.train_split,
                                      run.ds.split(cfg.data.eval_split), run.device)
                run.log({"event": "knn", "step": run.step,
                         "epoch": run.step / run.steps_per_epoch,
                         "images": run.step * cfg.data.batch_size, "train_s": train_s,
                         "knn_top1": self.result})
                acc.print(f"step {run.step}: kNN top-1 on '{cfg.data.eval_split}' = "
                          f"{100 * self.result:.2f}%")
            acc.wait_for_everyone()
        run.knn_history.append([run.step, self.result])


def _next_point(seconds: float, every_s: float) -> float:
    """The first multiple of every_s after `seconds` (0: no timed points)."""
    return (math.floor(seconds / every_s) + 1) * every_s if every_s else 0.0


def knn_skip_reason(cfg: Config, ds, train_split) -> str | None:
    """Why the kNN monitor cannot run on this dataset (None: it can, or it is disabled)."""
    if cfg.train.knn_every < 0:
        return None
    if cfg.data.eval_split not in ds.splits:
        return (f"data.eval_split '{cfg.data.eval_split}' is not in the dataset (splits: "
                f"{', '.join(ds.splits)}); set data.eval_split to a labelled split, or "
                f"train.knn_every=-1")
    for split in (train_split, ds.split(cfg.data.eval_split)):
        if len(split) == 0 or (split.labels < 0).any():
            return f"split '{split.name}' is empty or unlabelled; kNN needs labels"
    if len(np.unique(train_split.labels)) < 2:
        return (f"split '{train_split.name}' holds a single class, so every kNN vote is right; "
                f"the kNN figure needs two classes or more")
    return None
