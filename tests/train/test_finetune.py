"""Semi-supervised fine-tuning and transfer (train.finetune): the labelled subset, the frozen
linear mode, and the command on real checkpoints, against the saved network evaluated by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.sources import Split
from tests.fashion_mnist import REPO
from tests.marks import multi
from tests.processes import accelerate_launch, main_here
from train.config import ConfigError
from train.finetune import Classifier, balanced_subset, labels_text, read_label_file

PY = sys.executable
QUICK = ["--min-steps", "0", "--batch-size", "32"]
SUBPROCESS = pytest.mark.slow(reason="fine-tunes in a subprocess")
TRAINS = pytest.mark.slow(reason="fine-tunes for a few steps (in this process)")


@pytest.fixture(scope="module")
def dataset(tiny_data) -> Path:
    return tiny_data  # 400 train / 200 test


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """The shared tiny run (3 steps), copied: fine-tuning writes into RUN/finetune/."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("pre") / "run"))


def finetune(*args, launcher=(PY, "-m", "train.finetune"), check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def finetune_here(*args) -> None:
    """train.finetune's main() in this process (`main_here`)."""
    from train.finetune import main

    assert main_here(main, args) == 0


def saved_network(out: Path, cfg_model, classes: int) -> Classifier:
    from safetensors.torch import load_file

    from model.simclr import build_simclr

    net = Classifier(build_simclr(cfg_model).encoder, classes)
    net.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    return net.eval()


@torch.no_grad()
def accuracy_by_hand(net: Classifier, dataset: Path, spec) -> float:
    """Top-1 of a network on the whole test split, one image at a time through the reference's
    evaluation transform (no batching, no strides, no reduction)."""
    from pipelines.eval_view import eval_transform, load_image
    from pipelines.sources import open_dataset

    split = open_dataset(dataset).split("test")
    transform = eval_transform(spec)
    hits = 0
    for i in range(len(split)):
        x = transform(load_image(split, i))[None]
        hits += int(net(x).argmax(1).item() == split.labels[i])
    return hits / len(split)


# ---------------------------------------------------------------- the labelled subset


def test_balanced_subset_takes_the_same_count_of_every_class_seeded():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)
    idx = balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx], minlength=10).tolist() == [10] * 10
    assert len(np.unique(idx)) == len(idx) and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 0.1, seed=4))
    # 1% of 1000 images is one per class; a rare class gives all it has; unlabelled never drawn
    labels[:5] = -1
    labels[labels == 9] = 8
    labels[np.flatnonzero(labels == 8)[:3]] = 9
    small = balanced_subset(labels, 0.05, seed=0)
    counts = np.bincount(labels[small], minlength=10)
    assert (labels[small] >= 0).all() and counts[9] == 3 and set(counts[:8]) == {5}
    assert np.array_equal(balanced_subset(labels, 1.0, seed=0), np.flatnonzero(labels >= 0))


def test_labels_file_round_trips_and_bad_files_are_one_line_errors(tmp_path):
    split = Split("train", labels=np.array([0, 1, 2, -1, 1, 0], dtype=np.int64))
    path = tmp_path / "l.txt"
    path.write_text(labels_text(np.array([0, 2, 5]), "three images") + "\n  4  # a comment\n")
    assert read_label_file(path, split).tolist() == [0, 2, 4, 5]
    for text, needle in [("0\nx1\n", "line 2: 'x1' is not an index"), ("# none\n", "no index"),
                         ("6\n", "index 6, but split 'train' has 6 images"),
                         ("1\n1\n", "twice"), ("3\n", "unlabelled")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle) as e:
            read_label_file(path, split)
        assert "\n" not in str(e.value)


def test_linear_mode_trains_only_the_linear_layer():
    from accelerate import Accelerator

    from model.encoder import ResNetEncoder
    from train.finetune import train_classifier
    from train.schedule import lr_schedule

    class Loader:  # two small batches of random "views"
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.batches = [(torch.randn(4, 3, 16, 16, generator=g),
                             torch.randn(4, 3, 16, 16, generator=g),
                             torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]

        def set_epoch(self, e):
            pass

        def __iter__(self):
            from pipelines.spec import TwoViewBatch

            for v1, v2, y in self.batches:
                yield TwoViewBatch(v1, v2, y, torch.arange(4))

    acc = Accelerator(cpu=True)
    for mode, frozen in (("linear", True), ("finetune", False)):
        torch.manual_seed(0)
        net = Classifier(ResNetEncoder("resnet18", width=0.125, small_stem=True), 3, frozen)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        train_classifier(acc, net, Loader(), lr_schedule(0.1, 4, 0), None)
        changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
        enc = {k for k in changed if k.startswith("encoder.")}
        assert {"fc.weight", "fc.bias"} <= changed, mode
        if frozen:  # neither weights nor BatchNorm statistics move
            assert not enc
        else:
            assert any(k.endswith("running_mean") for k in enc)
            assert any(k.endswith("conv1.weight") for k in enc)


# ---------------------------------------------------------------- the command


@SUBPROCESS
@pytest.mark.timeout(600)
def test_finetune_command_reports_what_its_saved_network_scores(run_dir, dataset, tmp_path):
    from train.checkpoint import load_pretrained

    _, cfg, _ = load_pretrained(run_dir)
    proc = finetune("--checkpoint", run_dir, "--labels", "0.1", "--epochs", "4", *QUICK)
    out = run_dir / "finetune" / "finetune-10pct"
    r = json.loads((out / "finetune.json").read_text())
    labels = np.load(dataset / "train_labels.npy")
    chosen = read_label_file(out / "labels.txt", Split("train", labels))
    assert np.array_equal(chosen, balanced_subset(labels, 0.1, cfg.train.seed))
    assert r["labelled"] == len(chosen) == 40 and r["label_fraction"] == 0.1
    s = r["settings"]
    # the paper's protocol: Nesterov 0.9, LR 0.05 x B/256, no warm-up, no weight decay
    assert (s["momentum"], s["nesterov"], s["weight_decay"], s["warmup_steps"]) == (0.9, True, 0, 0)
    assert s["batch_views"] == 32 and s["lr"] == pytest.approx(0.05 * 32 / 256)
    assert s["steps"] == 4 * (40 // 16) and s["augment"]["jitter_p"] == 0 == s["augment"]["blur_p"]
    for name in ("pretrained", "scratch"):
        m = r[name]
        assert 0 <= m["top1"] <= m["top5"] <= 1 and len(m["loss_by_epoch"]) == 4
    assert r["pretrained"] != r["scratch"]
    net = saved_network(out, cfg.model, 10)
    assert accuracy_by_hand(net, dataset, cfg.augment) == pytest.approx(r["pretrained"]["top1"])
    for row in ("SimCLR pretrained", "from scratch (baseline)"):
        assert row in proc.stdout

    # tools.export --classifier turns the saved network into one model with its classifier
    from safetensors.torch import load_file

    from tools.export import main as export
    from tools.export import torchvision_model

    assert export(["--checkpoint", str(run_dir), "--classifier", str(out),
                   "--out", str(tmp_path / "export")]) == 0
    meta = json.loads((tmp_path / "export" / "encoder.json").read_text())
    model = torchvision_model(meta).eval()
    model.load_state_dict(load_file(str(tmp_path / "export" / "encoder.safetensors")), strict=True)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-5)

    # the written labels file chooses the same images again
    again = tmp_path / "again"
    finetune_here("--checkpoint", run_dir, "--labels", out / "labels.txt", "--epochs", "1",
                  "--no-scratch", "--out", again, *QUICK)
    r2 = json.loads((again / "finetune.json").read_text())
    assert r2["labelled"] == 40 and r2["label_fraction"] is None and "scratch" not in r2
    assert np.array_equal(read_label_file(again / "labels.txt", Split("train", labels)), chosen)


@multi
@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one_process(run_dir, dataset, tmp_path):
    """16 labelled images, 16 per step: one step per epoch. Both processes together see the same
    global batch as one process (shards and per-sample seeds) with global BatchNorm, so after two
    steps the linear layer and the losses agree to float rounding, and the accuracy each
    process's stride adds up to is that of the saved network."""
    labels = tmp_path / "sixteen.txt"
    labels.write_text("".join(f"{i}\n" for i in range(0, 160, 10)))
    common = ["--checkpoint", run_dir, "--labels", labels, "--epochs", "2", "--no-scratch",
              "--min-steps", "0", "--batch-size", "32", "--backend", "torchvision"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(*common, "--out", one)
    finetune(*common, "--out", two,
             launcher=accelerate_launch("train.finetune"))
    r1, r2 = (json.loads((d / "finetune.json").read_text()) for d in (one, two))
    assert (r1["settings"]["processes"], r2["settings"]["processes"]) == (1, 2)
    assert r1["settings"]["steps"] == r2["settings"]["steps"] == 2
    l1 = [e["loss"] for e in r1["pretrained"]["loss_by_epoch"]]
    l2 = [e["loss"] for e in r2["pretrained"]["loss_by_epoch"]]
    assert l1[0] == pytest.approx(np.log(10), rel=1e-6)  # a zero-initialised linear layer
    assert l2 == pytest.approx(l1, rel=1e-4)
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (one, two))
    torch.testing.assert_close(w2["fc.weight"], w1["fc.weight"], rtol=1e-3, atol=1e-5)
    from train.checkpoint import load_pretrained

    cfg = load_pretrained(run_dir)[1]
    net = saved_network(two, cfg.model, 10)
    assert accuracy_by_hand(net, dataset, cfg.augment) == pytest.approx(r2["pretrained"]["top1"])


@TRAINS
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_finetune_runs_with_each_fast_loader(backend, run_dir, tmp_path):
    """(The shared dataset has its train.beton where FFCV imports.)"""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    finetune_here("--checkpoint", run_dir, "--labels", "0.1", "--epochs", "1", "--no-scratch",
                  "--backend", backend, "--out", tmp_path, *QUICK)
    r = json.loads((tmp_path / "finetune.json").read_text())
    assert r["settings"]["backend"] == backend and r["settings"]["steps"] == 2
    assert all(0 < e["loss"] < 20 for e in r["pretrained"]["loss_by_epoch"])


@TRAINS
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_transfer_to_an_image_folder_with_other_classes(mode, run_dir, tmp_path):
    """--data elsewhere: a folder of JPEGs with three classes of its own and another image size."""
    from PIL import Image

    from pipelines.dataset_writer import convert

    rng = np.random.default_rng(0)
    src = tmp_path / "folder"
    for split in ("train", "val"):
        for c, (lo, hi) in enumerate([(0, 80), (90, 170), (180, 255)]):
            (src / split / f"class{c}").mkdir(parents=True)
            for i in range(12 if split == "train" else 6):
                px = rng.integers(lo, hi, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(px).save(src / split / f"class{c}" / f"{i}.jpg", quality=95)
    data = tmp_path / "converted"
    convert(src, data, fmt="folder", name="bands", workers=1)
    finetune_here("--checkpoint", run_dir, "--data", data, "--labels", "1", "--mode", mode,
                  "--eval-split", "val", "--epochs", "3", *QUICK)
    out = run_dir / "finetune" / f"{mode}-100pct-converted"
    r = json.loads((out / "finetune.json").read_text())
    assert r["transfer"] and r["num_classes"] == 3 and r["labelled"] == 36 and r["mode"] == mode
    assert r["eval_count"] == 18 and 0 <= r["pretrained"]["top1"] <= 1
    assert r["classes"] == ["class0", "class1", "class2"]


def test_bad_arguments_are_one_line_errors(tiny_run, tmp_path, capsys):
    """main() in this process for each, and the command itself once."""
    from pipelines.sources import open_dataset
    from train.checkpoint import load_pretrained
    from train.finetune import labels_text, main

    labels = open_dataset(load_pretrained(tiny_run)[1].data.path).split("train").labels
    one_class = tmp_path / "one-class.txt"
    one_class.write_text(labels_text(np.flatnonzero(labels == labels[0])[:8], "one class"))

    for args, needle in [
        (["--labels", "1.5"], "--labels 1.5: a fraction must be in (0, 1]"),
        (["--labels", tmp_path / "none.txt"], "is unreadable"),
        (["--batch-size", "33"], "--batch-size 33 views cannot be split"),
        (["--backend", "nope"], "unknown loader backend 'nope'"),
        (["--data", tmp_path / "nothing"], "no dataset at"),
        (["--labels", one_class], "hold a single class"),  # every classifier scores 100%
    ]:
        code = main(["--checkpoint", str(tiny_run), *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        assert err.startswith("finetune: error: ") and needle in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # a diverging fine-tuning ends in one line, not in an accuracy reported with loss nan
    assert main(["--checkpoint", str(tiny_run), "--lr", "1e30", "--epochs", "1", "--min-steps",
                 "4", "--no-scratch"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "finetune: error: the loss became nan" in errors[0], errors
    assert not (tiny_run / "finetune").exists()  # nothing written before the errors
    proc = finetune("--checkpoint", tmp_path / "none", check=False)
    assert proc.returncode == 2 and "no readable checkpoint" in proc.stderr
    assert proc.stderr.startswith("finetune: error: ") and "Traceback" not in proc.stderr


def test_finetuning_views_keep_the_crop_and_flip_only():
    """Appendix B.5: fine-tuning augments with the recipe's crop and flip alone, whatever colour,
    blur, study operations or per-view overrides the pretraining spec holds."""
    from pipelines.spec import AugmentSpec
    from train.finetune import finetune_spec

    spec = AugmentSpec(size=32, crop_area=(0.3, 0.9), flip_p=0.4, rotate_p=0.5, sobel_p=0.2,
                       noise_p=0.3, cutout_p=0.1, view2={"jitter_p": 0.0, "blur_p": 1.0})
    got = finetune_spec(spec)
    assert (got.crop_area, got.flip_p, got.size) == ((0.3, 0.9), 0.4, 32)
    for name in ("jitter_p", "grayscale_p", "blur_p", "rotate_p", "sobel_p", "noise_p",
                 "cutout_p"):
        assert getattr(got, name) == 0.0, name
    assert got.for_view(0) == got.for_view(1) == got
