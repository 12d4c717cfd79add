r"""SimCLR pretraining.

    accelerate launch -m train.pretrain --config train/configs/fashion_mnist_demo.yaml \
        [--resume auto] [--section.key=value ...]

One process on CPU, several CPU processes over gloo (`accelerate launch --multi_gpu
--num_processes N` on a machine without GPUs), or GPUs with bf16 autocast. Writes to
train.out_dir: config.yaml, log.jsonl, TensorBoard events, checkpoints/, summary.json.
A directory that already holds a run is continued with --resume or replaced with --overwrite,
never mixed into. SIGTERM, SIGHUP or Ctrl-C (SIGINT), to the process or to its launcher, finishes
the current step, writes a checkpoint and exits with status 0, and so does the launcher's death;
a second Ctrl-C aborts at once (status 130), keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from pipelines.loader import build_loader
from pipelines.sharding import dropped_per_epoch
from pipelines.sources import Split, open_dataset
from train.atomic import write_atomic
from train.bookkeeping import Bookkeeper, StepRecord
from train.checkpoint import (
    CheckpointError,
    newest_sound_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from train.commands import run_command
from train.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    resume_differences,
    save_config,
)
from train.lock import released_on_return
from train.precision import accelerate_precision
from train.run import Run, RunLog
from train.run_dir import (
    check_out_dir,
    delete_earlier_runs,
    lock_run_dir,
    mark_run_dir,
    set_aside_earlier_run,
    set_aside_later_checkpoints,
    unfit_checkpoint,
)
from train.schedule import Schedule, TrainClock, base_lr, scaled_lr
from train.step import Criterion, chunks, set_lr, step_finite, two_view_step


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


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    from train.lars import LARS, lars_param_groups

    groups = lars_param_groups(model, cfg.optim.weight_decay)
    if cfg.optim.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.optim.momentum, eta=cfg.optim.eta)
    for g in groups:  # the same exclusions, without layer-wise adaptation
        g.pop("lars_exclude", None)
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.optim.momentum, foreach=True)


@released_on_return  # the run directory's lock, taken by set_up
def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    """Pretrain as `cfg` says; the run's summary (also written to summary.json)."""
    run = set_up(cfg, resume, overwrite)
    if resume is not None:
        resume_from(run, resume)
    if run.step >= run.schedule.last_step and (run.out / "summary.json").is_file():
        run.acc.print(f"run '{run.out}' already finished ({run.step} steps): nothing to do; "
                      f"start a new one with --overwrite or another --train.out_dir, or raise "
                      f"optim.epochs / train.max_steps")
        return json.loads((run.out / "summary.json").read_text())

    open_run_dir(run)
    _announce(run)
    book = Bookkeeper(run, checkpoint=lambda: checkpoint(run))
    book.stop.install()
    try:
        run.model.train()
        while run.step < run.schedule.last_step and not book.stop.now:
            train_one_epoch(run, book)
            book.after_epoch()
        totals = book.close()
        summary = _summary(run, book, totals, checkpoint(run))
    finally:
        book.stop.restore()
    if run.acc.is_main_process:
        write_atomic(run.out / "summary.json", json.dumps(summary, indent=1))
        run.log({"event": "end", **{k: v for k, v in summary.items() if k != "checkpoint"}})
        run.log.close()
        _print_summary(summary)
    run.acc.end_training()
    return summary


def train_one_epoch(run: Run, book: Bookkeeper) -> None:
    """Train from run.step until its epoch's batches end, the schedule ends or a stop is asked:
    the learning rate, both views forward, the loss (NT-Xent unless loss.name says otherwise),
    backward and the optimizer step (in chunks of
    train.micro_batch images when set: `train.step.micro_batched_step`). All the rest
    (meters, budget, log, stop signals, kNN points, checkpoints) is `book.after_step`."""
    model, optimizer, acc, cfg = run.model, run.optimizer, run.acc, run.cfg
    criterion = Criterion.of(cfg.loss, run.loss_impl)
    for batch, wait_s in _batches(run, book.stop):
        lr = set_lr(optimizer, run.schedule.lrs[run.step])
        loss, accuracy = two_view_step(model, optimizer, batch, criterion, acc.autocast,
                                       acc.backward, cfg.loss.scale, cfg.train.micro_batch,
                                       lambda: acc.no_sync(model))
        finite = step_finite(optimizer, loss)  # on the device: read at logged steps only
        run.step += 1
        book.after_step(StepRecord(run.step, loss, lr, len(batch.index) * run.world, wait_s,
                                   finite, accuracy))
        if run.step >= run.schedule.last_step or book.stop.now:
            break


def _batches(run: Run, stop) -> Iterator[tuple[Any, float]]:
    """The batches of run.step's epoch, from its position, each with the seconds waited for it."""
    epoch = run.step // run.steps_per_epoch
    if run.loader.state_dict()["epoch"] != epoch:
        run.loader.set_epoch(epoch)
    it = iter(run.loader)
    while True:
        t0 = time.perf_counter()
        first = run.first_batch_s is None
        try:
            # The first batch of an invocation builds the loader's pipeline, starts its workers
            # and, on a new machine, compiles its kernels (tens of seconds): start-up, kept off
            # the training clock as evaluations are, so a time budget buys training
            with run.clock.paused() if first else contextlib.nullcontext():
                batch = next(it, None)
        except Exception:
            if stop.now:  # Ctrl-C in a terminal reaches the loader's workers too
                return
            raise
        if batch is None:
            return
        wait_s = time.perf_counter() - t0
        if first:
            run.first_batch_s, wait_s = wait_s, 0.0
        yield batch, wait_s


def set_up(cfg: Config, resume: str | None, overwrite: bool) -> Run:
    """Accelerator, data, schedule, model and optimizer, once train.out_dir is known to be usable
    (nothing is written yet)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available()
    precision = accelerate_precision(cfg.train.mixed_precision, cuda)
    acc = Accelerator(cpu=not cuda, mixed_precision=precision)
    world = acc.num_processes
    if cfg.data.batch_size % world:
        raise ConfigError(f"config: data.batch_size {cfg.data.batch_size} is not divisible by the "
                          f"{world} processes: use a multiple of {world}")
    set_seed(cfg.train.seed)
    out = Path(cfg.train.out_dir)
    lock_run_dir(acc, out)  # one run at a time: held by the main process until train() ends
    check_out_dir(out, resume, overwrite)
    acc.wait_for_everyone()  # every process has looked before the earlier run is moved away

    ds = open_dataset(cfg.data.path)
    train_split = ds.split(cfg.data.train_split)
    loader = _loader(cfg, acc, train_split)
    schedule = _schedule(cfg, acc, len(loader))
    model, optimizer, extra = _model(cfg, acc, precision)
    return Run(cfg, acc, world, acc.device, out, model, optimizer, loader, ds, train_split,
               schedule, len(loader), precision, overwrite=overwrite, **extra)


def _loader(cfg: Config, acc, train_split: Split):
    world = acc.num_processes
    local_batch = cfg.data.batch_size // world
    if len(train_split) // world < local_batch:
        raise ConfigError(f"config: 'data.batch_size' {cfg.data.batch_size} exceeds the "
                          f"{len(train_split)} images of split '{cfg.data.train_split}' in "
                          f"'{cfg.data.path}': lower it")
    return build_loader(cfg.data.backend, train_split, cfg.augment, batch_size=local_batch,
                        rank=acc.process_index, world=world, seed=cfg.train.seed,
                        device=acc.device, num_workers=cfg.data.num_workers, drop_last=True)


def _model(cfg: Config, acc, precision: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """The SimCLR model (global BN over several processes, channels-last, compiled as asked) and
    its optimizer, prepared by Accelerate; the loss implementation and FLOP figures."""
    from model.flops import peak_flops, training_flops_per_image
    from model.global_batchnorm import convert_to_global_bn
    from model.losses import resolve_loss_impl
    from model.simclr import build_simclr

    device = acc.device
    model = build_simclr(cfg.model)
    proj_dim = model.proj_dim  # the loss's input width (the encoder's without a head)
    if acc.num_processes > 1 and cfg.train.sync_bn:
        model = convert_to_global_bn(model, device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    extra = {"flops_per_image": training_flops_per_image(model, cfg.augment.size),
             "peak": peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)}
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    try:
        extra["loss_impl"] = resolve_loss_impl(cfg.loss.impl, cfg.loss.name, device, proj_dim)
    except ValueError as e:
        raise ConfigError(f"config: 'loss.impl': {e}") from None
    return model, optimizer, extra


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
    return Schedule(peak_lr, warmup_steps, cap_steps, cfg.train.max_steps,
                    cfg.train.time_budget_s)


def resume_from(run: Run, resume: str) -> None:
    """Continue from the checkpoint `resume` names ('auto': the run's newest that verifies, if
    any, saying which it passed over): model, optimizer and RNG state, step, training seconds,
    the loader's position, the budget's plan. A named checkpoint that fails
    `verify_checkpoint` (damaged files, unsound weights) is refused in one line."""
    acc = run.acc
    if resume == "auto":  # the newest that verifies (sha256 manifest, sound weights)
        ckpt, passed = newest_sound_checkpoint(run.ckpt_root)
        if passed and acc.is_main_process:
            print(f"pretrain: warning: {'; '.join(passed)}: resuming from the newest checkpoint "
                  f"that verifies, '{ckpt}'", file=sys.stderr)
    else:
        ckpt = resolve_checkpoint(resume)
    if ckpt is None:
        if acc.is_main_process:
            acc.print(f"no checkpoint under {run.ckpt_root}: starting afresh")
        return
    state = read_trainer_state(ckpt)
    run.resume_changes = _resume_changes(run, ckpt, state)  # names a changed key first
    if state.get("world") != run.world or state.get("steps_per_epoch") != run.steps_per_epoch:
        raise CheckpointError(f"checkpoint '{ckpt}' was written with {state.get('world')} "
                              f"processes and {state.get('steps_per_epoch')} steps/epoch, this "
                              f"run has {run.world} and {run.steps_per_epoch}: resume with the "
                              f"same launch settings")
    if resume != "auto":
        verify_checkpoint(ckpt)
    try:
        acc.load_state(str(ckpt))
    except Exception as e:
        raise unfit_checkpoint(ckpt, e) from None
    run.step = state["step"]
    run.clock = TrainClock(state.get("train_seconds", 0.0))
    run.knn_history = [list(h) for h in state.get("knn_history", [])]
    if acc.is_main_process:
        set_aside_later_checkpoints(run.ckpt_root, ckpt, run.step)
    acc.wait_for_everyone()
    if run.schedule.budget_s > 0 and state.get("planned_steps"):
        run.schedule.fix(state["planned_steps"])
    if any(c.startswith("train.time_budget_s ") for c in run.resume_changes):
        run.schedule.replan(run.clock.seconds_before, run.step)  # what is left, to the new one
    run.loader.load_state_dict(state["loader"])
    acc.print(f"resumed from {ckpt} at step {run.step}")
    if run.resume_changes:
        acc.print(f"pretrain: resumed with changed settings: {'; '.join(run.resume_changes)}",
                  file=sys.stderr)


def _resume_changes(run: Run, ckpt: Path, state: dict) -> list[str]:
    """The settings this resume changes, as 'key A -> B', once the ones that would change what the
    run trains (config.RESUMABLE says which may change) and another dataset are refused."""
    try:
        saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = {}  # verified checkpoints have it; a damaged one fails to load below
    allowed, refused = resume_differences(saved if isinstance(saved, dict) else {},
                                          config_to_dict(run.cfg))
    split = run.cfg.data.train_split
    was, now = state.get("dataset"), run.ds.fingerprint(split)
    if was and now and was != now:
        refused.insert(0, f"the dataset (split '{split}' of '{run.cfg.data.path}' holds other "
                          f"images than the checkpoint's)")
    if refused:
        raise CheckpointError(
            f"checkpoint '{ckpt}' was trained with other settings: {'; '.join(refused[:4])}"
            f"{' ...' if len(refused) > 4 else ''}: resume with the checkpoint's settings, or "
            f"start a new run with --overwrite or another --train.out_dir")
    return allowed


def open_run_dir(run: Run) -> None:
    """--overwrite: set the earlier run aside; then write config.yaml, open log.jsonl and
    TensorBoard."""
    acc, out = run.acc, run.out
    if run.overwrite and acc.is_main_process and out.is_dir():  # after the settings proved usable
        set_aside_earlier_run(out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        mark_run_dir(out)  # the artefacts beside the marker are a run's (check_out_dir)
        save_config(run.cfg, out / "config.yaml")
    run.log = RunLog(out, acc.is_main_process)
    run.config_yaml = yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False)


def checkpoint(run: Run) -> Path:
    state = {"step": run.step, "loader": run.loader.state_dict(), "world": run.world,
             "steps_per_epoch": run.steps_per_epoch, "train_seconds": run.clock.seconds(),
             "planned_steps": run.schedule.planned_steps, "knn_history": run.knn_history,
             "dataset": run.ds.fingerprint(run.cfg.data.train_split)}
    saved = save_checkpoint(run.acc, run.ckpt_root, run.step, state, run.config_yaml,
                            keep=run.cfg.train.keep_checkpoints)
    if run.overwrite and run.acc.is_main_process:  # the new run has a checkpoint: the old can go
        delete_earlier_runs(run.out)
    return saved


def _announce(run: Run) -> None:
    cfg, sched = run.cfg, run.schedule
    local_batch = cfg.data.batch_size // run.world
    run.log({"event": "start", "step": run.step, "world": run.world, "device": str(run.device),
             "precision": run.precision, "loss_impl": run.loss_impl, "backend": cfg.data.backend,
             "global_batch": cfg.data.batch_size, "steps_per_epoch": run.steps_per_epoch,
             "total_steps": sched.total_steps, "peak_lr": sched.peak_lr,
             "loss_scale": cfg.loss.scale, "micro_batch": _micro_batch(run),
             "dropped_per_epoch": dropped_per_epoch(len(run.train_split), run.world, local_batch)})
    if run.resume_changes:
        run.log({"event": "resume_changes", "step": run.step, "changes": run.resume_changes,
                 "total_steps": sched.total_steps})
    micro = _micro_batch(run)
    chunked = f" in chunks of {micro}" if micro else ""
    run.acc.print(f"SimCLR {cfg.model.arch} x{cfg.model.width} | {run.world} process(es) on "
                  f"{run.device.type} | batch {cfg.data.batch_size}{chunked} | loss "
                  f"{run.loss_impl} | "
                  f"{cfg.data.backend} loader | {run.steps_per_epoch} steps/epoch, steps "
                  f"{run.step}->{sched.last_step}")


def _micro_batch(run: Run) -> int:
    """The images per forward chunk this run's steps use (0: the plain step, one forward)."""
    local = run.cfg.data.batch_size // run.world
    return run.cfg.train.micro_batch if len(chunks(local, run.cfg.train.micro_batch)) > 1 else 0


def _summary(run: Run, book: Bookkeeper, totals: dict, final: Path) -> dict:
    sched, knn, stop = run.schedule, book.knn, book.stop
    best, best_step = knn.best()
    return {"steps": run.step, "total_steps": sched.total_steps,
            "epochs": run.step / run.steps_per_epoch, "world": run.world,
            "device": str(run.device), "loss_impl": run.loss_impl,
            "backend": run.cfg.data.backend, "micro_batch": _micro_batch(run),
            "images_per_s": totals["images_per_s"],
            "wall_s": totals["wall_s"], "data_wait_frac": totals["data_wait_frac"],
            "contrastive_acc": book.accuracy, "loss_name": run.cfg.loss.name,
            "knn_top1": knn.result, "knn_best": best, "knn_best_step": best_step,
            "knn_skipped": knn.skipped if knn.result is None else None,
            "tflops": totals["tflops"], "mfu": totals["mfu"], "checkpoint": str(final),
            "interrupted": stop.now and stop.reason is None, "signal": stop.signal,
            "stopped_by": stop.reason, "time_budget_s": sched.budget_s or None,
            "planned_steps": sched.planned_steps, "first_batch_s": run.first_batch_s}


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


def main(argv: list[str] | None = None) -> int:
    from train.signals import watch_launcher

    args, overrides = build_parser().parse_known_args(argv)
    with watch_launcher("pretrain"):  # a launcher that dies stops the run as SIGTERM would
        return run_command(
            "pretrain",
            lambda: train(load_config(args.config, overrides), args.resume, args.overwrite),
            errors=(FloatingPointError,),
            write_fix="free disk space or fix the path (train.out_dir, data.path), then "
                      "continue with --resume",
            oom_fix="set train.micro_batch (images per forward chunk, e.g. 64: the same batch in "
                    "less memory), lower data.batch_size or use loss.impl=chunked",
            interrupted="aborted (Ctrl-C): the steps since the last checkpoint are lost; "
                        "continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
