"""The picture commands: tools.preview's grid of augmented views per loader backend and
tools.plot's curves and evaluations of a run. Each PNG is decoded and checked against the numbers
it was drawn from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.loader import BACKENDS, BackendUnavailable, build_loader
from pipelines.sources import open_dataset
from tools import plot, preview
from train.config import ConfigError, load_config

# |difference| from torchvision in uint8 levels, mean over the grid's views: the whole-view bounds
# of tests/pipelines/test_render.py (1.5x each backend's crop-only resampling difference)
MEAN_LEVELS = {"dali": 0.75, "ffcv": 3.0}
INDICES = np.array([5, 0, 63, 17, 33, 8])  # out of order: rows follow the request
SEED, EPOCH = 3, 1


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


uses_grid = pytest.mark.slow(reason="the grid builds every backend's loader (FFCV compiles)")


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    """400 train / 200 test images of Fashion-MNIST; train has a .beton where FFCV imports."""
    return tiny_data


@pytest.fixture(scope="module")
def grid(data):
    split = open_dataset(data).split("train")
    spec = load_config(preview.REPO / preview.DEFAULT_CONFIG).augment
    backends, _ = preview.pick_backends(None, open_dataset(data), "train")
    columns = preview.grid_columns(split, spec, INDICES, backends, seed=SEED, epoch=EPOCH)
    return split, spec, backends, columns


def unnormalise(x: torch.Tensor, spec) -> np.ndarray:
    m = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return (x * s + m).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- preview

@uses_grid
def test_grid_is_the_images_and_the_views_a_training_loader_yields(grid):
    """The original column is the image itself (28 px: no resize); the torchvision columns are
    what a training loader (other batch size, shuffled) yields for those indices in that epoch."""
    split, spec, backends, columns = grid
    assert list(columns)[:3] == ["original", "torchvision view 1", "torchvision view 2"]
    assert list(columns) == ["original"] + [f"{b} view {v}" for b in backends for v in (1, 2)]
    np.testing.assert_array_equal(columns["original"],
                                  np.repeat(split.images[INDICES], 3, axis=-1))
    loader = build_loader("torchvision", split, spec, batch_size=16, seed=SEED, shuffle=True,
                          drop_last=False, num_workers=0)
    loader.set_epoch(EPOCH)
    views = {}
    for b in loader:
        for i, v1, v2 in zip(b.index.tolist(), unnormalise(b.view1, spec),
                             unnormalise(b.view2, spec), strict=True):
            views[i] = (v1, v2)
    for v in (1, 2):
        want = np.stack([views[i][v - 1] for i in INDICES.tolist()])
        np.testing.assert_array_equal(columns[f"torchvision view {v}"], want)
    # augmented: each view differs from the image and from the other view
    for r in range(len(INDICES)):
        assert not np.array_equal(columns["torchvision view 1"][r], columns["original"][r])
        assert not np.array_equal(columns["torchvision view 1"][r],
                                  columns["torchvision view 2"][r])


@uses_grid
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_other_backends_draw_the_same_views_up_to_resampling(grid, backend):
    split, spec, backends, columns = grid
    if backend not in backends:
        pytest.skip(f"{backend} does not import here")
    fid = preview.fidelity(columns, backends)
    for v in (1, 2):
        d = np.abs(columns[f"{backend} view {v}"].astype(int)
                   - columns[f"torchvision view {v}"].astype(int))
        assert d.mean() <= MEAN_LEVELS[backend], f"{backend} view {v}: mean {d.mean():.3f}"
        assert fid[backend][f"view {v}"] == {"mean": pytest.approx(d.mean()), "max": d.max()}
    assert "torchvision" not in fid


@uses_grid
def test_png_shows_the_grid_pixel_for_pixel(grid, tmp_path):
    """Cells upscaled by nearest neighbour to >= 96 px, drawn 1:1 below the title and labels."""
    split, spec, backends, columns = grid
    title = "a title " * 30
    plot.save_png(preview.draw(columns, [f"#{i}" for i in INDICES], title), tmp_path / "g.png")
    img = png(tmp_path / "g.png")
    geo = preview.layout(len(INDICES), len(columns), 28, title)
    assert geo["cell"] == 112 and img.shape == (geo["height"], geo["width"], 3)
    step = geo["cell"] + preview.GAP_PX
    for c, col in enumerate(columns.values()):
        for r in range(len(INDICES)):
            y = geo["top"] + r * step + preview.GAP_PX // 2
            x = preview.LEFT_PX + c * step + preview.GAP_PX // 2
            cell = img[y : y + geo["cell"], x : x + geo["cell"]]
            np.testing.assert_array_equal(cell, col[r].repeat(4, 0).repeat(4, 1))
            assert cell.std() > 5 and (cell != 255).any()
    assert img.std() > 20


def test_preview_command_writes_the_png_and_its_json(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: the paths are still whole lines
    out = tmp_path / "p" / "grid.png"
    assert preview.main(["--data", str(data), "--indices", "3,1", "--backends", "torchvision",
                         "--seed", "7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and f"wrote {out.with_suffix('.json')}" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["indices"] == [3, 1] and meta["backends"] == ["torchvision"]
    assert (meta["seed"], meta["epoch"], meta["skipped"], meta["fidelity"]) == (7, 0, {}, {})
    assert meta["spec"]["size"] == 28
    split = open_dataset(data).split("train")
    spec = load_config(preview.REPO / preview.DEFAULT_CONFIG).augment
    want = preview.mosaic(preview.grid_columns(split, spec, np.array([3, 1]), ["torchvision"],
                                               seed=7, epoch=0))
    img = png(out)
    h, w = want.shape[:2]
    assert img.shape[1] == preview.LEFT_PX + w + preview.RIGHT_PX
    bottom = img.shape[0] - preview.BOTTOM_PX
    np.testing.assert_array_equal(img[bottom - h : bottom, preview.LEFT_PX : preview.LEFT_PX + w],
                                  want)
    assert not list(out.parent.glob(".*"))  # no temporary file left


def test_default_backends_skip_what_cannot_run_and_a_request_fails(data, monkeypatch):
    ds = open_dataset(data)
    shown, skipped = preview.pick_backends(None, ds, "test")  # no test.beton
    assert "ffcv" not in shown and "--to ffcv" in skipped["ffcv"]
    with pytest.raises(ConfigError, match="--backends ffcv: no FFCV file .*--to ffcv"):
        preview.pick_backends("ffcv", ds, "test")

    def missing(backend):
        if backend == "dali":
            raise BackendUnavailable("data.backend 'dali' needs nvidia.dali: install it")

    monkeypatch.setattr(preview, "require_backend", missing)
    shown, skipped = preview.pick_backends(None, ds, "test")
    assert shown == ["torchvision"] and set(skipped) == {"dali", "ffcv"}
    assert "nvidia.dali" in skipped["dali"]
    with pytest.raises(ConfigError, match="--backends dali: .*install"):
        preview.pick_backends("torchvision,dali", ds, "test")


@pytest.mark.parametrize("argv, words", [
    (["--backends", "torchvision,nope"], ["unknown backend", "nope", ",".join(BACKENDS)]),
    (["--backends", "ffcv", "--split", "test"], ["test.beton", "--to ffcv"]),
    (["--indices", "2,400"], ["--indices", "0..399"]),
    (["--indices", "2,x"], ["--indices", "comma-separated"]),
    (["--set", "augment.size"], ["--set", "KEY=VALUE"]),
    (["--checkpoint", "/nonexistent/run"], ["no readable checkpoint", "train.pretrain"]),
])
def test_preview_errors_are_one_line_exit_2(data, tmp_path, capsys, argv, words):
    out = tmp_path / "x.png"
    assert preview.main(["--data", str(data), "--out", str(out), *argv]) == 2
    one_line_error(capsys, "preview: error:", *words)
    assert not out.exists()


# ---------------------------------------------------------------- plot

def test_plot_draws_a_real_run(tiny_run_copy, capsys):
    """The shared run logs every step with a kNN point at each (three steps)."""
    run = tiny_run_copy
    assert plot.main([str(run)]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(run / "plots" / "training.png")]
    panels = plot.curves(plot.read_log(run / "log.jsonl")[0])
    assert list(panels) == ["loss", "learning rate", "images/s", "data-wait share (%)",
                            plot.KNN_PANEL]
    assert panels["loss"][0] == [1, 2, 3] and panels[plot.KNN_PANEL][0] == [1, 2, 3]
    img = png(run / "plots" / "training.png")
    assert img.shape == (1010, 800, 3)  # 5 panels: 8 x (1.9 * 5 + 0.6) inches at 100 dpi
    assert img.std() > 20


def _write_log(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_plot_panels_hold_the_log_values(tmp_path, capsys):
    steps = [{"step": s, "epoch": s / 10, "loss": 6.0 - s / 10, "lr": s / 100,
              "images_per_s": 100.0 + s, "data_wait_frac": 0.5 / s, "tflops": 0.1}
             for s in (10, 20, 30)]
    resumed = {**steps[1], "loss": 1.5}  # a resumed run logs step 20 again: that one is drawn
    records = [{"event": "start", "step": 0}, *steps,
               {"event": "knn", "step": 20, "epoch": 2.0, "images": 640, "train_s": 3.0,
                "knn_top1": 0.5}, resumed,
               {"event": "knn", "step": 30, "epoch": 3.0, "images": 960, "train_s": 4.0,
                "knn_top1": 0.625}, {"event": "end", "steps": 30}]
    _write_log(tmp_path / "log.jsonl", records, tail='{"step": 40, "loss": 1.')
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "pics")]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["wrote", str(tmp_path / "pics" / "training.png")]
    assert "skipped 1 line(s)" in err and "log.jsonl" in err
    panels = plot.curves(plot.read_log(tmp_path / "log.jsonl")[0])
    fig = plot.training_figure(panels)
    got = {ax.get_ylabel(): ax.lines[0].get_xydata().tolist() for ax in fig.axes}
    assert got == {"loss": [[10, 5.0], [20, 1.5], [30, 3.0]],
                   "learning rate": [[10, 0.1], [20, 0.2], [30, 0.3]],
                   "images/s": [[10, 110.0], [20, 120.0], [30, 130.0]],
                   "data-wait share (%)": [[10, 5.0], [20, 2.5], [30, 100 * 0.5 / 30]],
                   plot.KNN_PANEL: [[20, 50.0], [30, 62.5]]}
    assert [ax.get_ylabel() for ax in fig.axes] == list(got)
    # an older log without some keys: only the panels with data
    _write_log(tmp_path / "log.jsonl", [{"step": 1, "loss": 2.0, "lr": 0.1}])
    assert list(plot.curves(plot.read_log(tmp_path / "log.jsonl")[0])) == ["loss",
                                                                             "learning rate"]


def test_plot_draws_linear_and_finetune_results(tmp_path, capsys):
    _write_log(tmp_path / "log.jsonl", [{"event": "start", "step": 0}])
    linear = {"encoder": {"top1": 0.86, "top5": 0.99}, "random_init": {"top1": 0.8, "top5": 0.97},
              "raw_pixels": {"top1": 0.84, "top5": 0.98}}
    (tmp_path / "linear_eval.json").write_text(json.dumps(linear))
    for tag, r in {"10pct": {"label_fraction": 0.1, "pretrained": {"top1": 0.8, "top5": 0.99},
                             "scratch": {"top1": 0.6, "top5": 0.9}},
                   "1pct": {"label_fraction": 0.01, "pretrained": {"top1": 0.7, "top5": 0.95}}
                   }.items():
        (tmp_path / "finetune" / tag).mkdir(parents=True)
        (tmp_path / "finetune" / tag / "finetune.json").write_text(json.dumps(r))
    assert plot.main([str(tmp_path)]) == 0  # no step record: evaluation.png only
    assert capsys.readouterr().out.split() == ["wrote", str(tmp_path / "plots" / "evaluation.png")]
    fig = plot.evaluation_figure(plot.linear_results(tmp_path, print),
                                 plot.finetune_results(tmp_path, print))
    lin, ft = fig.axes
    heights = [round(p.get_height(), 6) for p in lin.patches]
    assert heights == [86.0, 80.0, 84.0, 99.0, 97.0, 98.0]  # top-1 bars, then top-5
    assert [t.get_text() for t in lin.get_xticklabels()] == list(plot.LINEAR.values())
    assert [round(p.get_height(), 6) for p in ft.patches] == [80.0, 70.0, 60.0]
    assert [t.get_text() for t in ft.get_xticklabels()] == ["10pct\n(10% labels)",
                                                            "1pct\n(1% labels)"]
    img = png(tmp_path / "plots" / "evaluation.png")
    assert img.shape == (420, 1100, 3) and img.std() > 20


def test_plot_without_a_log_is_one_line_exit_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nothing")]) == 2
    one_line_error(capsys, "plot: error:", "log.jsonl", "train.pretrain")
    _write_log(tmp_path / "log.jsonl", [{"event": "start", "step": 0}])
    assert plot.main([str(tmp_path)]) == 2
    one_line_error(capsys, "plot: error:", "no step or kNN record")
    assert not (tmp_path / "plots").exists()
