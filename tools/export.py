"""Export a pretrained encoder as plain weights that torchvision's ResNet loads.

    python -m tools.export --checkpoint runs/fashion-mnist-demo [--out DIR] [--overwrite]
        [--classifier FINETUNE_DIR]

Writes encoder.safetensors, encoder.pt (the same dict of tensors, for
torch.load(weights_only=True)) and encoder.json (architecture, input size, normalisation, the
evaluation view in words, sha256 of each weights file, the full training config, and `load`: the
Python lines that build the matching torchvision model and load the weights with strict=True).
The parameter names are torchvision's: the encoder is torchvision's ResNet without its classifier.
Default folder: <run dir>/export/, or <step dir>.export/ beside a checkpoint outside a run's
checkpoints/ folder. With --classifier, a network fine-tuned by train.finetune (its
model.safetensors) is exported instead, its classifier as `fc`, so it loads strictly into
torchvision.models.resnetXX(num_classes=K). A width other than 1 has no torchvision counterpart
(torchvision's wide_resnet widens only the bottleneck): it is exported with load lines that build
this repository's model.encoder.ResNetEncoder.
One export at a time writes a folder: another one into it is refused in one line naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from model.encoder import ResNetEncoder, set_stem
from pipelines.eval_view import describe_eval_view
from pipelines.sources import show_path
from train.atomic import replace_dir, temp_name, write_atomic
from train.checkpoint import CheckpointError, load_pretrained, read_trainer_state, run_output
from train.cli import add_checkpoint
from train.commands import print_report, run_command
from train.config import ConfigError, config_to_dict
from train.lock import acquire, lock_beside, released_on_return

WEIGHTS = ("encoder.safetensors", "encoder.pt")
META = "encoder.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export",
                                description=__doc__.split("\n\n")[0])
    add_checkpoint(p)
    p.add_argument("--out", default=None,
                   help="folder to write (default: <run dir>/export, or <step dir>.export for a "
                   "checkpoint outside a run directory)")
    p.add_argument("--classifier", default=None, metavar="DIR_OR_FILE",
                   help="a fine-tuned network (train.finetune's output folder or its "
                   "model.safetensors): export its encoder and classifier (fc) instead")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export in the --out folder (refused while it holds "
                   "files no export wrote)")
    return p


def export_dir(ckpt: Path, out_arg: str | None) -> Path:
    return Path(out_arg) if out_arg else run_output(ckpt, "export")


def torchvision_model(meta: dict) -> nn.Module:
    """The network encoder.json describes, untrained: torchvision's ResNet with the stem and
    classifier set as exported (the same network as the `load` lines build); for a width
    torchvision lacks, this repository's ResNetEncoder (a subclass of torchvision's ResNet)."""
    import torchvision

    classes = meta.get("num_classes")
    if not meta["torchvision_loadable"]:
        m = ResNetEncoder(meta["arch"], width=meta["width"], small_stem=meta["small_stem"],
                          stem_pool=meta["stem_pool"])
        if classes:
            m.fc = nn.Linear(meta["feature_dim"], classes)
        return m
    m = getattr(torchvision.models, meta["arch"])(**({"num_classes": classes} if classes else {}))
    if not classes:
        m.fc = nn.Identity()
    if meta["small_stem"]:
        set_stem(m, m.conv1.out_channels, small_stem=True, stem_pool=meta["stem_pool"])
    return m


def _small_stem_lines(meta: dict) -> list[str]:
    """The lines that give torchvision's network (conv1: 64 channels) the small stem, written
    from the modules `model.encoder.set_stem` builds for it."""
    stem = nn.Module()
    set_stem(stem, 64, small_stem=True, stem_pool=meta["stem_pool"])
    c = stem.conv1
    lines = [f"m.conv1 = torch.nn.Conv2d({c.in_channels}, {c.out_channels}, {c.kernel_size[0]}, "
             f"{c.stride[0]}, {c.padding[0]}, bias={c.bias is not None})"]
    if isinstance(stem.maxpool, nn.Identity):
        lines.append("m.maxpool = torch.nn.Identity()")
    return lines


def load_lines(meta: dict, folder: Path) -> str:
    """Python that builds `torchvision_model(meta)` and loads the exported weights strictly."""
    classes = meta.get("num_classes")
    lines = ["import safetensors.torch", "import torch"]
    if meta["torchvision_loadable"]:
        lines += ["import torchvision",
                  f"m = torchvision.models.{meta['arch']}("
                  f"{f'num_classes={classes}' if classes else ''})"]
        if not classes:
            lines.append("m.fc = torch.nn.Identity()")
        if meta["small_stem"]:
            lines += _small_stem_lines(meta)
    else:
        lines += ["from model.encoder import ResNetEncoder  # simclr-fast's encoder",
                  f"m = ResNetEncoder({meta['arch']!r}, width={meta['width']!r}, "
                  f"small_stem={meta['small_stem']!r}, stem_pool={meta['stem_pool']!r})"]
        if classes:
            lines.append(f"m.fc = torch.nn.Linear({meta['feature_dim']}, {classes})")
    weights = str(folder.resolve() / WEIGHTS[0])
    lines += [f"m.load_state_dict(safetensors.torch.load_file({weights!r}), strict=True)",
              "m.eval()"]
    return "\n".join(lines)


def read_classifier(path: str, arch: dict) -> tuple[dict, list | None]:
    """(state dict in torchvision's names with fc, class names) of a fine-tuned network."""
    from safetensors.torch import load_file

    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    if not file.is_file():
        raise CheckpointError(f"no fine-tuned network at '{show_path(file)}': pass "
                              f"train.finetune's output folder or its model.safetensors")
    try:
        state = load_file(str(file))
    except Exception as e:  # corrupt files raise many different types
        raise CheckpointError(f"'{show_path(file)}' is unreadable ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}): pass another --classifier") from None
    info_file = file.parent / "finetune.json"
    info = {}
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"'{show_path(info_file)}' is unreadable ({e}): pass another "
                                  f"--classifier") from None
    for key, want in arch.items():
        if key in info and info[key] != want:
            raise CheckpointError(f"--classifier was fine-tuned from {key} {info[key]!r}, the "
                                  f"checkpoint has {want!r}: pass the checkpoint it was "
                                  f"fine-tuned from")
    if "fc.weight" not in state or "fc.bias" not in state:
        raise CheckpointError(f"'{show_path(file)}' holds no fc.weight/fc.bias: pass a network "
                              f"written by train.finetune")
    weights = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    weights.update({k: state[k] for k in ("fc.weight", "fc.bias")})
    return weights, info.get("classes")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@released_on_return  # the lock of --out
def export(args) -> tuple[Path, dict]:
    ckpt, cfg, model = load_pretrained(args.checkpoint)
    out = export_dir(ckpt, args.out)
    _check_target(out, args.overwrite)
    acquire(lock_beside(out), f"--out '{show_path(out)}'",
            "wait for that command to end, or pass another --out").until_return()
    encoder = model.encoder
    meta = {
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "small_stem": cfg.model.small_stem,
        "stem_pool": isinstance(encoder.maxpool, nn.MaxPool2d),
        "feature_dim": encoder.feat_dim,
        "torchvision_loadable": cfg.model.width == 1.0,
    }
    state = encoder.state_dict()
    if args.classifier:
        state, classes = read_classifier(args.classifier, {k: meta[k] for k in
                                                           ("arch", "width", "small_stem")})
        meta["num_classes"] = int(state["fc.weight"].shape[0])
        if classes is not None:
            meta["classes"] = list(classes)
    # checked here, not at the reader's load: a mismatch is this command's one-line error
    try:
        torchvision_model(meta).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"--classifier does not fit the checkpoint's encoder "
                              f"({str(e).splitlines()[0]}): pass the checkpoint it was "
                              f"fine-tuned from") from None
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    spec = cfg.augment
    from safetensors.torch import save as st_save

    buf = io.BytesIO()
    torch.save(state, buf)
    blobs = {WEIGHTS[0]: st_save(state), WEIGHTS[1]: buf.getvalue()}
    meta.update({
        "input_size": spec.size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "eval_transform": describe_eval_view(spec),
        "checkpoint": str(ckpt.resolve()),
        "step": read_trainer_state(ckpt).get("step"),
        "classifier": str(Path(args.classifier).resolve()) if args.classifier else None,
        "sha256": {name: _sha256(data) for name, data in blobs.items()},
        "torch": torch.__version__,
        "config": config_to_dict(cfg),
    })
    meta["load"] = load_lines(meta, out)
    blobs[META] = json.dumps(meta, indent=1).encode()
    _write_folder(out, blobs, args.overwrite)
    if not meta["torchvision_loadable"]:
        print(f"export: warning: width {cfg.model.width:g} has no torchvision network (its "
              f"wide_resnet widens only the bottleneck): the load lines build "
              f"model.encoder.ResNetEncoder of this repository", file=sys.stderr)
    _print_summary(out, blobs, meta)
    return out, meta


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing --out, and with --overwrite anything but an export, or an export that
    also holds files it did not write (never rmtree a folder or a file the user put there)."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"'{show_path(out)}' already exists: pass --overwrite to replace it, "
                          f"or another --out")
    if out.is_symlink() or not (out / META).is_file():
        raise ConfigError(f"'{show_path(out)}' exists and is not an export (no {META}): pass "
                          f"another --out")
    try:  # the files the earlier export wrote: its metadata and what it lists checksums of
        written = {META, *json.loads((out / META).read_text())["sha256"]}
    except (OSError, ValueError, KeyError, TypeError):
        written = {META, *WEIGHTS}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
    if foreign:
        raise ConfigError(f"'{show_path(out)}' also holds files no export wrote "
                          f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}), "
                          f"which --overwrite would delete: move them out, or pass another --out")


def _write_folder(out: Path, blobs: dict[str, bytes], overwrite: bool) -> None:
    """All files into a temp folder beside `out`, then renamed into place: readers see the old
    export or the new one, never a mix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    os.mkdir(tmp)
    try:
        for name, data in blobs.items():
            write_atomic(tmp / name, data)
        _check_target(out, overwrite)  # again: another export may have finished meanwhile
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _print_summary(out: Path, blobs: dict[str, bytes], meta: dict) -> None:
    from rich.table import Table

    what = f"{meta['arch']} x{meta['width']:g}" + (
        f", classifier of {meta['num_classes']} classes" if meta.get("num_classes") else "")
    t = Table(title=f"Export of step {meta['step']} ({what})")
    for col, just in (("file", "left"), ("size", "right"), ("sha256", "left")):
        t.add_column(col, justify=just)
    for name, data in blobs.items():
        size = len(data)
        shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        t.add_row(name, shown, _sha256(data)[:12])
    print_report([t], ["load it with:", meta["load"], f"export: {out}"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("export", lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
