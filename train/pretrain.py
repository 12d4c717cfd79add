"""SimCLR pretraining.

    accelerate launch -m train.pretrain --config train/configs/fashion_mnist_demo.yaml [--resume auto] [--section.key=value ...]

One process on CPU, several CPU processes over gloo (`accelerate launch --multi_gpu
--num_processes N` on a machine without GPUs), or GPUs with bf16 autocast. Writes to
train.out_dir: config.yaml, log.jsonl, TensorBoard events, checkpoints/, summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import yaml

from pipelines.loader import BackendUnavailable, build_loader
from pipelines.sharding import dropped_per_epoch
from pipelines.sources import DatasetError, open_dataset
from train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
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
                   help="continue from a checkpoint: 'auto' (the run's latest, if any) or a checkpoint/run path")
    return p


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    from train.lars import LARS, lars_param_groups

    groups = lars_param_groups(model, cfg.optim.weight_decay)
    if cfg.optim.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.optim.momentum, eta=cfg.optim.eta, strategy=cfg.optim.lars_strategy)
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


def train(cfg: Config, resume: str | None = None) -> dict:
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
                raise CheckpointError(f"checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {e}): "
                                      "pass another with --resume or start afresh") from None
            step = state["step"]
            seconds_before = state.get("train_seconds", 0.0)
            if budget > 0 and state.get("planned_steps"):
                total_steps, planned = state["planned_steps"], True
                lrs, last_step = plan(total_steps)
            loader.load_state_dict(state["loader"])
            acc.print(f"resumed from {ckpt} at step {step}")
        elif acc.is_main_process:
            acc.print(f"no checkpoint under {ckpt_root}: starting afresh")

    if step >= last_step and (out / "summary.json").is_file():
        acc.print(f"run '{out}' already finished ({step} steps): nothing to do; start a new one with "
                  f"another --train.out_dir or raise optim.epochs / train.max_steps")
        return json.loads((out / "summary.json").read_text())

    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
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
        return save_checkpoint(acc, ckpt_root, step, state, config_yaml, keep=cfg.train.keep_checkpoints)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    log({"event": "start", "step": step, "world": world, "device": str(device), "precision": precision,
         "loss_impl": loss_impl, "backend": cfg.data.backend, "global_batch": cfg.data.batch_size,
         "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "peak_lr": peak_lr,
         "loss_scale": cfg.loss.scale,
         "dropped_per_epoch": dropped_per_epoch(len(train_split), world, local_batch)})
    acc.print(f"SimCLR {cfg.model.arch} x{cfg.model.width} | {world} process(es) on {device.type} | "
              f"batch {cfg.data.batch_size} | loss {loss_impl} | {cfg.data.backend} loader | "
              f"{steps_per_epoch} steps/epoch, steps {step}->{last_step}")

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
            batch = next(it, None)
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
        if step % steps_per_epoch == 0 and cfg.train.knn_every > 0 and (step // steps_per_epoch) % cfg.train.knn_every == 0:
            knn_result = _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log)
    bar.close()
    images_seen += tick_images
    wall = time.perf_counter() - t_start
    final = checkpoint()
    if cfg.train.knn_every >= 0 and not stop["now"] and step == last_step:
        knn_result = _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log)
    summary = {"steps": step, "total_steps": total_steps, "epochs": step / steps_per_epoch, "world": world,
               "device": str(device), "loss_impl": loss_impl, "backend": cfg.data.backend,
               "images_per_s": images_seen / wall if wall > 0 else 0.0, "wall_s": wall,
               "data_wait_frac": wait_s / wall if wall > 0 else 0.0, "knn_top1": knn_result,
               "tflops": images_seen / wall * flops_per_image / 1e12 if wall > 0 else 0.0,
               "mfu": model_flops_utilisation(flops_per_image, images_seen / wall, peak) if wall > 0 else None,
               "checkpoint": str(final), "interrupted": stop["now"] and stop_reason is None,
               "stopped_by": stop_reason, "time_budget_s": budget or None,
               "planned_steps": total_steps if budget > 0 and planned else None}
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log({"event": "end", **{k: v for k, v in summary.items() if k != "checkpoint"}})
        writer.close()
        log_file.close()
        _print_summary(summary)
    acc.end_training()
    return summary


def _agree_max(device: torch.device, world: int, *values: float) -> tuple[float, ...]:
    """The largest of each value over all processes (one all-reduce; values as given for one)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def _knn_on_main(cfg, acc, model, ds, train_split, spec, device, step, log):
    result = None
    if acc.is_main_process and cfg.data.eval_split in ds.splits:
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


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, DatasetError, CheckpointError, FloatingPointError, BackendUnavailable) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("pretrain: error: out of memory: lower data.batch_size or use loss.impl=chunked", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
