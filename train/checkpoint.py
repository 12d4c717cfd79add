"""Atomic checkpoints: Accelerate state (model, optimizer, RNG of every process) plus the
trainer's own state (step, loader position) and the resolved config.

A checkpoint is written into a hidden temp directory and renamed into place only when
complete; `latest` is a small text file replaced atomically, so an interrupted save never
leaves a half-written checkpoint behind or points at one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message says what to pass instead."""


def save_checkpoint(accelerator, ckpt_root: Path, step: int, trainer_state: dict, config_yaml: str,
                    keep: int = 2) -> Path:
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(ckpt_root / LATEST, final.name + "\n")
        for old in sorted(ckpt_root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a checkpoints/ folder, or a run directory."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            p = root / (root / LATEST).read_text().strip()
            break
    if not (p / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"no readable checkpoint at '{path}' ({TRAINER_STATE} missing): pass a run directory, "
            f"its checkpoints/ folder or a step-* directory written by train.pretrain"
        )
    return p


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    try:
        return resolve_checkpoint(ckpt_root)
    except CheckpointError:
        return None


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}' is unreadable ({e}): pass another with --resume or start afresh") from None


def load_model_weights(ckpt: Path) -> dict:
    """The model state dict of a checkpoint, without loading optimizer or RNG state."""
    files = sorted(ckpt.glob("model*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"checkpoint '{ckpt}' holds no model weights: pass another checkpoint")
    state = {}
    try:
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                import torch

                state.update(torch.load(f, map_location="cpu", weights_only=True))
    except Exception as e:  # corrupt files raise many different types
        raise CheckpointError(f"checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {e}): pass another checkpoint") from None
    return state
