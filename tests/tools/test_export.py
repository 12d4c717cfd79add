"""tools.export on real tiny runs: the exported weights load strictly into torchvision's ResNet
(or, for a width torchvision lacks, into ResNetEncoder) and give the trainer's features, and the
`load` lines of encoder.json do what they say."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from model.encoder import ResNetEncoder
from tests.fashion_mnist import REPO, pretrain_tiny
from tools.export import main, torchvision_model
from train.checkpoint import load_pretrained
from train.features import eval_views


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_run):
    """A width-1 ResNet-18 run of one step (torchvision's network with the demo's small stem) and
    a copy of the shared width-1/8 run of three steps (none of torchvision's), on real
    Fashion-MNIST images. Exports go into the run directories."""
    root = tmp_path_factory.mktemp("export")
    wide = pretrain_tiny(root / "run18", tiny_data, "--model.width=1.0", "--model.arch=resnet18",
                         steps=1)
    return {"data": tiny_data, "w1": wide,
            "narrow": Path(shutil.copytree(tiny_run, root / "run", symlinks=True))}


def images(run) -> torch.Tensor:
    """Normalised evaluation views of 16 real test images, as the trainer evaluates."""
    _, cfg, _ = load_pretrained(run)
    from pipelines.sources import open_dataset

    split = open_dataset(cfg.data.path).split(cfg.data.eval_split)
    return next(eval_views(split, cfg.augment, np.arange(16), 16))


def features(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def exec_load(meta: dict) -> torch.nn.Module:
    """Run encoder.json's `load` text as a user would paste it (repository on sys.path)."""
    ns: dict = {}
    exec(meta["load"], ns)  # noqa: S102  the instructions the export prints
    return ns["m"]


def export(*argv) -> int:
    return main([*argv])


def test_width_one_export_loads_into_torchvision(runs, capsys):
    run = runs["w1"]
    assert export("--checkpoint", str(run)) == 0
    out = run / "export"
    meta = json.loads((out / "encoder.json").read_text())
    printed = capsys.readouterr()
    assert meta["load"] in printed.out and "warning" not in printed.err
    assert meta["torchvision_loadable"] is True
    assert (meta["arch"], meta["width"], meta["small_stem"], meta["stem_pool"]) == (
        "resnet18", 1.0, True, True)
    assert (meta["feature_dim"], meta["input_size"], meta["step"]) == (512, 28, 1)
    assert meta["mean"] == [0.286] * 3 and meta["std"] == [0.353] * 3
    assert meta["config"]["model"]["width"] == 1.0 and meta["torch"] == torch.__version__
    assert meta["checkpoint"] == str((run / "checkpoints" / "step-00000001").resolve())
    assert "bilinearly" in meta["eval_transform"] and "28x28" in meta["eval_transform"]
    for name in ("encoder.safetensors", "encoder.pt"):
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert meta["sha256"][name] == digest
    assert "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in meta["load"]
    assert "maxpool" not in meta["load"]  # the demo recipe keeps the max-pool

    _, _, model = load_pretrained(run)
    x = images(run)
    want = features(model.encoder, x)
    st, pt = load_file(str(out / "encoder.safetensors")), torch.load(out / "encoder.pt",
                                                                     weights_only=True)
    assert st.keys() == pt.keys() and not any(k.startswith("fc.") for k in st)
    for state in (st, pt):
        assert all(v.is_contiguous() and v.device.type == "cpu" for v in state.values())
        m = torchvision_model(meta)
        assert type(m) is torchvision.models.ResNet
        m.load_state_dict(state, strict=True)
        assert torch.allclose(features(m, x), want, atol=1e-5)
    m = exec_load(meta)
    assert type(m) is torchvision.models.ResNet
    assert torch.allclose(features(m, x), want, atol=1e-5)


def test_other_width_exports_with_resnet_encoder_load_lines(runs, capsys):
    run = runs["narrow"]
    assert export("--checkpoint", str(run)) == 0
    meta = json.loads((run / "export" / "encoder.json").read_text())
    err = capsys.readouterr().err
    assert meta["torchvision_loadable"] is False and meta["width"] == 0.125
    assert len(err.splitlines()) == 1 and err.startswith("export: warning: width 0.125")
    assert "ResNetEncoder('resnet18', width=0.125" in meta["load"]
    _, _, model = load_pretrained(run)
    x = images(run)
    want = features(model.encoder, x)
    m = exec_load(meta)
    assert isinstance(m, ResNetEncoder) and torch.allclose(features(m, x), want, atol=1e-5)
    m = torchvision_model(meta)
    m.load_state_dict(torch.load(run / "export" / "encoder.pt", weights_only=True), strict=True)
    assert torch.allclose(features(m, x), want, atol=1e-5)


def test_classifier_exports_a_finetuned_network_with_its_fc(runs, tmp_path, capsys):
    """A network in train.finetune's layout (encoder.* and fc.*, finetune.json beside it): its own
    encoder weights and classifier go out, loading strictly into resnet18(num_classes=K)."""
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18", small_stem=True, stem_pool=True)
    for mod in encoder.modules():  # running statistics unlike the checkpoint's
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    fc = torch.nn.Linear(512, 3)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({**{f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()},
               "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()},
              str(ft / "model.safetensors"))
    classes = ["T-shirt/top", "Trouser", "Pullover"]
    (ft / "finetune.json").write_text(json.dumps({"arch": "resnet18", "width": 1.0,
                                                  "small_stem": True, "classes": classes}))
    out = tmp_path / "exported"
    assert export("--checkpoint", str(runs["w1"]), "--classifier", str(ft), "--out",
                  str(out)) == 0
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["num_classes"] == 3 and meta["classes"] == classes
    assert "torchvision.models.resnet18(num_classes=3)" in meta["load"]
    x = images(runs["w1"])
    with torch.no_grad():
        want = fc(encoder.eval()(x))
    m = torchvision.models.resnet18(num_classes=3)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)
    assert torch.allclose(features(m, x), want, atol=1e-5)
    for m in (exec_load(meta), torchvision_model(meta)):
        m.load_state_dict(torch.load(out / "encoder.pt", weights_only=True), strict=True)
        assert torch.allclose(features(m, x), want, atol=1e-5)

    capsys.readouterr()  # a network of another architecture: one line, nothing written
    (ft / "finetune.json").write_text(json.dumps({"arch": "resnet18", "width": 0.125}))
    assert export("--checkpoint", str(runs["w1"]), "--classifier", str(ft / "model.safetensors"),
                  "--out", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: --classifier was fine-tuned from width 0.125")
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_export_refuses_to_overwrite_and_replaces_only_an_export(runs, tmp_path, capsys):
    run = runs["narrow"]
    out = tmp_path / "x"
    assert export("--checkpoint", str(run), "--out", str(out)) == 0
    first = (out / "encoder.safetensors").read_bytes()
    (out / "note").write_text("from the first export")
    capsys.readouterr()
    assert export("--checkpoint", str(run), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: ") and "--overwrite" in err
    assert len(err.splitlines()) == 1 and (out / "note").is_file()

    # --overwrite replaces an export, but never deletes a file the user put into it
    assert export("--checkpoint", str(run), "--out", str(out), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "files no export wrote (note)" in err and len(err.splitlines()) == 1
    assert (out / "note").read_text() == "from the first export"
    (out / "note").unlink()
    assert export("--checkpoint", str(run), "--out", str(out), "--overwrite") == 0
    assert (out / "encoder.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp folder left

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("mine")
    assert export("--checkpoint", str(run), "--out", str(precious), "--overwrite") == 2
    assert "not an export" in capsys.readouterr().err and (precious / "keep").is_file()

    # a step directory outside a run: the export goes beside it
    shelf = tmp_path / "shelf"
    shutil.copytree(run / "checkpoints" / "step-00000003", shelf / "step-00000003")
    assert export("--checkpoint", str(shelf / "step-00000003")) == 0
    assert (shelf / "step-00000003.export" / "encoder.json").is_file()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.export", "--checkpoint",
                           str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("export: error: no readable checkpoint")
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "none").exists()
