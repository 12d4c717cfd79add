"""Atomic checkpoints: Accelerate state (model, optimizer, RNG of every process) plus the
trainer's own state (step, loader position) and the resolved config.

A checkpoint is written into a hidden temp directory and renamed into place only when
complete; `latest` is a small text file replaced atomically after it. A checkpoint that
already exists for the same step is swapped out (an atomic exchange where the system has one,
else renamed aside) and deleted only once its replacement is in place, and rotation never
deletes the checkpoint just written. A kill at any moment therefore leaves every complete
checkpoint in place (a replaced one is gone only once its successor is complete).

Resolving a run directory or checkpoints/ folder gives its complete checkpoint with the highest
step: the one `latest` names, or a newer one a kill kept `latest` from naming, or, where
`latest` names a missing one, the newest that is there. train.pretrain keeps the highest step
the current one: resuming from an earlier checkpoint moves the later ones into an abandoned-*
folder.

Every checkpoint carries manifest.json, the sha256 of each of its files, written before the
rename. `verify_checkpoint` checks those sums and that the model weights are sound (finite and
below SOUND_LIMIT in magnitude, the rule train.pretrain applies before it writes one);
`load_pretrained` and `pretrain --resume` load nothing that fails it, and `newest_sound_checkpoint`
is what `--resume auto` continues from. A checkpoint written before manifests existed is checked
for its weights only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from train.atomic import exchange as _exchange  # a module name the tests can patch
from train.atomic import fault_point, fsync_dir, write_atomic

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
MANIFEST = "manifest.json"
# The largest magnitude a sound weight, buffer or optimizer value may have: 2**64 (~1.8e19), where
# its square overflows float32, so norms, variances and weight decay of it are no longer numbers.
# A diverging run crosses it within a step or two (SGD at a far too high learning rate grows its
# weights to ~1e23 while its loss stays finite); no trained network comes near it.
SOUND_LIMIT = 2.0 ** 64
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that is missing or unreadable; the message says what to pass instead."""


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """The step-* directories under `ckpt_root`, by step number (not by name)."""
    found = []
    for p in Path(ckpt_root).glob("step-*"):
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(accelerator, ckpt_root: Path, step: int, trainer_state: dict, config_yaml: str,
                    keep: int = 2) -> Path:
    """Write the checkpoint of `step`; keep the newest `keep` (0: all), never deleting this one.
    A failed write (e.g. a full disk) raises a one-line CheckpointError and leaves no temp
    directory; the checkpoints already there stay as they were."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    try:
        if accelerator.is_main_process:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".del-step-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed save or rotation
            _restore_set_aside(ckpt_root)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fault_point("in-state-save", step)
            write_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
            write_atomic(tmp / "config.yaml", config_yaml)
            write_manifest(tmp)
            _fsync_files(tmp)  # on disk before it is named: a power loss cannot tear it either
            _move_into_place(tmp, final, step)
            fault_point("after-rename", step)
            write_atomic(ckpt_root / LATEST, final.name + "\n", fault="latest-replace", step=step)
            others = [p for _, p in step_dirs(ckpt_root) if p != final]
            for old in others[: max(0, len(others) - (keep - 1))] if keep > 0 else []:
                gone = old.with_name(f".del-{old.name}")  # out of sight at once, then deleted:
                os.rename(old, gone)  # a kill never leaves a half-deleted step-* behind
                shutil.rmtree(gone, ignore_errors=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, torch and the OS raise many different types
        full = _disk_full(e, ckpt_root)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure(e, full, final, ckpt_root)) from None
    accelerator.wait_for_everyone()
    return final


def _sha256(f: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """manifest.json: the sha256 of every file of the (still unnamed) checkpoint directory."""
    files = sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != MANIFEST)
    sums = {f.relative_to(ckpt).as_posix(): _sha256(f) for f in files}
    write_atomic(ckpt / MANIFEST, json.dumps({"sha256": sums}, indent=1))


def check_manifest(ckpt: Path) -> str | None:
    """What is wrong with the files of `ckpt` by its manifest (None: nothing, or no manifest: a
    checkpoint written before manifests existed)."""
    if not (ckpt / MANIFEST).exists():
        return None
    try:
        sums = json.loads((ckpt / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for name, digest in sums.items():
        f = ckpt / name
        try:
            if _sha256(f) != digest:
                return f"file '{f}' is damaged (its sha256 differs from the one written with it)"
        except OSError as e:
            return f"file '{f}' is unreadable ({e.strerror or type(e).__name__})"
    return None


def unsound_flag(tensors):
    """A 0-dim bool tensor, left on the tensors' device: whether any floating-point tensor holds
    a NaN, an infinity or a value beyond SOUND_LIMIT (None where there is none to look at)."""
    import torch

    floats = [t.detach() for t in tensors
              if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not floats:
        return None
    # the largest magnitude of each tensor, fused (no |t| copy of the state); NaN stays NaN
    peaks = torch._foreach_norm(floats, ord=float("inf"))
    return ~(torch.stack([p.float().to(peaks[0].device) for p in peaks]).max() <= SOUND_LIMIT)


def unsound(tensors) -> bool:
    """`unsound_flag` read back: one read from the device, whatever the number of tensors."""
    flag = unsound_flag(tensors)
    return flag is not None and bool(flag)


def training_state(model, optimizer) -> list:
    """The tensors a checkpoint of `model` and `optimizer` holds: parameters, buffers (BN
    statistics) and the optimizer's state (momentum)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    return [*model.parameters(), *model.buffers(),
            *[t for s in opt.state.values() for t in s.values()]]


def unsound_names(state: dict) -> list[str]:
    return [k for k, t in state.items() if unsound([t])]


def verify_checkpoint(ckpt: Path) -> dict:
    """The model weights of `ckpt` once its files match its manifest and the weights are sound;
    else a one-line CheckpointError naming the file."""
    problem = check_manifest(ckpt)
    if problem is None:
        state = load_model_weights(ckpt)
        bad = unsound_names(state)
        if not bad:
            return state
        problem = (f"{len(bad)} of its {len(state)} weight tensors hold NaN, infinite or "
                   f"astronomically large values (e.g. '{bad[0]}'): it was written by a diverged "
                   f"run")
    raise CheckpointError(f"checkpoint '{ckpt}' is unusable: {problem}: pass another checkpoint")


def newest_sound_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `ckpt_root` that verifies (None where there is no
    checkpoint at all) and why each newer one was passed over; raises where none verifies."""
    first = latest_checkpoint(ckpt_root)
    if first is None:
        return None, []
    candidates = [first, *[d for _, d in reversed(step_dirs(first.parent))
                           if d != first and _step(d) < _step(first) and _complete(d)]]
    passed = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
            return ckpt, passed
        except CheckpointError as e:
            passed.append(str(e).removesuffix(": pass another checkpoint"))
    raise CheckpointError(f"no checkpoint under '{ckpt_root}' verifies ({passed[0]}): pass "
                          f"another checkpoint with --resume, or --overwrite to start afresh")


def last_sound_checkpoint(ckpt_root: Path) -> Path | None:
    try:
        return newest_sound_checkpoint(ckpt_root)[0]
    except CheckpointError:
        return None


def _step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[1])


def _disk_full(e: Exception, ckpt_root: Path) -> bool:
    """ENOSPC by errno or in the message (safetensors, torch's zip writer), or under 1 MiB free."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(s in str(e) for s in ("No space left", "StorageFull", "Disk quota")):
        return True
    try:
        st = os.statvfs(ckpt_root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _save_failure(e: Exception, full: bool, final: Path, ckpt_root: Path) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = "the disk is full" if full else f"{type(e).__name__}: {text[:160]}"
    prev = latest_checkpoint_or_none(ckpt_root)
    kept = f"'{prev}' is intact" if prev is not None else "there is no earlier one"
    fix = "free disk space" if full else "fix the cause"
    return (f"could not write checkpoint '{final}' ({reason}); the last checkpoint {kept}: "
            f"{fix}, then continue with --resume")


def _fsync_files(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _move_into_place(tmp: Path, final: Path, step: int) -> None:
    """Rename the complete `tmp` to `final`; an existing `final` is deleted only afterwards."""
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):  # `tmp` now holds the old checkpoint
        fault_point("resave-swapped", step)
        shutil.rmtree(tmp)
    else:
        aside = final.with_name(f".old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)
        fault_point("resave-swapped", step)
        shutil.rmtree(aside)
    fsync_dir(final.parent)


def _restore_set_aside(ckpt_root: Path) -> None:
    """A re-save killed between its two renames (systems without an atomic exchange) leaves the
    old checkpoint at .old-step-N and no step-N: rename it back; delete it where step-N exists."""
    for old in ckpt_root.glob(".old-step-*"):
        final = old.with_name(old.name.removeprefix(".old-"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, or the newest complete checkpoint (highest step) of
    a checkpoints/ folder or a run directory."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file() or step_dirs(root):
            named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
            complete = [d for _, d in step_dirs(root) if _complete(d)]
            for old in root.glob(".old-step-*"):  # see _restore_set_aside
                name = old.name.removeprefix(".old-")
                if _STEP_DIR.fullmatch(name) and not (root / name).exists() and _complete(old):
                    complete.append(old)
            complete.sort(key=lambda d: int(d.name.rsplit("-", 1)[1]))
            if complete:
                return complete[-1]
            raise CheckpointError(
                f"no complete checkpoint under '{root}' (`latest` names {named or 'nothing'}, "
                f"no step-* directory holds a readable {TRAINER_STATE}): pass another "
                f"checkpoint with --resume, or --overwrite to start afresh"
            )
    if not (p / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"no readable checkpoint at '{path}' ({TRAINER_STATE} missing): pass a run directory, "
            f"its checkpoints/ folder or a step-* directory written by train.pretrain"
        )
    return p


def _complete(ckpt: Path) -> bool:
    try:
        json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return (ckpt / "config.yaml").is_file()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from: None only where `ckpt_root` holds no checkpoint at all
    (neither `latest` nor a step-* directory); one that holds only broken ones raises."""
    root = Path(ckpt_root)
    if not (root / LATEST).is_file() and not step_dirs(root):
        return None
    return resolve_checkpoint(root)


def latest_checkpoint_or_none(ckpt_root: Path) -> Path | None:
    try:
        return latest_checkpoint(ckpt_root)
    except CheckpointError:
        return None


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}' is unreadable ({e}): pass another with "
                              f"--resume, or start afresh with --overwrite") from None


def load_model_weights(ckpt: Path) -> dict:
    """The model state dict of a checkpoint, without loading optimizer or RNG state."""
    files = sorted(ckpt.glob("model*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"checkpoint '{ckpt}' holds no model weights: pass another "
                              f"checkpoint")
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
        raise CheckpointError(f"checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {e}): "
                              f"pass another checkpoint") from None
    return state


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory that owns a step-* checkpoint (<run>/checkpoints/step-*), or None."""
    run_dir = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        return run_dir
    return None


def run_output(ckpt: Path, name: str) -> Path:
    """Where a tool writes `name` for a checkpoint by default: <run dir>/<name> when the
    checkpoint is inside a run's checkpoints/ folder, else <step dir>.<name> beside it."""
    run_dir = run_dir_of(ckpt)
    return ckpt.parent / f"{ckpt.name}.{name}" if run_dir is None else run_dir / name


def load_pretrained(path: str | Path):
    """(checkpoint, config, SimCLR model) of a run directory, checkpoints/ folder or step-*
    checkpoint: the model built from the checkpoint's own config and its trained weights, on the
    CPU. The one way every after-pretraining tool (linear evaluation, fine-tuning, export,
    embeddings, benchmarks) gets a trained encoder; a checkpoint that fails `verify_checkpoint`
    is refused in one line."""
    from model.simclr import build_simclr
    from train.config import build_config, load_yaml

    ckpt = resolve_checkpoint(path)
    state = verify_checkpoint(ckpt)  # damaged files and a diverged run's weights are refused
    cfg = build_config(load_yaml(ckpt / "config.yaml"))
    model = build_simclr(cfg.model)
    # DDP and torch.compile prefixes, in case a checkpoint kept a wrapper's names
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint '{ckpt}' does not match its config "
                              f"({str(e).splitlines()[0]}): pass another checkpoint") from None
    return ckpt, cfg, model
