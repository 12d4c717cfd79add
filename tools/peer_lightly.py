"""lightly's SimCLR, set up as lightly's own examples and benchmarks do, trained for a wall-clock
budget with the same kNN curve as train.pretrain: the peer of tools.bench_quality.

    python -m tools.peer_lightly --config CFG --out DIR --budget S --every S [--threads N]
                                 [--key.sub=value ...]

It reads the same config as the trainer (dataset directory, encoder, batch size, augmentation,
temperature, kNN settings) and writes into DIR: log.jsonl (one {"event": "knn", "step", "epoch",
"images", "train_s", "knn_top1"} line per evaluation: every --every seconds of training and at
the end, with the training clock paused while it evaluates) and encoder.pt (the encoder's state
dict, for the linear probe). lightly is a benchmark-only dependency (`make bench-peers`).

From lightly's examples (examples/pytorch/simclr.py) and its CIFAR-10 benchmark
(docs/source/getting_started/benchmarks/cifar10_benchmark.py): SimCLRTransform, NTXentLoss,
SimCLRProjectionHead, a torch DataLoader of PIL images (shuffle, drop_last), and SGD with
lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4 under a cosine schedule without warmup
(CosineAnnealingLR over the run). The cosine here spans the steps that fit the budget and the
run trains until the budget ends (`BudgetPlan`): from step 30 on, every step re-plans the steps
left at the pace measured since step 10, and the run stops when one more step would overshoot
the budget by more than it would fall short. (A plan fitted once, from steps 10..30, ended a
281 s run after 222 s where the later steps ran faster than the timed ones.) The training seconds
and the budget go to summary.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.sources import DatasetError, Split, open_dataset
from pipelines.spec import AugmentSpec
from train.atomic import write_atomic
from train.config import ConfigError, load_config, save_config
from train.schedule import epochs_to_steps

TIMED_FROM, TIMED_TO = 10, 30  # the steps train.schedule.Schedule times at log_every 10
SYNC_EVERY = 10  # on CUDA, the clock waits for the device every this many steps


class BudgetPlan:
    """Lightly's cosine schedule without warm-up, spread over a wall-clock budget, and when to
    stop. Until step TIMED_TO the cosine spans `cap` steps (the learning rate stays near its
    peak); from then on every step re-plans the total as the steps done plus the budget left at
    the mean pace since step TIMED_FROM, so the learning rate reaches 0 where the budget ends
    however the pace drifts, and `done` stops the run once one more step would overshoot the
    budget by more than it would fall short (the run ends within half a step of the budget, on
    average)."""

    def __init__(self, peak: float, budget_s: float, cap: int, timed_from: int = TIMED_FROM,
                 timed_to: int = TIMED_TO):
        self.peak, self.budget_s, self.cap = peak, budget_s, cap
        self.timed_from, self.timed_to = timed_from, timed_to
        self.total = cap  # the steps the cosine spans, re-planned after every step
        self.step_s: float | None = None  # seconds a step since timed_from
        self._t_from: float | None = None

    def lr(self, step: int) -> float:
        """The learning rate of the step after `step` steps: train.schedule.lr_schedule(peak,
        total, 0)[step] for the current total (0 on the plan's last step)."""
        p = min(1.0, (step + 1) / self.total)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * p))

    def after_step(self, step: int, train_s: float) -> None:
        """`step` steps are done after `train_s` seconds of training: time, re-plan."""
        if step == self.timed_from:
            self._t_from = train_s
        if self._t_from is not None and step >= self.timed_to:
            self.step_s = (train_s - self._t_from) / (step - self.timed_from)
            left = math.floor(max(0.0, self.budget_s - train_s) / self.step_s + 0.5)
            self.total = max(step + 1, min(self.cap, step + left))

    def done(self, step: int, train_s: float) -> bool:
        if step >= self.cap:
            return True
        if self.step_s is None:
            return train_s >= self.budget_s
        return train_s + self.step_s / 2 >= self.budget_s


def unavailable() -> str | None:
    """Why lightly cannot run here (None: it can)."""
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules  # noqa: F401
        import lightly.transforms  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of lightly's
        return (f"lightly does not import ({type(e).__name__}: {e}): install it with "
                f"'make bench-peers'")
    return None


def transform_kwargs(spec: AugmentSpec) -> dict:
    """lightly.transforms.SimCLRTransform's arguments for the augmentation `spec`.

    Every spec field with an equivalent is mapped. Without one: crop_area[1] (lightly's crops
    always reach the whole image, scale=(min_scale, 1.0)), crop_ratio (lightly keeps
    RandomResizedCrop's default 3/4..4/3, the spec's default) and blur_kernel_frac (lightly
    blurs with PIL's GaussianBlur, whose kernel follows sigma)."""
    return {
        "input_size": spec.size,
        "min_scale": spec.crop_area[0],
        "hf_prob": spec.flip_p,
        "vf_prob": 0.0,
        "rr_prob": 0.0,
        "cj_prob": spec.jitter_p,
        "cj_strength": spec.jitter_strength,
        # the spec's brightness, contrast, saturation and hue are these times jitter_strength
        "cj_bright": 0.8, "cj_contrast": 0.8, "cj_sat": 0.8, "cj_hue": 0.2,
        "random_gray_scale": spec.grayscale_p,
        "gaussian_blur": spec.blur_p,
        "sigmas": tuple(spec.blur_sigma),
        "normalize": {"mean": list(spec.mean), "std": list(spec.std)},
    }


class PILViews(torch.utils.data.Dataset):
    """The split's images as RGB PIL images through `transform` (lightly's datasets yield PIL)."""

    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        from PIL import Image

        if self.split.images is not None:
            img = np.asarray(self.split.images[i])
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        else:
            pil = Image.open(io.BytesIO(self.split.file_bytes(i)))
        return self.transform(pil.convert("RGB"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.peer_lightly",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the trainer's YAML recipe")
    p.add_argument("--out", type=Path, required=True, help="folder for log.jsonl and encoder.pt")
    p.add_argument("--budget", type=float, required=True, help="seconds of training")
    p.add_argument("--every", type=float, required=True, help="seconds of training between kNN")
    p.add_argument("--threads", type=int, default=None, help="torch threads and loader workers")
    return p


def train(cfg, out: Path, budget: float, every: float, threads: int) -> dict:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    from model.simclr import build_simclr
    from train.features import knn_top1

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = open_dataset(cfg.data.path)
    train_split, eval_split = ds.split(cfg.data.train_split), ds.split(cfg.data.eval_split)
    encoder = build_simclr(cfg.model).encoder  # the same network as the trainer's
    feat = encoder.feat_dim
    # lightly's head: BatchNorm after every Linear, the last one's included (batch_norm=True, its
    # default); model.head_out_bn has no other equivalent
    head = SimCLRProjectionHead(feat, cfg.model.head_hidden or feat, cfg.model.head_out,
                                num_layers=cfg.model.head_layers)
    model = torch.nn.Sequential(encoder, head).to(device)  # no channels_last: lightly's examples
    criterion = NTXentLoss(temperature=cfg.loss.temperature)
    bs = cfg.data.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06 * bs / 128, momentum=0.9,
                                weight_decay=5e-4)
    peak = optimizer.param_groups[0]["lr"]
    loader = torch.utils.data.DataLoader(
        PILViews(train_split, SimCLRTransform(**transform_kwargs(cfg.augment))), batch_size=bs,
        shuffle=True, drop_last=True, num_workers=threads, persistent_workers=threads > 0)
    steps_per_epoch = len(loader)
    plan = BudgetPlan(peak, budget, epochs_to_steps(cfg.optim.epochs, steps_per_epoch))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else (lambda: torch.autocast("cpu", enabled=False))

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")  # the encoder's settings, for the linear probe
    log = open(out / "log.jsonl", "a")
    step = images = 0
    train_s, next_eval = 0.0, every

    def evaluate() -> None:
        top1 = knn_top1(cfg, encoder, train_split, eval_split, device)
        model.train()
        log.write(json.dumps({"event": "knn", "step": step, "epoch": step / steps_per_epoch,
                              "images": images, "train_s": train_s, "knn_top1": top1}) + "\n")
        log.flush()
        print(f"peer: {train_s:.1f} s, step {step}: kNN top-1 {100 * top1:.2f}%", flush=True)

    model.train()
    started = False
    while not plan.done(step, train_s):
        t0 = time.perf_counter()  # the clock runs from the epoch's first batch request
        for x0, x1 in loader:
            if not started:  # except the run's first (start-up), as simclr-fast's trainer does
                t0, started = time.perf_counter(), True
            for g in optimizer.param_groups:
                g["lr"] = plan.lr(step)
            x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
            with autocast():
                loss = criterion(model(x0), model(x1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            images += bs
            if device.type == "cuda" and step % SYNC_EVERY == 0:
                torch.cuda.synchronize(device)  # the clock counts the steps' work
            now = time.perf_counter()
            train_s, t0 = train_s + now - t0, now
            plan.after_step(step, train_s)
            if plan.done(step, train_s):
                break
            if train_s >= next_eval:
                evaluate()
                next_eval += every * (1 + int((train_s - next_eval) // every))
                t0 = time.perf_counter()  # the evaluation is not training time
    evaluate()  # the end of the run
    log.close()
    torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()},
               out / "encoder.pt")
    summary = {"steps": step, "images": images, "train_s": train_s, "budget_s": budget,
               "planned_steps": plan.total, "images_per_s": images / train_s if train_s else None}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    reason = unavailable()
    if reason:
        print(f"peer_lightly: error: {reason}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)
        summary = train(cfg, args.out, args.budget, args.every,
                        args.threads or torch.get_num_threads())
    except (ConfigError, DatasetError) as e:
        print(f"peer_lightly: error: {e}", file=sys.stderr)
        return 2
    print(f"peer: {summary['steps']} steps, {summary['images']} images in "
          f"{summary['train_s']:.1f} s of training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
