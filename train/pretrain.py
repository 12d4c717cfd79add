"""SimCLR pretraining.

    accelerate launch -m train.pretrain --config train/configs/fashion_mnist_demo.yaml [--resume auto] [--section.key=value ...]

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
from pathlib import Path

import torch
import yaml

from pipelines.loader import BackendUnavailable, build_loader
from pipelines.sharding import dropped_per_epoch
from pipelines.sources import DatasetError, open_dataset
from train.atomic import write_atomic
from train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    step_dirs,
)
from train.config import Config, ConfigError, config_to_dict, load_config, save_config
from train.features import extract_features, knn_accuracy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.pretrain",
        description="SimCLR pretraining. Any setting can be overridden as --section.key=value "
        "(e.g. --optim.lr=0.5 --data.batch_size=512); see train/config.py for every key.",
    )
    p.add_argument("--config", help="YAML recipe (train/configs/*.yaml); defaults apply to keys it omits")
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


def run_knn(cfg: Config, model, train_split, eval_split, spec, device) -> float:
    import numpy as np

    encoder = getattr(model, "module", model).encoder
    n = min(cfg.train.knn_train_samples, len(train_split))
    bank = np.random.default_rng(cfg.train.seed).choice(len(train_split), n, replace=False)
    kw = dict(batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers)
    th, ty = extract_features(encoder, train_split, spec, indices=bank, **kw)
    eh, ey = extract_features(encoder, eval_split, spec, **kw)
    return knn_accuracy(th, ty, eh, ey, k=cfg.train.knn_k)


def train(cfg: Config, resume: str | None = None, overwrite: bool = False) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from model.flops import model_flops_utilisation, peak_flops, training_flops_per_image
    from model.global_batchnorm import convert_to_global_bn
    from model.nt_xent import nt_xent, resolve_impl
    from model.simclr import build_simclr
    from train.schedule import base_lr, lr_schedule, scaled_lr, steps_within_budget

    cuda = torch.cuda.is_available()
    precision = {"auto": "bf16" if cuda else "no", "fp32": "no"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision)
    acc = Accelerator(cpu=not cuda, mixed_precision=precision)
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    if cfg.data.batch_size % world:
        raise ConfigError(f"config: data.batch_size {cfg.data.batch_size} is not divisible by the "
                          f"{world} processes: use a multiple of {world}")
    set_seed(cfg.train.seed)
    out = Path(cfg.train.out_dir)
    ckpt_root = out / "checkpoints"
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
    acc.wait_for_everyone()  # every process has looked before the earlier run is moved away

    ds = open_dataset(cfg.data.path)
    train_split = ds.split(cfg.data.train_split)
    spec = cfg.augment
    local_batch = cfg.data.batch_size // world
    if len(train_split) // world < local_batch:
        raise ConfigError(f"config: 'data.batch_size' {cfg.data.batch_size} exceeds the {len(train_split)} "
                          f"images of split '{cfg.data.train_split}' in '{cfg.data.path}': lower it")
    loader = build_loader(cfg.data.backend, train_split, spec, batch_size=local_batch, rank=rank, world=world,
                          seed=cfg.train.seed, device=device, num_workers=cfg.data.num_workers, drop_last=True)
    steps_per_epoch = len(loader)
    cap_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup_steps > cap_steps:
        acc.print(f"warning: optim.warmup_epochs ({cfg.optim.warmup_epochs:g}) exceeds optim.epochs "
                  f"({cfg.optim.epochs}): the warmup takes the whole run", file=sys.stderr)
        warmup_steps = cap_steps
    peak_lr = scaled_lr(base_lr(cfg.optim.lr, cfg.optim.lr_scaling), cfg.data.batch_size, cfg.optim.lr_scaling)
    budget = cfg.train.time_budget_s

    def plan(total: int) -> tuple[list[float], int]:
        """The LR of every step and the step the run ends at, for a schedule of `total` steps."""
        if budget > 0:  # a budget can cut the schedule inside the warmup
            lrs = lr_schedule(peak_lr, total, min(warmup_steps, total)).tolist()
        else:
            lrs = lr_schedule(peak_lr, total, warmup_steps).tolist()
        return lrs, (min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total)

    total_steps = cap_steps
    lrs, last_step = plan(total_steps)

    model = build_simclr(cfg.model)
    if world > 1 and cfg.train.sync_bn:
        model = convert_to_global_bn(model, device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops_per_image = training_flops_per_image(model, spec.size)  # [conv+matmul FLOPs, fwd+bwd, 2 views]
    peak = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizer = make_optimizer(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    try:
        loss_impl = resolve_impl(cfg.loss.impl, device, cfg.model.head_out)
    except ValueError as e:
        raise ConfigError(f"config: 'loss.impl': {e}") from None

    step, seconds_before = 0, 0.0  # training seconds of earlier invocations (time budget)
    planned = budget <= 0  # the schedule's length is final (else fixed once the first steps are timed)
    if resume is not None:
        ckpt = latest_checkpoint(ckpt_root) if resume == "auto" else resolve_checkpoint(resume)
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            if state.get("world") != world or state.get("steps_per_epoch") != steps_per_epoch:
                raise CheckpointError(f"checkpoint '{ckpt}' was written with {state.get('world')} processes and "
                                      f"{state.get('steps_per_epoch')} steps/epoch, this run has {world} and "
                                      f"{steps_per_epoch}: resume with the same launch settings")
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
            step = state["step"]
            seconds_before = state.get("train_seconds", 0.0)
            _set_aside_later_checkpoints(acc, ckpt_root, ckpt, step)
            if budget > 0 and state.get("planned_steps"):
                total_steps, planned = state["planned_steps"], True
                lrs, last_step = plan(total_steps)
            loader.load_state_dict(state["loader"])
            acc.print(f"resumed from {ckpt} at step {step}")
        elif acc.is_main_process:
            acc.print(f"no checkpoint under {ckpt_root}: starting afresh")

    if step >= last_step and (out / "summary.json").is_file():
        acc.print(f"run '{out}' already finished ({step} steps): nothing to do; start a new one "
                  f"with --overwrite or another --train.out_dir, or raise optim.epochs / "
                  f"train.max_steps")
        return json.loads((out / "summary.json").read_text())

    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if overwrite and acc.is_main_process and out.is_dir():  # after the settings proved usable
        trash = _set_aside_earlier_run(out)
        if trash is not None:
            print(f"pretrain: --overwrite: the earlier run in '{out}' was moved to {trash.name}, "
                  f"deleted once this run writes its first checkpoint", file=sys.stderr)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    writer = SummaryWriter(str(out / "tb")) if acc.is_main_process else None
    log_file = open(out / "log.jsonl", "a") if acc.is_main_process else None

    def log(record: dict) -> None:
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, record.get("step", 0))

    def checkpoint() -> Path:
        state = {"step": step, "loader": loader.state_dict(), "world": world, "steps_per_epoch": steps_per_epoch,
                 "train_seconds": seconds_before + time.perf_counter() - t_start,
                 "planned_steps": total_steps if budget > 0 and planned else None}
        keep = cfg.train.keep_checkpoints
        saved = save_checkpoint(acc, ckpt_root, step, state, config_yaml, keep=keep)
        if overwrite and acc.is_main_process:  # the new run has a checkpoint: the old one can go
            _delete_earlier_runs(out)
        return saved

    stop = {"now": False, "signal": None}
    trainer_pid = os.getpid()

    def on_signal(signum, frame):
        """SIGTERM / first SIGINT: stop after this step and checkpoint; a second SIGINT aborts.
        Several processes stop together at the next logged step (a signal may reach them at
        different steps, and one that stopped alone would leave the others waiting)."""
        if os.getpid() != trainer_pid:  # a forked loader worker: it keeps serving batches
            return
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        stop["now"] = stop["now"] or world == 1
        where = "this step" if world == 1 else "the next logged step"
        tqdm.write(f"pretrain: {stop['signal']}: stopping after {where} and writing a checkpoint "
                   f"(Ctrl-C again aborts)", file=sys.stderr)

    previous_handlers = {sig: signal.signal(sig, on_signal)
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    log({"event": "start", "step": step, "world": world, "device": str(device), "precision": precision,
         "loss_impl": loss_impl, "backend": cfg.data.backend, "global_batch": cfg.data.batch_size,
         "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "peak_lr": peak_lr,
         "loss_scale": cfg.loss.scale,
         "dropped_per_epoch": dropped_per_epoch(len(train_split), world, local_batch)})
    acc.print(f"SimCLR {cfg.model.arch} x{cfg.model.width} | {world} process(es) on {device.type} | "
              f"batch {cfg.data.batch_size} | loss {loss_impl} | {cfg.data.backend} loader | "
              f"{steps_per_epoch} steps/epoch, steps {step}->{last_step}")
    knn_skipped = _knn_skip_reason(cfg, ds, train_split)
    if knn_skipped and acc.is_main_process:  # said once, here; the summary repeats the reason
        print(f"pretrain: warning: no kNN monitor: {knn_skipped}", file=sys.stderr)
        log({"event": "knn_skipped", "step": step, "reason": knn_skipped})

    model.train()
    bar = tqdm(total=last_step, initial=step, disable=not acc.is_main_process, dynamic_ncols=True, unit="step")
    t_start, images_seen, wait_s = time.perf_counter(), 0, 0.0
    tick, tick_images, tick_wait = t_start, 0, 0.0
    knn_result = None
    # Time budget: steps [timed_from, timed_to) are timed (after warm-up steps that pay for cuDNN
    # autotuning, compilation and worker start-up), then the schedule is fitted to the budget. The
    # steps taken until then follow the schedule of optim.epochs, which is the same while they lie
    # in the warmup (they do unless the warmup is under 30 steps).
    timed_from = step + 10
    timed_to, t_timed = timed_from + 20, None
    stop_reason = None
    while step < last_step and not stop["now"]:
        epoch = step // steps_per_epoch
        if loader.state_dict()["epoch"] != epoch:
            loader.set_epoch(epoch)
        it = iter(loader)
        while step < last_step and not stop["now"]:
            t0 = time.perf_counter()
            try:
                batch = next(it, None)
            except Exception:
                if stop["now"]:  # Ctrl-C in a terminal reaches the loader's workers too
                    break
                raise
            if batch is None:
                break
            tick_wait += time.perf_counter() - t0
            lr = lrs[step]
            for g in optimizer.param_groups:
                g["lr"] = lr
            with acc.autocast():
                _, z = model(torch.cat([batch.view1, batch.view2]))  # [2B, D]: both views in one pass
            z1, z2 = z.float().chunk(2)
            loss = nt_xent(z1, z2, cfg.loss.temperature, impl=loss_impl)  # mean over the 2N anchors
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss * cfg.loss.scale if cfg.loss.scale != 1.0 else loss)
            optimizer.step()
            step += 1
            tick_images += len(batch.index) * world
            bar.update(1)
            if not planned and step in (timed_from, timed_to):
                if cuda:
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                if step == timed_from:
                    t_timed = now
                else:  # every process adopts the slowest one's figures, so all agree on the plan
                    elapsed, step_s = _agree_max(device, world, seconds_before + now - t_start,
                                                 (now - t_timed) / (timed_to - timed_from))
                    total_steps = steps_within_budget(budget, elapsed, step, step_s, cap_steps)
                    lrs, last_step = plan(total_steps)
                    planned = True
                    bar.total = last_step
                    bar.refresh()
                    log({"event": "time_budget", "step": step, "budget_s": budget, "elapsed_s": elapsed,
                         "step_s": step_s, "planned_steps": total_steps,
                         "planned_epochs": total_steps / steps_per_epoch})
            if step % cfg.train.log_every == 0 or step == last_step:
                if world > 1 and not stop["now"]:  # a signal stops every process at this step
                    (asked,) = _agree_max(device, world, 1.0 if stop["signal"] else 0.0)
                    stop["now"] = asked > 0
                loss_value = acc.reduce(loss.detach(), reduction="mean").item()  # the only host sync, once per log interval
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step}: lower optim.lr "
                                             f"(now {lr:.3g}) or raise loss.temperature")
                now = time.perf_counter()
                ips = tick_images / (now - tick)
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_value, "lr": lr,
                          "images_per_s": ips, "data_wait_frac": tick_wait / (now - tick),
                          "tflops": ips * flops_per_image / 1e12}
                mfu = model_flops_utilisation(flops_per_image, ips, peak)
                if mfu is not None:
                    record["mfu"] = mfu
                log(record)
                if budget > 0 and planned and step < last_step:  # a hard stop when the plan was too optimistic
                    elapsed, _ = _agree_max(device, world, seconds_before + now - t_start, 0.0)
                    if elapsed > 1.2 * budget:
                        stop_reason = f"time budget: {elapsed:.0f} s > 1.2 x train.time_budget_s"
                        stop["now"] = True
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                images_seen += tick_images
                wait_s += tick_wait
                tick, tick_images, tick_wait = now, 0, 0.0
            if cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0:
                checkpoint()
        if (step % steps_per_epoch == 0 and cfg.train.knn_every > 0 and not knn_skipped
                and (step // steps_per_epoch) % cfg.train.knn_every == 0):
            knn_result = _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log)
    bar.close()
    images_seen += tick_images
    wall = time.perf_counter() - t_start
    final = checkpoint()
    if cfg.train.knn_every >= 0 and not knn_skipped and not stop["now"] and step == last_step:
        knn_result = _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log)
    elif knn_result is None and not knn_skipped:
        knn_skipped = ("disabled (train.knn_every < 0)" if cfg.train.knn_every < 0
                       else f"the run stopped at step {step} before the final kNN evaluation")
    summary = {"steps": step, "total_steps": total_steps, "epochs": step / steps_per_epoch, "world": world,
               "device": str(device), "loss_impl": loss_impl, "backend": cfg.data.backend,
               "images_per_s": images_seen / wall if wall > 0 else 0.0, "wall_s": wall,
               "data_wait_frac": wait_s / wall if wall > 0 else 0.0, "knn_top1": knn_result,
               "knn_skipped": knn_skipped if knn_result is None else None,
               "tflops": images_seen / wall * flops_per_image / 1e12 if wall > 0 else 0.0,
               "mfu": model_flops_utilisation(flops_per_image, images_seen / wall, peak) if wall > 0 else None,
               "checkpoint": str(final), "interrupted": stop["now"] and stop_reason is None,
               "signal": stop["signal"],
               "stopped_by": stop_reason, "time_budget_s": budget or None,
               "planned_steps": total_steps if budget > 0 and planned else None}
    if acc.is_main_process:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        log({"event": "end", **{k: v for k, v in summary.items() if k != "checkpoint"}})
        writer.close()
        log_file.close()
        _print_summary(summary)
    acc.end_training()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    return summary


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


def _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log):
    result = None
    if acc.is_main_process:
        result = run_knn(cfg, model, train_split, ds.split(cfg.data.eval_split), spec, device)
        log({"step": step, "knn_top1": result})
        acc.print(f"step {step}: kNN top-1 on '{cfg.data.eval_split}' = {100 * result:.2f}%")
    acc.wait_for_everyone()
    return result


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="SimCLR pretraining")
    for col in ("steps", "epochs", "processes", "images/s", "data wait", "wall time", "kNN top-1", "loss impl"):
        t.add_column(col, justify="right")
    knn = "-" if s["knn_top1"] is None else f"{100 * s['knn_top1']:.2f}%"
    t.add_row(str(s["steps"]), f"{s['epochs']:.2f}", str(s["world"]), f"{s['images_per_s']:.0f}",
              f"{100 * s['data_wait_frac']:.0f}%", f"{s['wall_s']:.0f} s", knn, s["loss_impl"])
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
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError, BackendUnavailable) as e:
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
