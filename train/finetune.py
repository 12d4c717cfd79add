r"""Semi-supervised fine-tuning and transfer of a pretrained encoder (Chen et al., 2020, Sec. 4.1
and Appendix B.5), beside the same network trained from scratch on the same labels.

    python -m train.finetune --checkpoint runs/fashion-mnist-demo --labels 0.01
    accelerate launch -m train.finetune --checkpoint RUN --labels 0.1 [--data OTHER_DATASET]
    python -m train.finetune --checkpoint RUN --labels chosen.txt --mode linear

The pretrained encoder f and a fresh linear layer (zero-initialised, as the official fine-tuning
commands do) are trained on a class-balanced, seeded fraction of the train split's labels, or on
the indices listed in a file; the chosen indices are written out either way, so the same subset
can be reused. The paper's protocol: Nesterov momentum 0.9, LR 0.05 x B/256 with no warm-up and a
cosine decay, no weight decay, only random crop (the recipe's crop) and left-right flip; 60 epochs
for 1% of the labels and 30 for more. A small dataset's fraction fills few batches, so the
schedule is lengthened to at least --min-steps steps. Each step trains on both augmented views of
its B/2 images (B = --batch-size counts views), so the loaders' two-view batches are used whole.

--mode linear keeps the encoder frozen (BatchNorm statistics too) and trains only the linear
layer on augmented views. --data points at another converted dataset directory: transfer, in
either mode (its classes may differ; images are resized by the recipe's crop to the encoder's
input size). The from-scratch baseline (skip it with --no-scratch) is the same network, randomly
initialised, through the same schedule.

Writes to --out (default <run dir>/finetune/<mode>-<labels>[-<dataset>]): labels.txt,
finetune.json (top-1/top-5 on the evaluation split of both networks, settings, loss per epoch,
the architecture and class names)
and model.safetensors (the fine-tuned network: `encoder.*` in torchvision's names, `fc.weight`,
`fc.bias`; `python -m tools.export --classifier` turns it into a torchvision classifier).
The three are written into a hidden folder beside --out and renamed into place when all are
complete, so --out holds one run's set or none. A used --out is refused unless --overwrite (which
replaces only a set fine-tuning wrote: other files in --out are refused); one command at a time
writes an --out (the others are refused in one line naming it).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.loader import BACKENDS, build_loader
from pipelines.sources import DatasetError, Split, open_dataset, show_path
from pipelines.spec import AugmentSpec, ViewOverrides
from train.atomic import replace_dir, temp_name, write_atomic
from train.checkpoint import load_pretrained, run_output
from train.cli import above, add_checkpoint, at_least
from train.commands import print_report, run_command
from train.config import ConfigError, config_to_dict
from train.features import eval_views, forward_eval
from train.linear_eval import topk_accuracy
from train.lock import lock_beside, released_on_return
from train.precision import accelerate_precision
from train.run_dir import lock_on_main
from train.schedule import lr_schedule
from train.step import optimizer_step, set_lr

MODES = ("finetune", "linear")
OUTPUTS = ("labels.txt", "finetune.json", "model.safetensors")  # what a run writes into --out
LR_PER_256 = 0.05  # the paper's fine-tuning LR per 256 examples (Appendix B.5)


def finetune_spec(spec: AugmentSpec) -> AugmentSpec:
    """The pretraining spec less everything but its crop and flip (Appendix B.5): colour
    distortion, blur, the study's operations and any per-view override off."""
    return dataclasses.replace(spec, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, rotate_p=0.0,
                               sobel_p=0.0, noise_p=0.0, cutout_p=0.0, view1=ViewOverrides(),
                               view2=ViewOverrides())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.finetune",
                                description=__doc__.split("\n\n")[0])
    add_checkpoint(p)
    p.add_argument("--labels", default="0.1",
                   help="fraction of the train split's labels, class-balanced and seeded (0.01, "
                   "0.1, ..., 1), or a file of train indices, one per line (default: 0.1)")
    p.add_argument("--mode", choices=MODES, default="finetune",
                   help="finetune: train encoder and linear layer (default); linear: frozen "
                   "encoder, train the linear layer only")
    p.add_argument("--data", help="dataset directory (default: the one the encoder was trained "
                   "on; another one is transfer)")
    p.add_argument("--train-split", default=None,
                   help="split the labels are drawn from (default: data.train_split)")
    p.add_argument("--eval-split", default=None,
                   help="split to report accuracy on (default: data.eval_split)")
    p.add_argument("--epochs", type=above(0.0), default=None,
                   help="passes over the labelled images (default: 60 for <= 1%% of the labels, "
                   "else 30)")
    p.add_argument("--min-steps", type=at_least(0), default=100,
                   help="lengthen the schedule to at least this many steps (default: 100)")
    p.add_argument("--batch-size", type=at_least(1), default=256,
                   help="augmented views per step over all processes, two per image (default: "
                   "256; lowered to what the labelled images fill)")
    p.add_argument("--lr", type=above(0.0), default=None,
                   help=f"peak learning rate (default: {LR_PER_256} x batch size / 256)")
    p.add_argument("--backend", default=None,
                   help="loader backend: torchvision, dali or ffcv (default: the run's "
                   "data.backend)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the label draw, the order and the augmentation (default: the "
                   "run's train.seed)")
    p.add_argument("--no-scratch", action="store_true",
                   help="skip the baseline trained from random initialisation")
    p.add_argument("--out", default=None, help="output directory (default: see above)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the fine-tuning run already in --out (its labels.txt, "
                   "finetune.json and model.safetensors), once this one has finished")
    return p


# ---------------------------------------------------------------- the labelled subset

def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-balanced, seeded draw of `fraction` of the labelled images: round(fraction x N / C)
    of every class (at least one; all of a class that has fewer), sorted indices. A fraction of 1
    is every labelled image."""
    labels = np.asarray(labels)
    if fraction >= 1:
        return np.flatnonzero(labels >= 0).astype(np.int64)
    classes = np.unique(labels[labels >= 0])
    per_class = max(1, round(fraction * int((labels >= 0).sum()) / len(classes)))
    rng = np.random.default_rng([seed, 1_000_003])  # a stream of its own, apart from the order's
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        chosen.append(members if len(members) <= per_class
                      else rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_label_file(path: Path, split: Split) -> np.ndarray:
    """The indices listed in a labels file (one per line; blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--labels '{show_path(path)}' is unreadable ({e}): pass a fraction "
                          f"such as 0.01 or a file of indices, one per line") from None
    idx = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.isdigit():
            raise ConfigError(f"--labels '{show_path(path)}' line {n}: {text!r} is not an "
                              f"index: list one non-negative integer per line")
        idx.append(int(text))
    if not idx:
        raise ConfigError(f"--labels '{show_path(path)}' lists no index: list the labelled "
                          f"images of split '{split.name}', one index per line")
    idx = np.array(idx, dtype=np.int64)
    if idx.max() >= len(split):
        raise ConfigError(f"--labels '{show_path(path)}' lists index {idx.max()}, but split "
                          f"'{split.name}' has {len(split)} images: list indices below that")
    if len(np.unique(idx)) != len(idx):
        raise ConfigError(f"--labels '{show_path(path)}' lists an index twice: list each once")
    if (split.labels[idx] < 0).any():
        raise ConfigError(f"--labels '{show_path(path)}' lists unlabelled images of split "
                          f"'{split.name}': list labelled ones")
    return np.sort(idx)


def labels_text(idx: np.ndarray, how: str) -> str:
    return f"# {how}\n# {len(idx)} indices, one per line\n" + "".join(f"{i}\n" for i in idx)


def choose_labels(text: str, split: Split, seed: int) -> tuple[np.ndarray, float | None, str]:
    """(indices, fraction or None, tag) for --labels: a fraction or a file."""
    try:
        fraction = float(text)
    except ValueError:
        path = Path(text)
        return read_label_file(path, split), None, f"labels-{path.stem}"
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"--labels {text}: a fraction must be in (0, 1], e.g. 0.01 or 0.1, or "
                          f"pass a file of indices")
    return balanced_subset(split.labels, fraction, seed), fraction, f"{100 * fraction:g}pct"


def default_epochs(fraction: float) -> float:
    """The paper's epochs: 60 for 1% of ImageNet's labels, 30 for 10% (and, here, for more)."""
    return 60.0 if fraction <= 0.01 else 30.0


# ---------------------------------------------------------------- the network

class Classifier(nn.Module):
    """Encoder f and a linear layer on its features h. With `frozen`, f stays in eval mode (its
    BatchNorm statistics fixed) and gets no gradient."""

    def __init__(self, encoder: nn.Module, classes: int, frozen: bool = False):
        super().__init__()
        self.encoder, self.frozen = encoder, frozen
        self.fc = nn.Linear(encoder.feat_dim, classes)
        nn.init.zeros_(self.fc.weight)  # starts from exactly the pretrained features
        nn.init.zeros_(self.fc.bias)
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            h = self.encoder(x)  # [B, F]
        return self.fc(h.float() if self.frozen else h)  # [B, classes]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The paper's fine-tuning optimizer: Nesterov momentum 0.9, no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)


# ---------------------------------------------------------------- training and evaluation

def train_classifier(acc, model: Classifier, loader, lrs: torch.Tensor, bar) -> list[dict]:
    """Train `model` along `lrs` (one LR per step) with the paper's optimizer, prepared by
    Accelerate here; the mean loss of each epoch. Each step trains on both views of its images."""
    optimizer = make_optimizer(model, float(lrs[0]))
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    history, step, epoch = [], 0, 0
    while step < len(lrs):
        loader.set_epoch(epoch)
        total, count = torch.zeros((), device=acc.device), 0
        for batch in loader:
            if step == len(lrs):
                break
            set_lr(optimizer, float(lrs[step]))
            with acc.autocast():
                logits = model(torch.cat([batch.view1, batch.view2]))  # [2B, classes]
            loss = F.cross_entropy(logits.float(), torch.cat([batch.label, batch.label]))
            total += optimizer_step(optimizer, loss, acc.backward)
            count += 1
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == len(lrs):
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        mean = acc.reduce(total, "mean").item() / max(1, count)
        if not math.isfinite(mean):  # every process reads the same reduced value
            raise FloatingPointError(f"the loss became {mean} in epoch {epoch + 1} (by step "
                                     f"{step}): no result was written; pass a lower --lr than "
                                     f"{float(lrs.max()):g}")
        history.append({"epoch": epoch, "steps": step, "loss": mean})
        epoch += 1
    return history


@torch.no_grad()
def evaluate(acc, model: nn.Module, split: Split, spec, batch_size: int,
             num_workers: int) -> dict:
    """Top-1/top-5 on the un-augmented evaluation view of every image of `split` (each process
    takes a stride of the images; the counts are summed)."""
    net = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    idx = np.arange(acc.process_index, len(split), acc.num_processes)
    labels = torch.from_numpy(np.asarray(split.labels)[idx]).long()
    logits = torch.cat([forward_eval(net, x, acc.device)
                        for x in eval_views(split, spec, idx, batch_size, num_workers)])
    net.train(was_training)
    fractions = topk_accuracy(logits, labels)
    hits = torch.tensor([fractions["top1"], fractions["top5"]], dtype=torch.float64,
                        device=acc.device) * len(idx)  # this process's counts
    hits = acc.reduce(hits, "sum")
    return {"top1": hits[0].item() / len(split), "top5": hits[1].item() / len(split)}


# ---------------------------------------------------------------- the command

def output_dir(ckpt: Path, out: str | None, tag: str) -> Path:
    return Path(out) if out else run_output(ckpt, "finetune") / tag


def _check_splits(*splits: Split) -> int:
    """The number of classes, after checking both splits are labelled."""
    for s in splits:
        if (s.labels < 0).all():
            raise DatasetError(f"split '{s.name}' is unlabelled: fine-tuning needs labels "
                               f"(convert a labelled dataset)")
    return int(max(s.labels.max() for s in splits)) + 1


def _class_names(ds, classes: int) -> list[str]:
    """The dataset's class names, or the label numbers where it has none."""
    return list(ds.classes) if len(ds.classes) == classes else [str(c) for c in range(classes)]


def _save_model(net: Classifier, path: Path) -> None:
    """The network's weights; what it is (arch, classes, source) is in finetune.json beside it."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_atomic(path, save(state))


@dataclasses.dataclass
class Job:
    """What a fine-tuning command works with, from its arguments and the pretrained run."""

    args: argparse.Namespace
    acc: Any  # accelerate.Accelerator
    ckpt: Path
    cfg: Any  # the pretrained run's train.config.Config
    pretrained: nn.Module  # the SimCLR model
    precision: str
    seed: int
    backend: str
    ds: Any  # pipelines.sources.DatasetDir
    train_split: Split
    eval_split: Split
    classes: int
    labelled: np.ndarray  # indices into train_split
    fraction: float | None
    transfer: bool
    out: Path
    work: Path | None = None  # the hidden folder beside `out` the outputs are written into
    spec: Any = None  # the crop-and-flip augmentation
    loader: Any = None
    steps_per_epoch: int = 0
    batch_views: int = 0
    lr: float = 0.0
    lrs: torch.Tensor | None = None


@released_on_return  # the lock of --out, taken by _hold_out
def finetune(args) -> dict:
    """Fine-tune (or train linearly on) the pretrained encoder and, unless --no-scratch, the same
    network from scratch; test both; write labels.txt, finetune.json and model.safetensors (into
    a hidden folder, renamed to --out once all three are written)."""
    t0 = time.perf_counter()
    job = _job(args)
    _plan_steps(job)
    _hold_out(job)
    main = job.acc.is_main_process
    try:
        if main:
            job.work = temp_name(job.out)
            job.work.mkdir()
            _write_labels(job)
        results, nets = {}, {}
        for name, encoder in _contenders(job).items():
            results[name], nets[name] = _train_and_test(job, name, encoder)
        result = _result(job, results, t0)
        if main:
            _save_model(nets["pretrained"], job.work / "model.safetensors")
            result["model"] = str(job.out / "model.safetensors")
            write_atomic(job.work / "finetune.json", json.dumps(result, indent=1))
            replace_dir(job.work, job.out)
            _print_table(result, job.out)
    finally:
        if job.work is not None:
            shutil.rmtree(job.work, ignore_errors=True)
    job.acc.wait_for_everyone()
    return result


def _hold_out(job: Job) -> None:
    """One command at a time writes --out (its main process holds the lock beside it until
    `finetune` ends); a used --out is refused without --overwrite, and with it where it holds
    files that fine-tuning does not write. The hidden folders of a killed earlier command on the
    same --out are deleted."""
    out = job.out
    lock_on_main(job.acc, lock_beside(out), f"--out '{show_path(out)}'",
                 "wait for that command to end, or pass another --out")
    used = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in used if n not in OUTPUTS]
    if foreign:
        raise ConfigError(f"--out '{show_path(out)}' holds files fine-tuning did not write "
                          f"({', '.join(foreign[:5])}): pass another --out")
    if used and not job.args.overwrite:
        raise ConfigError(f"--out '{show_path(out)}' already holds a fine-tuning run "
                          f"({', '.join(used)}): replace it with --overwrite, or pass another "
                          f"--out")
    if job.acc.is_main_process:  # only the lock holder writes these: any left are a dead one's
        for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _job(args) -> Job:
    """The pretrained run, the datasets and the labelled subset; the output directory."""
    from accelerate import Accelerator

    ckpt, cfg, pretrained = load_pretrained(args.checkpoint)
    precision = accelerate_precision(cfg.train.mixed_precision, torch.cuda.is_available())
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    seed = cfg.train.seed if args.seed is None else args.seed
    backend = args.backend or cfg.data.backend
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: unknown loader backend '{backend}': choose one of "
                          f"{', '.join(BACKENDS)}")
    data = Path(args.data or cfg.data.path)
    ds = open_dataset(data)
    train_split = ds.split(args.train_split or cfg.data.train_split)
    eval_split = ds.split(args.eval_split or cfg.data.eval_split)
    classes = _check_splits(train_split, eval_split)
    labelled, fraction, tag = choose_labels(args.labels, train_split, seed)
    present = len(np.unique(train_split.labels[labelled]))
    if present < 2:
        raise DatasetError(f"the labelled images of split '{train_split.name}' hold a single "
                           f"class: every classifier scores 100% on it; label two classes or "
                           f"more")
    if classes <= 5:
        print(f"finetune: warning: {classes} classes: top-5 counts every image as right",
              file=sys.stderr)
    transfer = data.resolve() != Path(cfg.data.path).resolve()
    out = output_dir(ckpt, args.out, f"{args.mode}-{tag}" + (f"-{data.name}" if transfer else ""))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is an existing file: pass a directory")
    return Job(args, acc, ckpt, cfg, pretrained, precision, seed, backend, ds, train_split,
               eval_split, classes, labelled, fraction, transfer, out)


def _plan_steps(job: Job) -> None:
    """The loader of the labelled images (crop and flip only) and the LR of every step."""
    args, world = job.args, job.acc.num_processes
    if args.batch_size % (2 * world):
        raise ConfigError(f"--batch-size {args.batch_size} views cannot be split into two views "
                          f"of whole images on {world} process(es): use a multiple of {2 * world}")
    pairs = min(args.batch_size // (2 * world), len(job.labelled) // world)  # images per process
    if pairs < 1:
        raise ConfigError(f"{len(job.labelled)} labelled images cannot give each of {world} "
                          f"processes one image: label more images or use fewer processes")
    job.batch_views = 2 * pairs * world
    # the crop and flip of the recipe, nothing else (Appendix B.5): no colour, blur or study
    # operation, and both views alike
    job.spec = finetune_spec(job.cfg.augment)
    job.loader = build_loader(job.backend, job.train_split, job.spec, batch_size=pairs,
                              rank=job.acc.process_index, world=world, seed=job.seed,
                              device=job.acc.device, num_workers=job.cfg.data.num_workers,
                              drop_last=True, subset=job.labelled)
    job.steps_per_epoch = len(job.loader)
    epochs = args.epochs or default_epochs(job.fraction if job.fraction is not None
                                           else len(job.labelled) / len(job.train_split))
    steps = max(round(epochs * job.steps_per_epoch), args.min_steps, 1)
    job.lr = args.lr if args.lr is not None else LR_PER_256 * job.batch_views / 256
    job.lrs = lr_schedule(job.lr, steps, 0)  # no warm-up, cosine to zero


def _write_labels(job: Job) -> None:
    args, split, steps = job.args, job.train_split, len(job.lrs)
    how = (f"class-balanced draw of {job.fraction:g} of the labels" if job.fraction is not None
           else f"from {show_path(args.labels)}")
    write_atomic(job.work / "labels.txt", labels_text(
        job.labelled, f"labelled images of split '{split.name}' of '{job.ds.root}', {how}, "
        f"seed {job.seed}"))
    print(f"finetune: {args.mode} on {len(job.labelled)} labelled images of '{split.name}' "
          f"({len(np.unique(split.labels[job.labelled]))} classes), {steps} steps of "
          f"{job.batch_views} views ({steps / job.steps_per_epoch:.1f} epochs), LR {job.lr:g}, "
          f"loader {job.backend}, {job.acc.num_processes} x {job.acc.device.type}", flush=True)


def _contenders(job: Job) -> dict[str, nn.Module]:
    """The pretrained encoder and, unless --no-scratch, the same network randomly initialised."""
    from model.simclr import build_simclr

    contenders = {"pretrained": job.pretrained.encoder}
    if not job.args.no_scratch:
        torch.manual_seed(job.seed)
        contenders["scratch"] = build_simclr(job.cfg.model).encoder
    return contenders


def _train_and_test(job: Job, name: str, encoder: nn.Module) -> tuple[dict, nn.Module | None]:
    """Train `encoder` with a linear layer through the schedule, then test it: its results and,
    for the pretrained one, the trained network."""
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from model.global_batchnorm import convert_to_global_bn

    acc, cfg, steps = job.acc, job.cfg, len(job.lrs)
    set_seed(job.seed)
    net = Classifier(encoder, job.classes, frozen=job.args.mode == "linear")
    if acc.num_processes > 1 and cfg.train.sync_bn and job.args.mode == "finetune":
        net = convert_to_global_bn(net, acc.device)
    net = net.to(acc.device).to(memory_format=torch.channels_last)
    t1 = time.perf_counter()
    with tqdm(total=steps, desc=name, unit="step", disable=not acc.is_main_process) as bar:
        history = train_classifier(acc, net, job.loader, job.lrs, bar)
    train_s = time.perf_counter() - t1
    metrics = evaluate(acc, net, job.eval_split, cfg.augment, cfg.eval.batch_size,
                       cfg.data.num_workers)
    result = {**metrics, "train_s": train_s, "images_per_s": steps * job.batch_views / train_s,
              "final_loss": history[-1]["loss"], "loss_by_epoch": history}
    return result, acc.unwrap_model(net) if name == "pretrained" else None


def _result(job: Job, results: dict, t0: float) -> dict:
    """finetune.json's record."""
    args, cfg, steps = job.args, job.cfg, len(job.lrs)
    return {
        "checkpoint": str(job.ckpt), "dataset": str(job.ds.root), "transfer": job.transfer,
        "mode": args.mode, "train_split": job.train_split.name,
        "eval_split": job.eval_split.name, "eval_count": len(job.eval_split),
        "label_fraction": job.fraction, "labels_file": str(job.out / "labels.txt"),
        "labelled": len(job.labelled), "num_classes": job.classes,
        "classes": _class_names(job.ds, job.classes),
        "arch": cfg.model.arch, "width": cfg.model.width, "small_stem": cfg.model.small_stem,
        "settings": {"steps": steps, "epochs": steps / job.steps_per_epoch,
                     "batch_views": job.batch_views, "lr": job.lr, "momentum": 0.9,
                     "nesterov": True, "weight_decay": 0.0, "warmup_steps": 0,
                     "schedule": "cosine", "backend": job.backend,
                     "processes": job.acc.num_processes, "device": job.acc.device.type,
                     "precision": job.precision, "seed": job.seed,
                     "augment": config_to_dict(job.spec)},
        **results, "wall_s": time.perf_counter() - t0,
    }


def _print_table(r: dict, out: Path) -> None:
    from rich.table import Table

    what = (f"{100 * r['label_fraction']:g}% of the labels" if r["label_fraction"] is not None
            else "listed labels")
    t = Table(title=f"{'Fine-tuning' if r['mode'] == 'finetune' else 'Linear training'} on "
              f"{what} ({r['labelled']} images), tested on '{r['eval_split']}' "
              f"({r['eval_count']} images)")
    for col in ("network", "top-1", "top-5", "final loss", "images/s", "time"):
        t.add_column(col, justify="right")
    rows = [("SimCLR pretrained", r["pretrained"])]
    if "scratch" in r:
        rows.append(("from scratch (baseline)" if r["mode"] == "finetune"
                     else "random-init encoder (baseline)", r["scratch"]))
    for name, m in rows:
        t.add_row(name, f"{100 * m['top1']:.2f}%", f"{100 * m['top5']:.2f}%",
                  f"{m['final_loss']:.3f}", f"{m['images_per_s']:.0f}", f"{m['train_s']:.0f} s")
    print_report([t], [f"results: {out / 'finetune.json'}", f"labels:  {r['labels_file']}",
                       f"model:   {r['model']}"])


def main(argv: list[str] | None = None) -> int:
    from train.signals import watch_launcher

    args = build_parser().parse_args(argv)
    with watch_launcher("finetune"):  # a launcher that dies ends it (SIGTERM) rather than orphan it
        return run_command("finetune", lambda: finetune(args), errors=(FloatingPointError,),
                           oom_fix=f"pass a smaller --batch-size than {args.batch_size}")


if __name__ == "__main__":
    sys.exit(main())
