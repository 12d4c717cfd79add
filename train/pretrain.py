r"""SimCLR pretraining.

    accelerate launch -m train.pretrain --config train/configs/fashion_mnist_demo.yaml \
        [--resume auto] [--section.key=value ...]

One process on CPU, several CPU processes over gloo (`accelerate launch --multi_gpu
--num_processes N` on a machine without GPUs), or GPUs with bf16 autocast. Writes to
train.out_dir: config.yaml, log.jsonl, TensorBoard events, checkpoints/, summary.json.
A directory that already holds a run is continued with --resume or replaced with --overwrite,
never mixed into. SIGTERM or Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and
exits with status 0; a second Ctrl-C aborts at once (status 130), keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from model.flops import model_flops_utilisation
from pipelines.loader import BackendUnavailable, build_loader
from pipelines.sharding import dropped_per_epoch
from pipelines.sources import DatasetDir, DatasetError, Split, open_dataset
from train.atomic import write_atomic
from train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    step_dirs,
)
from train.config import (
    Config,
    ConfigError,
    accelerate_precision,
    config_to_dict,
    load_config,
    save_config,
)
from train.features import knn_top1
from train.schedule import base_lr, lr_schedule, scaled_lr, steps_within_budget
from train.step import training_step

if TYPE_CHECKING:
    from accelerate import Accelerator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.pretrain",
        description="SimCLR pretraining. Any setting can be overridden as --section.key=value "
        "(e.g. --optim.lr=0.5 --data.batch_size=512); see train/config.py for every key.",
    )
    p.add_argument("--config",
                   help="YAML recipe (train/configs/*.yaml); defaults apply to keys it omits")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint: 'auto' (the run's newest complete one, if "
                   "any) or a checkpoint/run path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in train.out_dir: its config, logs, checkpoints "
                   "and summary are moved aside, and deleted once this run writes its first "
                   "checkpoint (without this or --resume such a directory is refused)")
    return p


RUN_ARTEFACTS = ("checkpoints", "summary.json", "log.jsonl", "config.yaml", "tb",
                 "linear_eval.json")


def _earlier_run(out: Path) -> str | None:
    """What in `out` shows an earlier run (its checkpoints, summary or log), or None."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and ((ckpts / "latest").exists() or any(ckpts.glob("step-*"))):
        return "checkpoints"
    for name in ("summary.json", "log.jsonl"):
        if (out / name).exists():
            return name
    return None


def _set_aside_earlier_run(out: Path) -> Path | None:
    """--overwrite: move the earlier run's artefacts into one hidden .overwritten-* directory
    (renames: the new run never sees a mix of two). They are deleted by
    `_delete_earlier_runs` once the new run has written its first checkpoint, so a new run
    that fails before that leaves the earlier one recoverable."""
    names = [n for n in RUN_ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]
    if not names:
        return None
    trash = Path(tempfile.mkdtemp(prefix=".overwritten-", dir=out))
    for name in names:
        (out / name).rename(trash / name)
    return trash


def _delete_earlier_runs(out: Path) -> None:
    for old in out.glob(".overwritten-*"):
        shutil.rmtree(old, ignore_errors=True)


def _set_aside_later_checkpoints(acc, ckpt_root: Path, ckpt: Path, step: int) -> None:
    """Resuming this run from an earlier checkpoint: move its later ones into
    checkpoints/abandoned-after-<step>-*/ (kept, not deleted), so that the highest step under
    checkpoints/ stays the current one."""
    if acc.is_main_process and ckpt.parent.resolve() == ckpt_root.resolve():
        later = [d for s, d in step_dirs(ckpt_root) if s > step]
        if later:
            aside = Path(tempfile.mkdtemp(prefix=f"abandoned-after-{step:08d}-", dir=ckpt_root))
            for d in later:
                d.rename(aside / d.name)
            print(f"pretrain: resuming from step {step}: the later checkpoints "
                  f"({', '.join(d.name for d in later)}) were moved to {aside}", file=sys.stderr)
    acc.wait_for_everyone()


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _config_diff(ckpt: Path, current: dict) -> list[str]:
    """'key (checkpoint A, now B)' for the settings that shape the saved state (model.*,
    optim.name) and differ between the checkpoint's config.yaml and `current`."""
    try:
        saved = _flat(yaml.safe_load((ckpt / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    now = _flat(current)
    diff = [k for k in now if (k.startswith("model.") or k == "optim.name")
            and k in saved and saved[k] != now[k]]
    return [f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in diff[:6]]


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    from train.lars import LARS, lars_param_groups

    groups = lars_param_groups(model, cfg.optim.weight_decay)
    if cfg.optim.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.optim.momentum, eta=cfg.optim.eta)
    for g in groups:  # the same exclusions, without layer-wise adaptation
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.optim.momentum, foreach=True)


def run_knn(cfg: Config, model, train_split, eval_split, device) -> float:
    """kNN top-1 of the (possibly DDP-wrapped) SimCLR model's encoder."""
    return knn_top1(cfg, getattr(model, "module", model).encoder, train_split, eval_split, device)


class Schedule:
    """The learning rate of every step and the step the run ends at. Without a time budget the
    schedule spans optim.epochs; with one its length is fixed (`planned`) once the first steps are
    timed, or taken from the checkpoint."""

    def __init__(self, peak_lr: float, warmup_steps: int, cap_steps: int, budget: float,
                 max_steps: int):
        self.peak_lr, self.warmup_steps, self.cap_steps = peak_lr, warmup_steps, cap_steps
        self.budget, self.max_steps = budget, max_steps
        self.planned = budget <= 0
        self.plan(cap_steps)

    def plan(self, total: int) -> None:
        if self.budget > 0:  # a budget can cut the schedule inside the warmup
            self.lrs = lr_schedule(self.peak_lr, total, min(self.warmup_steps, total)).tolist()
        else:
            self.lrs = lr_schedule(self.peak_lr, total, self.warmup_steps).tolist()
        self.total_steps = total
        self.last_step = min(total, self.max_steps) if self.max_steps > 0 else total

    def fix(self, total: int) -> None:
        self.plan(total)
        self.planned = True

    @property
    def planned_steps(self) -> int | None:
        """The length fitted to the time budget (None without a budget or before the fit)."""
        return self.total_steps if self.budget > 0 and self.planned else None


@dataclass
class Run:
    """What a pretraining run works with, built by `set_up`; `step` advances as it trains."""

    cfg: Config
    acc: Accelerator
    world: int
    device: torch.device
    out: Path  # train.out_dir
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # pipelines.loader's loader: len, iter, set_epoch, state_dict, load_state_dict
    ds: DatasetDir
    train_split: Split
    schedule: Schedule
    steps_per_epoch: int
    precision: str  # Accelerate's mixed_precision: "bf16", "fp16" or "no"
    loss_impl: str
    flops_per_image: float  # conv+matmul FLOPs, fwd+bwd, 2 views
    peak: float | None  # the device's peak FLOP/s, where known
    overwrite: bool
    step: int = 0
    seconds_before: float = 0.0  # training seconds of earlier invocations (time budget)
    t_start: float = 0.0  # perf_counter() when this invocation's first step began
    paused_s: float = 0.0  # seconds of this invocation spent on kNN evaluations, off the clock
    knn_history: list = field(default_factory=list)  # [step, kNN top-1] of every evaluation
    log: RunLog | None = None
    config_yaml: str = ""  # the resolved settings, written into every checkpoint

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def train_seconds(self, now: float | None = None) -> float:
        """Training seconds of this run over every invocation, the time budget's clock (kNN
        evaluations excluded)."""
        now = time.perf_counter() if now is None else now
        return self.seconds_before + now - self.t_start - self.paused_s


def set_up(cfg: Config, resume: str | None, overwrite: bool) -> Run:
    """Accelerator, data, schedule, model and optimizer, once train.out_dir is known to be usable
    (nothing is written yet)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from model.flops import peak_flops, training_flops_per_image
    from model.global_batchnorm import convert_to_global_bn
    from model.nt_xent import resolve_impl
    from model.simclr import build_simclr

    cuda = torch.cuda.is_available()
    precision = accelerate_precision(cfg.train.mixed_precision, cuda)
    acc = Accelerator(cpu=not cuda, mixed_precision=precision)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    if cfg.data.batch_size % world:
        raise ConfigError(f"config: data.batch_size {cfg.data.batch_size} is not divisible by the "
                          f"{world} processes: use a multiple of {world}")
    set_seed(cfg.train.seed)
    out = Path(cfg.train.out_dir)
    _check_out_dir(out, resume, overwrite)
    acc.wait_for_everyone()  # every process has looked before the earlier run is moved away

    ds = open_dataset(cfg.data.path)
    train_split = ds.split(cfg.data.train_split)
    local_batch = cfg.data.batch_size // world
    if len(train_split) // world < local_batch:
        raise ConfigError(f"config: 'data.batch_size' {cfg.data.batch_size} exceeds the "
                          f"{len(train_split)} images of split '{cfg.data.train_split}' in "
                          f"'{cfg.data.path}': lower it")
    loader = build_loader(cfg.data.backend, train_split, cfg.augment, batch_size=local_batch,
                          rank=rank, world=world, seed=cfg.train.seed, device=device,
                          num_workers=cfg.data.num_workers, drop_last=True)
    steps_per_epoch = len(loader)
    schedule = _schedule(cfg, acc, steps_per_epoch)

    model = build_simclr(cfg.model)
    if world > 1 and cfg.train.sync_bn:
        model = convert_to_global_bn(model, device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops_per_image = training_flops_per_image(model, cfg.augment.size)
    peak = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    try:
        loss_impl = resolve_impl(cfg.loss.impl, device, cfg.model.head_out)
    except ValueError as e:
        raise ConfigError(f"config: 'loss.impl': {e}") from None
    return Run(cfg, acc, world, device, out, model, optimizer, loader, ds, train_split, schedule,
               steps_per_epoch, precision, loss_impl, flops_per_image, peak, overwrite)


def _check_out_dir(out: Path, resume: str | None, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config: train.out_dir '{out}' is an existing file, not a directory: "
                          f"choose another --train.out_dir")
    if resume is not None and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir, --overwrite deletes it: "
                          "pass one of them")
    earlier = _earlier_run(out) if resume is None else None
    if earlier and not overwrite:
        raise CheckpointError(f"train.out_dir '{out}' already holds a run ({earlier}): continue it "
                              f"with --resume, replace it with --overwrite, or choose another "
                              f"--train.out_dir")


def _schedule(cfg: Config, acc, steps_per_epoch: int) -> Schedule:
    cap_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup_steps > cap_steps:
        acc.print(f"warning: optim.warmup_epochs ({cfg.optim.warmup_epochs:g}) exceeds "
                  f"optim.epochs ({cfg.optim.epochs}): the warmup takes the whole run",
                  file=sys.stderr)
        warmup_steps = cap_steps
    peak_lr = scaled_lr(base_lr(cfg.optim.lr, cfg.optim.lr_scaling), cfg.data.batch_size,
                        cfg.optim.lr_scaling)
    return Schedule(peak_lr, warmup_steps, cap_steps, cfg.train.time_budget_s,
                    cfg.train.max_steps)


def resume_from(run: Run, resume: str) -> None:
    """Continue from the checkpoint `resume` names ('auto': the run's newest, if any): model,
    optimizer and RNG state, step, training seconds, the loader's position, the budget's plan."""
    acc, cfg = run.acc, run.cfg
    ckpt = latest_checkpoint(run.ckpt_root) if resume == "auto" else resolve_checkpoint(resume)
    if ckpt is None:
        if acc.is_main_process:
            acc.print(f"no checkpoint under {run.ckpt_root}: starting afresh")
        return
    state = read_trainer_state(ckpt)
    if state.get("world") != run.world or state.get("steps_per_epoch") != run.steps_per_epoch:
        raise CheckpointError(f"checkpoint '{ckpt}' was written with {state.get('world')} "
                              f"processes and {state.get('steps_per_epoch')} steps/epoch, this "
                              f"run has {run.world} and {run.steps_per_epoch}: resume with the "
                              f"same launch settings")
    try:
        acc.load_state(str(ckpt))
    except Exception as e:
        diff = _config_diff(ckpt, config_to_dict(cfg))
        if diff:
            raise CheckpointError(
                f"checkpoint '{ckpt}' does not fit this run: its config differs in "
                f"{'; '.join(diff)}: resume with the checkpoint's settings, or start a new "
                f"run with --overwrite or another --train.out_dir") from None
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {first}): pass "
            f"another with --resume, or start afresh with --overwrite") from None
    run.step = state["step"]
    run.seconds_before = state.get("train_seconds", 0.0)
    run.knn_history = [list(h) for h in state.get("knn_history", [])]
    _set_aside_later_checkpoints(acc, run.ckpt_root, ckpt, run.step)
    if run.schedule.budget > 0 and state.get("planned_steps"):
        run.schedule.fix(state["planned_steps"])
    run.loader.load_state_dict(state["loader"])
    acc.print(f"resumed from {ckpt} at step {run.step}")


def open_run_dir(run: Run) -> None:
    """--overwrite: set the earlier run aside; then write config.yaml, open log.jsonl and
    TensorBoard."""
    acc, out = run.acc, run.out
    if run.overwrite and acc.is_main_process and out.is_dir():  # after the settings proved usable
        trash = _set_aside_earlier_run(out)
        if trash is not None:
            print(f"pretrain: --overwrite: the earlier run in '{out}' was moved to {trash.name}, "
                  f"deleted once this run writes its first checkpoint", file=sys.stderr)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, out / "config.yaml")
    run.log = RunLog(out, acc.is_main_process)
    run.config_yaml = yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False)


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    """Pretrain as `cfg` says; the run's summary (also written to summary.json)."""
    from tqdm import tqdm

    run = set_up(cfg, resume, overwrite)
    if resume is not None:
        resume_from(run, resume)
    acc, sched = run.acc, run.schedule
    if run.step >= sched.last_step and (run.out / "summary.json").is_file():
        acc.print(f"run '{run.out}' already finished ({run.step} steps): nothing to do; start a "
                  f"new one with --overwrite or another --train.out_dir, or raise optim.epochs / "
                  f"train.max_steps")
        return json.loads((run.out / "summary.json").read_text())

    open_run_dir(run)
    stop = StopSignals(run.world)
    stop.install()
    _announce(run)
    knn = KnnMonitor(run)

    run.model.train()
    bar = tqdm(total=sched.last_step, initial=run.step, disable=not acc.is_main_process,
               dynamic_ncols=True, unit="step")
    run.t_start = time.perf_counter()
    meter = ThroughputMeter(run.flops_per_image, run.peak, run.t_start)
    planner = BudgetPlanner(run.step)
    while run.step < sched.last_step and not stop.now:
        train_one_epoch(run, meter, planner, stop, knn, bar)
        knn.after_epoch(run, meter)
    bar.close()
    knn.at_end(run, meter, stopped=stop.now)  # first, so the last checkpoint holds its result
    totals = meter.finish(run.paused_s)
    final = checkpoint(run)

    summary = _summary(run, totals, knn, stop, final)
    if acc.is_main_process:
        write_atomic(run.out / "summary.json", json.dumps(summary, indent=1))
        run.log({"event": "end", **{k: v for k, v in summary.items() if k != "checkpoint"}})
        run.log.close()
        _print_summary(summary)
    acc.end_training()
    stop.restore()
    return summary


def train_one_epoch(run: Run, meter: ThroughputMeter, planner: BudgetPlanner, stop: StopSignals,
                    knn: KnnMonitor, bar) -> None:
    """Train from run.step until its epoch's batches end, the schedule ends or a stop is asked."""
    cfg, sched, loader = run.cfg, run.schedule, run.loader
    epoch = run.step // run.steps_per_epoch
    if loader.state_dict()["epoch"] != epoch:
        loader.set_epoch(epoch)
    it = iter(loader)
    while run.step < sched.last_step and not stop.now:
        t0 = time.perf_counter()
        try:
            batch = next(it, None)
        except Exception:
            if stop.now:  # Ctrl-C in a terminal reaches the loader's workers too
                break
            raise
        if batch is None:
            break
        wait = time.perf_counter() - t0
        lr = sched.lrs[run.step]
        loss = training_step(run.model, run.optimizer, batch, lr, cfg.loss.temperature,
                             run.loss_impl, autocast=run.acc.autocast, backward=run.acc.backward,
                             loss_scale=cfg.loss.scale)
        run.step += 1
        meter.add(len(batch.index) * run.world, wait)
        bar.update(1)
        planner.after_step(run, bar)
        if run.step % cfg.train.log_every == 0 or run.step == sched.last_step:
            _log_step(run, loss, lr, meter, planner, stop, bar)
            knn.at_logged_step(run, meter, time.perf_counter())
        if cfg.train.checkpoint_every > 0 and run.step % cfg.train.checkpoint_every == 0:
            checkpoint(run)


def _log_step(run: Run, loss: torch.Tensor, lr: float, meter: ThroughputMeter,
              planner: BudgetPlanner, stop: StopSignals, bar) -> None:
    """At a logged step: the processes agree on a stop, the loss is read and logged with the
    interval's throughput, and a run far over its time budget stops."""
    stop.agree(run.device)
    # the only host sync, once per log interval
    loss_value = run.acc.reduce(loss, reduction="mean").item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at step {run.step}: lower optim.lr "
                                 f"(now {lr:.3g}) or raise loss.temperature")
    now = time.perf_counter()
    record = {"step": run.step, "epoch": run.step / run.steps_per_epoch, "loss": loss_value,
              "lr": lr, **meter.interval(now)}
    run.log(record)
    overrun = planner.overrun(run, now)
    if overrun:
        stop.reason, stop.now = overrun, True
    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}",
                    img_s=f"{record['images_per_s']:.0f}")


def checkpoint(run: Run) -> Path:
    state = {"step": run.step, "loader": run.loader.state_dict(), "world": run.world,
             "steps_per_epoch": run.steps_per_epoch, "train_seconds": run.train_seconds(),
             "planned_steps": run.schedule.planned_steps, "knn_history": run.knn_history}
    saved = save_checkpoint(run.acc, run.ckpt_root, run.step, state, run.config_yaml,
                            keep=run.cfg.train.keep_checkpoints)
    if run.overwrite and run.acc.is_main_process:  # the new run has a checkpoint: the old can go
        _delete_earlier_runs(run.out)
    return saved


def _announce(run: Run) -> None:
    cfg, sched = run.cfg, run.schedule
    local_batch = cfg.data.batch_size // run.world
    run.log({"event": "start", "step": run.step, "world": run.world, "device": str(run.device),
             "precision": run.precision, "loss_impl": run.loss_impl, "backend": cfg.data.backend,
             "global_batch": cfg.data.batch_size, "steps_per_epoch": run.steps_per_epoch,
             "total_steps": sched.total_steps, "peak_lr": sched.peak_lr,
             "loss_scale": cfg.loss.scale,
             "dropped_per_epoch": dropped_per_epoch(len(run.train_split), run.world, local_batch)})
    run.acc.print(f"SimCLR {cfg.model.arch} x{cfg.model.width} | {run.world} process(es) on "
                  f"{run.device.type} | batch {cfg.data.batch_size} | loss {run.loss_impl} | "
                  f"{cfg.data.backend} loader | {run.steps_per_epoch} steps/epoch, steps "
                  f"{run.step}->{sched.last_step}")


class RunLog:
    """log.jsonl, one JSON record a line, its curves mirrored to TensorBoard; the main process
    writes, the others hold a RunLog that writes nothing."""

    def __init__(self, out: Path, main: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb")) if main else None
        self.file = open(out / "log.jsonl", "a") if main else None

    def __call__(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            for k in self._curves(record):
                self.writer.add_scalar(k, record[k], record["step"])

    @staticmethod
    def _curves(record: dict) -> list[str]:
        """The keys TensorBoard draws: a step record's numbers and a kNN point's accuracy; the
        other events (start, time budget, end) are facts of the run, not points of a curve."""
        if record.get("event") == "knn":
            return ["knn_top1"]
        if "event" in record:
            return []
        return [k for k, v in record.items() if isinstance(v, (int, float)) and k != "step"]

    def close(self) -> None:
        self.writer.close()
        self.file.close()


class StopSignals:
    """SIGTERM / first SIGINT: stop after this step and checkpoint; a second SIGINT aborts.
    Several processes stop together at the next logged step (a signal may reach them at
    different steps, and one that stopped alone would leave the others waiting). A time-budget
    overrun stops the run too, with its `reason`."""

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

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        from tqdm import tqdm

        if os.getpid() != self._pid:  # a forked loader worker: it keeps serving batches
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.now = self.now or self.world == 1
        where = "this step" if self.world == 1 else "the next logged step"
        tqdm.write(f"pretrain: {self.signal}: stopping after {where} and writing a checkpoint "
                   f"(Ctrl-C again aborts)", file=sys.stderr)

    def agree(self, device: torch.device) -> None:
        """At a logged step: a signal that reached any process stops every process here."""
        if self.world > 1 and not self.now:
            (asked,) = _agree_max(device, self.world, 1.0 if self.signal else 0.0)
            self.now = asked > 0


class ThroughputMeter:
    """Images (each two views), data-wait seconds and model FLOP/s, per log interval and over the
    run."""

    def __init__(self, flops_per_image: float, peak: float | None, t_start: float):
        self.flops_per_image, self.peak, self.t_start = flops_per_image, peak, t_start
        self.images, self.wait_s = 0, 0.0  # up to the last interval
        self.tick, self.tick_images, self.tick_wait = t_start, 0, 0.0

    def add(self, images: int, wait_s: float) -> None:
        self.tick_images += images
        self.tick_wait += wait_s

    def pause(self, seconds: float) -> None:
        """`seconds` just spent off training (a kNN evaluation): out of the interval's
        throughput; the run's total comes to finish() as `paused_s`."""
        self.tick += seconds

    def interval(self, now: float) -> dict:
        """The log record's throughput since the last interval, which ends here."""
        ips = self.tick_images / (now - self.tick)
        record = {"images_per_s": ips, "data_wait_frac": self.tick_wait / (now - self.tick),
                  "tflops": ips * self.flops_per_image / 1e12}
        mfu = model_flops_utilisation(self.flops_per_image, ips, self.peak)
        if mfu is not None:
            record["mfu"] = mfu
        self.images += self.tick_images
        self.wait_s += self.tick_wait
        self.tick, self.tick_images, self.tick_wait = now, 0, 0.0
        return record

    def finish(self, paused_s: float = 0.0) -> dict:
        """The summary's throughput over this invocation, `paused_s` of its wall time left out;
        the data wait is that of the logged intervals."""
        wall = time.perf_counter() - self.t_start
        train_s = wall - paused_s
        self.images += self.tick_images
        ips = self.images / train_s if train_s > 0 else 0.0
        return {"images_per_s": ips, "wall_s": wall,
                "data_wait_frac": self.wait_s / train_s if train_s > 0 else 0.0,
                "tflops": ips * self.flops_per_image / 1e12,
                "mfu": model_flops_utilisation(self.flops_per_image, ips, self.peak)
                if wall > 0 else None}


class BudgetPlanner:
    """train.time_budget_s: steps [timed_from, timed_to) are timed (after warm-up steps that pay
    for cuDNN autotuning, compilation and worker start-up), then the schedule is fitted to the
    budget. The steps taken until then follow the schedule of optim.epochs, which is the same
    while they lie in the warmup (they do unless the warmup is under 30 steps)."""

    def __init__(self, first_step: int):
        self.timed_from = first_step + 10
        self.timed_to = self.timed_from + 20
        self.t_timed: float | None = None

    def after_step(self, run: Run, bar) -> None:
        sched = run.schedule
        if sched.planned or run.step not in (self.timed_from, self.timed_to):
            return
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        now = time.perf_counter()
        if run.step == self.timed_from:
            self.t_timed = run.train_seconds(now)  # the training clock: kNN time is off it
            return
        # every process adopts the slowest one's figures, so all agree on the plan
        elapsed = run.train_seconds(now)
        elapsed, step_s = _agree_max(run.device, run.world, elapsed,
                                     (elapsed - self.t_timed) / (self.timed_to - self.timed_from))
        sched.fix(steps_within_budget(sched.budget, elapsed, run.step, step_s, sched.cap_steps))
        bar.total = sched.last_step
        bar.refresh()
        run.log({"event": "time_budget", "step": run.step, "budget_s": sched.budget,
                 "elapsed_s": elapsed, "step_s": step_s, "planned_steps": sched.total_steps,
                 "planned_epochs": sched.total_steps / run.steps_per_epoch})

    def overrun(self, run: Run, now: float) -> str | None:
        """At a logged step: why the run stops when the plan was too optimistic, else None."""
        sched = run.schedule
        if sched.budget > 0 and sched.planned and run.step < sched.last_step:
            elapsed, _ = _agree_max(run.device, run.world, run.train_seconds(now), 0.0)
            if elapsed > 1.2 * sched.budget:
                return f"time budget: {elapsed:.0f} s > 1.2 x train.time_budget_s"
        return None


class KnnMonitor:
    """kNN top-1 of the encoder on data.eval_split, on the main process: every train.knn_every
    epochs, every train.knn_every_s seconds of training, and at the end (train.knn_every 0: at
    the end only; < 0: never). Each result is a log record (a curve in TensorBoard) and joins
    run.knn_history, which checkpoints carry so that the best value survives a resume. The time
    an evaluation takes is kept off the training clock: throughput and the time budget ignore it."""

    def __init__(self, run: Run):
        self.result: float | None = None
        self.skipped = _knn_skip_reason(run.cfg, run.ds, run.train_split)
        if self.skipped and run.acc.is_main_process:  # said once; the summary repeats the reason
            print(f"pretrain: warning: no kNN monitor: {self.skipped}", file=sys.stderr)
            run.log({"event": "knn_skipped", "step": run.step, "reason": self.skipped})
        # the next point on the training clock (resumed runs continue the same grid)
        self.next_s = _next_point(run.seconds_before, run.cfg.train.knn_every_s)

    def after_epoch(self, run: Run, meter: ThroughputMeter) -> None:
        every, spe = run.cfg.train.knn_every, run.steps_per_epoch
        if (run.step % spe == 0 and every > 0 and not self.skipped
                and (run.step // spe) % every == 0 and not _evaluated_at(run)):
            self._evaluate(run, meter)

    def at_logged_step(self, run: Run, meter: ThroughputMeter, now: float) -> None:
        """train.knn_every_s: every process sees the same (slowest) clock, so all agree."""
        if (not self.next_s or self.skipped or run.cfg.train.knn_every < 0
                or run.step >= run.schedule.last_step):
            return
        (elapsed,) = _agree_max(run.device, run.world, run.train_seconds(now))
        if elapsed >= self.next_s:
            self.next_s = _next_point(elapsed, run.cfg.train.knn_every_s)
            self._evaluate(run, meter)

    def at_end(self, run: Run, meter: ThroughputMeter, stopped: bool) -> None:
        if (run.cfg.train.knn_every >= 0 and not self.skipped and not stopped
                and run.step == run.schedule.last_step and not _evaluated_at(run)):
            self._evaluate(run, meter)
        elif self.result is None and run.knn_history and not stopped:
            self.result = run.knn_history[-1][1]  # resumed after the last evaluation
        elif self.result is None and not self.skipped:
            self.skipped = ("disabled (train.knn_every < 0)" if run.cfg.train.knn_every < 0
                            else f"the run stopped at step {run.step} before the final kNN "
                                 f"evaluation")

    def best(self, run: Run) -> tuple[float, int] | tuple[None, None]:
        """The highest kNN top-1 of the run (every invocation) and its step."""
        if not run.knn_history:
            return None, None
        step, top1 = max(run.knn_history, key=lambda h: (h[1], -h[0]))
        return top1, step

    def _evaluate(self, run: Run, meter: ThroughputMeter) -> None:
        cfg, acc = run.cfg, run.acc
        t0 = time.perf_counter()
        self.result = None
        if acc.is_main_process:
            self.result = run_knn(cfg, run.model, run.train_split,
                                  run.ds.split(cfg.data.eval_split), run.device)
            run.log({"event": "knn", "step": run.step, "epoch": run.step / run.steps_per_epoch,
                     "images": run.step * cfg.data.batch_size,
                     "train_s": run.train_seconds(t0), "knn_top1": self.result})
            acc.print(f"step {run.step}: kNN top-1 on '{cfg.data.eval_split}' = "
                      f"{100 * self.result:.2f}%")
        acc.wait_for_everyone()
        run.knn_history.append([run.step, self.result])
        paused = time.perf_counter() - t0
        run.paused_s += paused
        meter.pause(paused)


def _next_point(seconds: float, every_s: float) -> float:
    """The first multiple of every_s after `seconds` (0: no timed points)."""
    return (math.floor(seconds / every_s) + 1) * every_s if every_s else 0.0


def _evaluated_at(run: Run) -> bool:
    """Whether the kNN monitor already evaluated this step (two cadences, or a resumed run)."""
    return bool(run.knn_history) and run.knn_history[-1][0] == run.step


def _summary(run: Run, totals: dict, knn: KnnMonitor, stop: StopSignals, final: Path) -> dict:
    sched = run.schedule
    best, best_step = knn.best(run)
    return {"steps": run.step, "total_steps": sched.total_steps,
            "epochs": run.step / run.steps_per_epoch, "world": run.world,
            "device": str(run.device), "loss_impl": run.loss_impl,
            "backend": run.cfg.data.backend, "images_per_s": totals["images_per_s"],
            "wall_s": totals["wall_s"], "data_wait_frac": totals["data_wait_frac"],
            "knn_top1": knn.result, "knn_best": best, "knn_best_step": best_step,
            "knn_skipped": knn.skipped if knn.result is None else None,
            "tflops": totals["tflops"], "mfu": totals["mfu"], "checkpoint": str(final),
            "interrupted": stop.now and stop.reason is None, "signal": stop.signal,
            "stopped_by": stop.reason, "time_budget_s": sched.budget or None,
            "planned_steps": sched.planned_steps}



def _agree_max(device: torch.device, world: int, *values: float) -> tuple[float, ...]:
    """The largest of each value over all processes (one all-reduce; values as given for one)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def _knn_skip_reason(cfg, ds, train_split) -> str | None:
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
    return None


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="SimCLR pretraining")
    for col in ("steps", "epochs", "processes", "images/s", "data wait", "wall time",
                "kNN top-1", "best (step)", "loss impl"):
        t.add_column(col, justify="right")
    final = "-" if s["knn_top1"] is None else f"{100 * s['knn_top1']:.2f}%"
    best = ("-" if s["knn_best"] is None
            else f"{100 * s['knn_best']:.2f}% ({s['knn_best_step']})")
    t.add_row(str(s["steps"]), f"{s['epochs']:.2f}", str(s["world"]), f"{s['images_per_s']:.0f}",
              f"{100 * s['data_wait_frac']:.0f}%", f"{s['wall_s']:.0f} s", final, best,
              s["loss_impl"])
    Console().print(t)


def _fail(message: str) -> None:
    """Print one line on stderr, on a line of its own even while a progress bar is drawn."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError,
            BackendUnavailable) as e:
        _fail(f"pretrain: error: {e}")
        return 2
    except KeyboardInterrupt:
        _fail("pretrain: aborted (Ctrl-C): the steps since the last checkpoint are lost; "
              "continue with --resume")
        return 130
    except OSError as e:  # e.g. a full disk or a read-only train.out_dir while writing logs
        where = f" on '{e.filename}'" if e.filename else ""
        _fail(f"pretrain: error: {e.strerror or e}{where}: free disk space or fix the path "
              f"(train.out_dir, data.path), then continue with --resume")
        return 2
    except torch.OutOfMemoryError:
        _fail("pretrain: error: out of memory: lower data.batch_size or use loss.impl=chunked")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
