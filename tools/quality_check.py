"""gpu_check's quality step: Fashion-MNIST from its four .gz files to a linear evaluation, and what
follows pretraining, on one device within a time limit.

    python -m tools.quality_check --data DIR --time-limit 205 --json quality.json
    python -m tools.quality_check --device cpu --quick --data DIR --time-limit 120

Converts --data into OUT/fashion-mnist, pretrains train/configs/fashion_mnist_gpu.yaml for what
the limit leaves once the reserve for the rest is set aside (OUT/quality-run; DALI when it
imports, else torchvision), evaluates it linearly beside raw pixels, fine-tunes it on 1% of the
labels beside from scratch (OUT/quality-finetune) and embeds the test split with a
nearest-neighbour query (OUT/quality-embed). The JSON holds the figures; `headline(result)` is
gpu_check's line for them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tools.benchmark import json_safe, try_import
from train.atomic import write_atomic
from train.cli import above, at_least, writable_file

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "train" / "configs" / "fashion_mnist_gpu.yaml"
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.quality_check",
        description="Convert Fashion-MNIST, pretrain the GPU recipe for what --time-limit leaves, "
                    "evaluate linearly, fine-tune on 1% of the labels and embed the test split; "
                    "write the figures as JSON (gpu_check's quality step).")
    p.add_argument("--data", type=Path, required=True,
                   help="folder with the four Fashion-MNIST .gz files")
    p.add_argument("--time-limit", type=above(0.0), required=True, metavar="S",
                   help="seconds for the whole run: pretraining gets what the rest leaves")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--quick", action="store_true",
                   help="a toy network and batch, 5 s of pretraining: checks the path only")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                   help="folder for the dataset and the runs (default runs/gpu-check)")
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="loader workers (default: every CPU core, at most 16)")
    p.add_argument("--json", type=writable_file, default=None,
                   help="write the results here (default: OUT/quality.json)")
    return p


def default_data() -> Path | None:
    """$SIMCLR_DATA, the folder tools/setup.sh found, or /usr/share/datasets/fashion-mnist: the
    first that holds the four files."""
    recorded = ROOT / "data" / ".fashion-mnist-path"
    recorded = recorded.read_text().strip() if recorded.is_file() else None
    for cand in (os.environ.get("SIMCLR_DATA"), recorded, "/usr/share/datasets/fashion-mnist"):
        if cand and has_fashion_mnist(Path(cand)):
            return Path(cand)
    return None


def has_fashion_mnist(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FMNIST_FILES)


def _pretrain_overrides(args, run_dir: Path, data_dir: Path, budget: float) -> list[str]:
    workers = args.workers or min(16, os.cpu_count() or 1)
    overrides = [f"--train.out_dir={run_dir}", f"--data.path={data_dir}",
                 f"--train.time_budget_s={budget:.0f}", f"--data.num_workers={workers}",
                 "--train.knn_every=-1", "--train.checkpoint_every=0"]
    # The recipe's DALI when it imports, else the torchvision reference loader.
    overrides.append("--data.backend="
                     + ("dali" if try_import("nvidia.dali")["ok"] else "torchvision"))
    if args.quick:  # a toy network and batch: this checks the path, not the accuracy
        overrides += ["--model.width=0.125", "--model.head_out=16", "--data.batch_size=64",
                      "--optim.epochs=1", "--optim.warmup_epochs=0.1", "--train.log_every=5"]
    if args.device == "cpu":
        overrides.append("--train.mixed_precision=fp32")
    return overrides


def quality(args) -> dict:
    """Convert Fashion-MNIST, pretrain for what the limit leaves, evaluate; the results as a
    dict."""
    t0 = time.perf_counter()
    out = args.out.resolve()
    data_dir, run_dir = out / "fashion-mnist", out / "quality-run"
    from tools.convert import main as convert_main

    if convert_main([str(args.data), str(data_dir), "--overwrite"]) != 0:
        raise SystemExit("quality: converting --data failed (see the log above)")
    t_convert = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)

    # Linear evaluation, fine-tuning, embeddings and process start-ups need time too: the rest
    # goes to pretraining.
    reserve = 105.0 if args.device == "cuda" else 80.0
    budget = max(10.0, args.time_limit - t_convert - reserve - 10.0)
    if args.quick:  # about 30 steps: the plan is fixed at step 30 (see train.time_budget_s)
        budget = min(budget, 5.0)
    overrides = _pretrain_overrides(args, run_dir, data_dir, budget)
    from train.pretrain import main as pretrain_main

    print(f"[quality] pretraining for {budget:.0f} s: {RECIPE} {' '.join(overrides)}", flush=True)
    if pretrain_main(["--config", str(RECIPE), *overrides]) != 0:
        raise SystemExit("quality: pretraining failed (see the log above)")
    t_pretrain = time.perf_counter() - t0 - t_convert

    from train.linear_eval import main as eval_main

    eval_json = out / "quality-linear-eval.json"
    eval_args = ["--checkpoint", str(run_dir), "--json", str(eval_json), "--device", args.device]
    if args.quick:
        eval_args += ["--train-samples", "2000", "--eval-samples", "1000"]
    if eval_main(eval_args) != 0:
        raise SystemExit("quality: linear evaluation failed (see the log above)")
    ev = json.loads(eval_json.read_text())
    t_eval = time.perf_counter() - t0 - t_convert - t_pretrain
    after = after_pretraining(args, run_dir, data_dir, out)
    return {"encoder_top1": ev["encoder"]["top1"], "encoder_top5": ev["encoder"]["top5"],
            "raw_pixels_top1": ev.get("raw_pixels", {}).get("top1"),
            "train_count": ev["train_count"], "eval_count": ev["eval_count"],
            "pretraining": ev.get("pretraining"), "recipe": str(RECIPE), "overrides": overrides,
            "time_budget_s": budget, **after,
            "seconds": {"convert": t_convert, "pretrain": t_pretrain, "evaluate": t_eval,
                        "after": time.perf_counter() - t0 - t_convert - t_pretrain - t_eval}}


def after_pretraining(args, run_dir: Path, data_dir: Path, out: Path) -> dict:
    """train.finetune on 1% of the labels and tools.embed of the test split with a query, each
    in its own process (each builds its own Accelerator / device state), on this device."""
    ft_dir, prefix = out / "quality-finetune", out / "quality-embed" / "test"
    shutil.rmtree(ft_dir, ignore_errors=True)
    ft = [sys.executable, "-m", "train.finetune", "--checkpoint", str(run_dir), "--labels", "0.01",
          "--out", str(ft_dir)]
    if args.quick:
        # three epochs of the 600 labelled images: after one (18 steps) the head of a 33-step toy
        # encoder can still sit at chance (loss ln 10), which is not the path under test
        ft += ["--epochs", "3", "--min-steps", "0", "--batch-size", "64", "--no-scratch"]
    embed = [sys.executable, "-m", "tools.embed", "--checkpoint", str(run_dir), str(data_dir),
             "--split", "test", "--out", str(prefix), "--device", args.device,
             "--query", "test/0", "--k", "5"]
    for what, cmd in (("fine-tuning", ft), ("embeddings", embed)):
        print(f"[quality] {what}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            raise SystemExit(f"quality: {what} failed (see the log above)")
    r = json.loads((ft_dir / "finetune.json").read_text())
    emb = json.loads(prefix.with_name(prefix.name + ".json").read_text())
    hits = json.loads(prefix.with_name(prefix.name + ".query.json").read_text())
    return {"finetune_1pct_top1": r["pretrained"]["top1"],
            "finetune_1pct_scratch_top1": r.get("scratch", {}).get("top1"),
            "finetune_images_per_s": r["pretrained"]["images_per_s"],
            "embed_images_per_s": emb.get("images_per_s"), "embed_count": emb.get("count"),
            "embed_query": hits}


def headline(result: dict) -> str:
    """gpu_check's line: linear top-1 beside raw pixels, the pretraining behind it, and 1%-label
    fine-tuning beside from scratch. KeyError for a key the results lack (raw pixels, the
    pretraining summary and the scratch run may be null)."""
    text = f"linear top-1 {100 * result['encoder_top1']:.2f}%"
    raw = result["raw_pixels_top1"]
    if raw is not None:
        text += f" (raw pixels {100 * raw:.2f}%)"
    p = result["pretraining"]
    if p:
        text += (f" after {p['wall_s']:.0f} s, {p['epochs']:.1f} epochs at "
                 f"{p['images_per_s']:.0f} img/s")
    text += f"; 1% labels fine-tuned {100 * result['finetune_1pct_top1']:.2f}%"
    scratch = result["finetune_1pct_scratch_top1"]
    return text + (f" (scratch {100 * scratch:.2f}%)" if scratch is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not has_fashion_mnist(args.data):
        print(f"quality_check: error: --data '{args.data}' lacks the Fashion-MNIST files "
              f"({', '.join(FMNIST_FILES)})", file=sys.stderr)
        return 2
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    result = quality(args)
    path = args.json or args.out / "quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(json_safe(result), indent=1) + "\n")
    print(f"[quality] {headline(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
