"""What a pretraining run works with (`Run`), built by `train.pretrain.set_up` and read by the
loop and its bookkeeping (train/bookkeeping.py), and its log (`RunLog`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.sources import DatasetDir, Split
from train.config import Config
from train.schedule import Schedule, TrainClock

if TYPE_CHECKING:
    from accelerate import Accelerator


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
    clock: TrainClock = field(default_factory=TrainClock)  # carried over by a resume
    first_batch_s: float | None = None  # this invocation's wait for its first batch (start-up)
    knn_history: list = field(default_factory=list)  # [step, kNN top-1] of every evaluation
    resume_changes: list = field(default_factory=list)  # settings a resume changed, 'key A -> B'
    log: RunLog | None = None
    config_yaml: str = ""  # the resolved settings, written into every checkpoint

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


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
        if self.file:
            self.writer.close()
            self.file.close()
