"""Run settings: a typed dataclass tree, loaded from YAML recipes with dotted CLI overrides.

    cfg = load_config(["--config", "train/configs/fashion_mnist_demo.yaml", "--optim.lr=0.5"])

Unknown keys and values of the wrong type are rejected with a one-line ConfigError that
names the key; the resolved settings are written next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.encoder import ARCHS
from model.losses import LOSSES, SIMILARITIES
from model.nt_xent import IMPLS
from model.simclr import head_problem
from pipelines.loader import BACKENDS
from pipelines.spec import AugmentSpec
from train.atomic import write_atomic
from train.precision import PRECISIONS
from train.schedule import SCALING_RULES


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key and the fix."""


@dataclass
class DataConfig:
    path: str = "data/fashion-mnist"  # dataset directory written by tools.convert
    backend: str = "torchvision"  # torchvision | dali | ffcv
    train_split: str = "train"
    eval_split: str = "test"  # held-out split for the kNN monitor and linear evaluation
    batch_size: int = 256  # global batch (all processes); SimCLR: 256-8192
    num_workers: int = 2  # CPU workers / threads per process


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
    width: float = 1.0  # channel multiplier (1.0 = torchvision's widths)
    small_stem: bool = False  # 3x3 stride-1 stem without max-pool, for 32x32-class images
    stem_pool: bool = False  # keep the max-pool after the small stem: 4x cheaper, for CPU runs
    head_hidden: int = 0  # 0 = the encoder's feature width (2048 for ResNet-50)
    head_out: int = 128  # projection dimension (unused with head_layers 0)
    # the paper's heads (Sec. 4.2): 0 = none (the loss sees h), 1 = linear, 2 (SimCLR v1) or 3 (v2)
    # = non-linear
    head_layers: int = 2
    # last head layer: Linear without bias + BatchNorm with scale, no shift, as the official code
    # (true in the recipes that copy the paper's settings); false: Linear with bias (v1's text)
    head_out_bn: bool = False
    channels_last: bool = True
    compile: bool = False  # torch.compile the model

    def __post_init__(self):  # settings that contradict each other (one line, via _build)
        problem = head_problem(self.head_layers, self.head_hidden, self.head_out_bn)
        if problem:
            raise ValueError(problem)


@dataclass
class LossConfig:
    temperature: float = 0.1  # 0.1 ImageNet, 0.5 CIFAR
    impl: str = "auto"  # auto | reference | chunked | triton
    # the loss optimised is scale x the mean over the 2N anchors (Algorithm 1). The official code
    # sums the two directions' means, i.e. scale 2: with LARS this doubles the effective weight
    # decay and halves BatchNorm/bias steps, so recipes that copy its settings use 2.0
    scale: float = 1.0
    # the paper's table of losses (model/losses.py): nt_xent | nt_logistic | margin_triplet
    name: str = "nt_xent"
    similarity: str = "cosine"  # cosine (l2-normalised projections, the paper's) | dot
    semi_hard: bool = False  # semi-hard negative mining, for nt_logistic and margin_triplet
    margin: float = 0.5  # m of margin_triplet (the paper tuned it without giving the value)

    def __post_init__(self):  # settings that contradict each other (one line, via _build)
        if self.semi_hard and self.name == "nt_xent":
            raise ValueError("'loss.semi_hard' applies to loss.name nt_logistic or "
                             "margin_triplet (NT-Xent weighs its negatives by hardness itself): "
                             "set loss.semi_hard=false or choose one of those losses")


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | sgd
    # base LR before scaling; 0 = the paper's for lr_scaling: 0.3 (linear), 0.075 (sqrt)
    lr: float = 0.0
    lr_scaling: str = "linear"  # linear: lr * B/256; sqrt: lr * sqrt(B)
    momentum: float = 0.9
    weight_decay: float = 1e-6  # 1e-6 with LARS; ~5e-4 with SGD
    eta: float = 0.001  # LARS trust coefficient
    warmup_epochs: float = 10.0
    epochs: int = 100


@dataclass
class TrainConfig:
    seed: int = 0
    out_dir: str = "runs/simclr"
    # auto: bf16 autocast on a GPU and on a CPU with native bf16 (train/precision.py), else fp32
    mixed_precision: str = "auto"  # auto | fp32 | bf16
    sync_bn: bool = True  # global BatchNorm across processes
    checkpoint_every: int = 500  # steps; also at the end and on SIGTERM or SIGINT (0 = only then)
    keep_checkpoints: int = 2  # 0 = keep all
    log_every: int = 10  # steps
    max_steps: int = 0  # stop after this many steps of the schedule (0 = run it all)
    # seconds of training (0 = no limit): the first steps are timed, then the warmup+cosine
    # schedule is fitted to end within the budget (optim.epochs stays the upper bound)
    time_budget_s: float = 0.0
    # images per process per forward chunk (0 = the whole per-process batch in one forward): with
    # a smaller value each step forwards the batch in chunks twice (gradient caching), so memory
    # holds one chunk's activations while the loss, its negatives and the update stay the whole
    # batch's; BatchNorm normalises each chunk on its own (README: "Large batches")
    micro_batch: int = 0
    knn_every: int = 0  # epochs between kNN-monitor evaluations (0 = only at the end, -1 = never)
    knn_every_s: float = 0.0  # also every this many seconds of training (0 = off); kNN time is
    # kept off the training clock, so throughput and the time budget are unaffected
    knn_k: int = 200
    knn_train_samples: int = 10000  # bank size drawn from the train split


@dataclass
class EvalConfig:
    batch_size: int = 512  # feature extraction batch
    max_iter: int = 200  # L-BFGS iterations of the linear classifier
    val_fraction: float = 0.1  # of the train split, held out to pick the L2 penalty
    # L2 penalties tried, strongest first, each fit starting from the previous one's solution
    # (log-spaced over the paper's transfer-protocol range 1e-6..1e5 and two decades weaker, since
    # on standardised features the best is often near 1e-6; a warning says when it lies on an edge)
    l2_grid: tuple[float, ...] = (
        1e5, 1e4, 1e3, 1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    # coarse: the path over every other grid value, then the two grid neighbours of its best
    # (9 fits of the 14 by default); full: every grid value (train/linear_eval.py)
    l2_search: str = "coarse"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Each list comes from the module that acts on the value; the last two only train.pretrain reads,
# and it imports this module (and accelerate), so they are listed here.
CHOICES = {
    "data.backend": BACKENDS,
    "model.arch": tuple(ARCHS),
    "loss.impl": IMPLS,
    "loss.name": LOSSES,
    "loss.similarity": SIMILARITIES,
    "optim.lr_scaling": SCALING_RULES,
    "optim.name": ("lars", "sgd"),
    "train.mixed_precision": PRECISIONS,
    "eval.l2_search": ("coarse", "full"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: lo/hi bounds (None = unbounded), each closed unless *_open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        def num(x) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{num(self.lo)}, {num(self.hi)}{right}"


# Every int and float key has a range here (a test keeps it so), checked before any work starts.
# The augmentation spec checks its own values (pipelines/spec.py); its floats must be finite.
RANGES = {
    "data.batch_size": Range(2),  # NT-Xent needs another image in the batch for negatives
    "data.num_workers": Range(0),
    "model.width": Range(0, lo_open=True),
    "model.head_hidden": Range(0),  # 0 = the encoder's feature width
    "model.head_out": Range(1),
    "model.head_layers": Range(0),  # 0 = no head
    "loss.temperature": Range(0, lo_open=True),
    "loss.scale": Range(0, lo_open=True),
    "loss.margin": Range(0),
    "optim.lr": Range(0),  # 0 = the paper's base LR for the scaling rule
    "optim.momentum": Range(0, 1, hi_open=True),
    "optim.weight_decay": Range(0),
    "optim.eta": Range(0, lo_open=True),
    "optim.warmup_epochs": Range(0),
    "optim.epochs": Range(1),
    "train.seed": Range(0, 2**32 - 1),
    "train.checkpoint_every": Range(0),  # 0 = only at the end and on a signal
    "train.keep_checkpoints": Range(0),  # 0 = keep every checkpoint
    "train.log_every": Range(1),
    "train.max_steps": Range(0),  # 0 = the whole schedule
    "train.time_budget_s": Range(0),  # 0 = no limit
    "train.micro_batch": Range(0),  # 0 = no chunks
    "train.knn_every": Range(-1),  # -1 = never, 0 = only at the end
    "train.knn_every_s": Range(0),  # 0 = off
    "train.knn_k": Range(1),
    "train.knn_train_samples": Range(1),
    "eval.batch_size": Range(1),
    "eval.max_iter": Range(1),
    "eval.val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "eval.l2_grid": Range(0, lo_open=True),  # each value
}
NON_EMPTY = ("data.path", "data.train_split", "data.eval_split", "train.out_dir", "eval.l2_grid")

# Keys that older versions wrote into every run's config.yaml: skipped with a warning, so those
# runs still resume and evaluate. Key -> why it went.
REMOVED = {
    "optim.lars_strategy": "LARS picks its CPU or GPU path from the parameters' device",
}


def _check_value(key: str, value) -> None:
    """Raise a one-line ConfigError if `value` is outside the key's choices or range."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(
            f"config: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in NON_EMPTY and len(value) == 0:
        raise ConfigError(f"config: '{key}' must not be empty")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config: '{key}' must be a finite number, got {v}")
        if key in RANGES and v not in RANGES[key]:
            each = "every value of " if isinstance(value, tuple) else ""
            raise ConfigError(f"config: {each}'{key}' must be {RANGES[key]}, got {value!r}")


def _coerce(key: str, value, tp):
    """Check `value` against its annotation `tp`; return it converted (list->tuple, int->float)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(key, v, args[0]) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(key, v, a) for v, a in zip(value, args))
            raise ConfigError(
                f"config: '{key}' expects {len(args)} values, got {len(value)}: {value!r}")
    elif origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:  # X | None: a per-view override
            return None if value is None else _coerce(key, value, args[0])
        raise ConfigError(f"config: '{key}' has an unsupported type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config: '{key}' expects {name}, got {value!r} ({type(value).__name__})")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields and dotted in REMOVED:
            print(f"config: warning: ignoring '{dotted}', no longer a setting ({REMOVED[dotted]})",
                  file=sys.stderr)
            continue
        if key not in fields:
            close = difflib.get_close_matches(dotted, _all_keys(Config), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config: unknown key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config: '{dotted}' is a section; give it keys, not {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
            _check_value(dotted, kwargs[key])
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own validation (e.g. AugmentSpec)
        raise ConfigError(f"config: {prefix.rstrip('.') or 'root'}: {e}") from None


def _all_keys(cls, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config: '{dotted}' overrides a value, not a section")
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr=0.5', '--model.arch', 'resnet18'] -> nested dict, values parsed as YAML."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"config: unexpected argument '{arg}': overrides look like "
                              "--section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"config: '{key}' needs a value: --{key}=VALUE")
            raw, i = args[i + 1], i + 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
        i += 1
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' not found: pass an existing recipe, "
                          "e.g. train/configs/fashion_mnist_demo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config: '{path}' is not a text file: pass a YAML recipe, e.g. "
                          "train/configs/fashion_mnist_demo.yaml") from None
    except OSError as e:
        raise ConfigError(f"config: '{path}' is unreadable ({e.strerror or e}): fix its "
                          "permissions or pass another recipe") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config: '{path}' is not valid YAML ({first})") from None
    if tree is None:  # empty, or comments only: a recipe that says nothing is a mistake
        raise ConfigError(f"config: '{path}' holds no settings (it is empty or only comments): "
                          "pass a recipe, or leave --config out to train on the defaults")
    if not isinstance(tree, dict):
        raise ConfigError(f"config: '{path}' must hold a mapping of sections")
    return tree


def build_config(tree: dict) -> Config:
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree = load_yaml(path) if path else {}
    return build_config(_merge(tree, parse_overrides(overrides or [])))


# What a resumed run may set differently from its checkpoint: how the rest of the run is carried
# out (its length, time budget, cadences, workers, where the data now lives), never what it trains
# (the dataset's contents, model, batch, loss, augmentation, optimizer, precision, seed).
RESUMABLE = (
    "data.path",  # the same dataset moved: its identity is checked apart (its fingerprint)
    "data.num_workers", "train.out_dir", "train.checkpoint_every", "train.keep_checkpoints",
    "train.log_every", "train.max_steps", "train.time_budget_s", "train.knn_every",
    "train.micro_batch",  # the loss and update are the batch's: e.g. a run that ran out of memory
    "train.knn_every_s", "train.knn_k", "train.knn_train_samples", "eval.",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def resume_differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(allowed, refused): the settings that differ between a checkpoint's config tree `saved` and
    this run's `now`, as 'key A -> B', split by `RESUMABLE`. A key missing from `saved` (a
    checkpoint of an older version) is not a difference."""
    old, new = _flat(saved), _flat(now)
    allowed, refused = [], []
    for key in new:
        if key in old and old[key] != new[key]:
            line = f"{key} {old[key]!r} -> {new[key]!r}"
            resumable = any(key == r or (r.endswith(".") and key.startswith(r))
                            for r in RESUMABLE)
            (allowed if resumable else refused).append(line)
    return allowed, refused


def config_to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved settings as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
