"""tools.embed on a real tiny run: rows equal the trainer's features of the evaluation view, for a
dataset split and for a folder of real JPEG/PNG files; queries rank by cosine similarity; a
corrupt image is one line (or skipped); the .npy appears only when complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.eval_view import eval_transform
from pipelines.formats import decode_rgb
from pipelines.sources import open_dataset
from tests.fashion_mnist import REPO
from tools.embed import main, nearest
from train.checkpoint import load_pretrained
from train.features import extract_features


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_data, tiny_run):
    """A copy of the shared tiny run (embeddings go into it), its dataset, and a folder of its
    test images as files: grayscale JPEGs and PNGs, one RGB image at another size in a
    subfolder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("embed")
    data = tiny_data
    run = Path(shutil.copytree(tiny_run, root / "run", symlinks=True))
    test = open_dataset(data).split("test")
    folder = root / "pictures"
    (folder / "more").mkdir(parents=True)
    for i in range(8):
        suffix = "jpg" if i % 2 else "png"
        Image.fromarray(test.images[i, :, :, 0]).save(folder / f"img{i}.{suffix}")
    Image.fromarray(test.images[9, :, :, 0]).convert("RGB").resize((42, 56)).save(
        folder / "more" / "tall.jpeg")
    (folder / "notes.txt").write_text("not an image")
    return {"root": root, "data": data, "run": run, "folder": folder}


def by_hand(run, paths) -> np.ndarray:
    """Each file decoded, through the evaluation view, encoded alone."""
    _, cfg, model = load_pretrained(run)
    view = eval_transform(cfg.augment)
    with torch.no_grad():
        return torch.cat([model.encoder.eval()(view(torch.from_numpy(np.array(decode_rgb(p)))
                                                     .permute(2, 0, 1))[None])
                          for p in paths]).numpy()


def cosine_order(rows: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's cosine similarity to q (0 for a zero row), and the rows ranked by it."""
    with np.errstate(invalid="ignore"):
        sims = np.nan_to_num(rows @ q / (np.linalg.norm(rows, axis=1) * np.linalg.norm(q)))
    return np.argsort(-sims, kind="stable"), sims


def test_dataset_split_rows_are_the_trainers_features(setup, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: the paths are still whole lines
    run, data = setup["run"], setup["data"]
    assert main(["--checkpoint", str(run), str(data), "--device", "cpu", "--batch-size", "40"]) == 0
    prefix = run / "embeddings" / "fashion-mnist-train"
    rows = np.load(f"{prefix}.npy")
    meta = json.loads(open(f"{prefix}.json").read())
    ckpt, cfg, model = load_pretrained(run)
    want, _ = extract_features(model.encoder, open_dataset(data).split("train"), cfg.augment)
    assert rows.dtype == np.float32 and rows.shape == (400, 64)
    assert np.allclose(rows, want.numpy(), atol=1e-5)
    assert open(f"{prefix}.files.txt").read().splitlines() == [f"train/{i}" for i in range(400)]
    assert {k: meta[k] for k in ("checkpoint", "step", "source", "split", "count", "dim",
                                 "normalised", "device", "skipped")} == {
        "checkpoint": str(ckpt.resolve()), "step": 3, "source": str(data), "split": "train",
        "count": 400, "dim": 64, "normalised": False, "device": "cpu", "skipped": []}
    assert meta["seconds"] > 0 and meta["images_per_s"] > 0
    assert str(prefix) + ".npy" in capsys.readouterr().out

    # a query by <split>/<index> reuses the rows written above
    written = (prefix.parent / "fashion-mnist-train.npy").stat().st_mtime_ns
    assert main(["--checkpoint", str(run), str(data), "--device", "cpu", "--query", "train/7",
                 "--k", "5"]) == 0
    assert (prefix.parent / "fashion-mnist-train.npy").stat().st_mtime_ns == written
    found = json.loads(open(f"{prefix}.query.json").read())["neighbours"]
    order, sims = cosine_order(rows, rows[7])
    assert [n["index"] for n in found] == order[:5].tolist() and found[0]["index"] == 7
    assert [n["path"] for n in found] == [f"train/{i}" for i in order[:5]]
    assert np.allclose([n["similarity"] for n in found], sims[order[:5]], atol=1e-5)
    assert found[0]["similarity"] == pytest.approx(1.0, abs=1e-5)

    capsys.readouterr()
    assert main(["--checkpoint", str(run), str(data), "--device", "cpu", "--query",
                 "train/400"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embed: error: --query train/400") and len(err.splitlines()) == 1


def test_image_folder_rows_and_query(setup, tmp_path):
    run, folder = setup["run"], setup["folder"]
    prefix = tmp_path / "out" / "pics"
    query = folder / "img3.jpg"
    assert main(["--checkpoint", str(run), str(folder), "--device", "cpu", "--out", str(prefix),
                 "--batch-size", "4", "--query", str(query), "--k", "4"]) == 0
    paths = sorted([*folder.glob("*.png"), *folder.glob("*.jpg"), folder / "more" / "tall.jpeg"],
                   key=str)
    rows = np.load(f"{prefix}.npy")
    assert open(f"{prefix}.files.txt").read().splitlines() == [str(p) for p in paths]
    assert rows.shape == (9, 64)
    assert np.allclose(rows, by_hand(run, paths), atol=1e-5)
    meta = json.loads(open(f"{prefix}.json").read())
    assert meta["split"] is None and meta["count"] == 9 and meta["source"] == str(folder)

    found = json.loads(open(f"{prefix}.query.json").read())["neighbours"]
    order, sims = cosine_order(rows, rows[paths.index(query)])
    assert found[0]["path"] == str(query) and found[0]["similarity"] == pytest.approx(1, abs=1e-5)
    assert [n["index"] for n in found] == order[:4].tolist()
    assert np.allclose([n["similarity"] for n in found], sims[order[:4]], atol=1e-5)


def test_a_corrupt_image_is_one_line_or_skipped(setup, tmp_path):
    run, folder = setup["run"], tmp_path / "pictures"
    shutil.copytree(setup["folder"], folder)
    good = (folder / "img2.png").read_bytes()
    (folder / "more" / "broken.png").write_bytes(good[: len(good) // 2])
    prefix = tmp_path / "out" / "pics"
    cmd = [sys.executable, "-m", "tools.embed", "--checkpoint", str(run), str(folder), "--device",
           "cpu", "--out", str(prefix), "--workers", "1"]  # the error crosses a worker process
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]  # after tqdm's bar
    assert last.startswith("embed: error: cannot decode image") and "broken.png" in last
    assert last.endswith("remove it or pass --skip-bad")
    assert not (tmp_path / "out" / "pics.npy").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []

    proc = subprocess.run([*cmd, "--skip-bad"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped '{folder / 'more' / 'broken.png'}'" in proc.stderr
    names = open(f"{prefix}.files.txt").read().splitlines()
    meta = json.loads(open(f"{prefix}.json").read())
    assert meta["skipped"] == [str(folder / "more" / "broken.png")] and meta["count"] == 9
    assert len(names) == 9 and not any("broken" in n for n in names)
    rows = np.load(f"{prefix}.npy")
    assert rows.shape == (9, 64)
    assert np.allclose(rows, by_hand(run, names), atol=1e-5)


def test_rows_appear_only_when_complete(setup, tmp_path, monkeypatch):
    """An encoder that fails midway leaves no PREFIX.npy and no temp file."""
    import tools.embed

    calls = []
    real = tools.embed.encode

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed midway")
        return real(*a, **kw)

    monkeypatch.setattr(tools.embed, "encode", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed midway"):
        main(["--checkpoint", str(setup["run"]), str(setup["data"]), "--device", "cpu", "--out",
              str(out / "e"), "--batch-size", "16"])
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_nearest_in_chunks_is_the_brute_force_ranking(chunk):
    rows = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    rows[13] = 0  # a zero row: similarity 0, no NaN
    q = rows[4] * 3
    order, sims = cosine_order(rows, q)
    for k in (1, 10, 80):
        idx, s = nearest(rows, q, k, chunk=chunk)
        assert idx.tolist() == order[:k].tolist() and np.allclose(s, sims[order[:k]], atol=1e-6)


@pytest.mark.gpu
def test_cuda_rows_match_the_cpu_rows(setup, tmp_path):
    """bf16 autocast on the GPU: the same rows as float32 on the CPU, to bf16's precision."""
    run, data = setup["run"], setup["data"]
    for device in ("cpu", "cuda"):
        assert main(["--checkpoint", str(run), str(data), "--device", device, "--out",
                     str(tmp_path / device)]) == 0
    cpu, gpu = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "cuda.npy")
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() > 0.99
    assert json.loads((tmp_path / "cuda.json").read_text())["device"] == "cuda"


@pytest.mark.parametrize("args", [["--k", "0"], ["--batch-size", "0"], ["--workers", "-1"]])
def test_out_of_range_option_is_a_usage_error_naming_it(capsys, args):
    from tools.embed import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(args)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and f"argument {args[0]}" in last and args[1] in last, last


def test_a_bad_query_is_refused_before_the_split_is_embedded(setup, tmp_path, capsys,
                                                           monkeypatch):
    """A missing query file, an index out of range or a --query-json that cannot be written: one
    line before any row is computed (they used to come after the whole split was embedded)."""
    import tools.embed as embed_tool

    monkeypatch.setattr(embed_tool, "embed",
                        lambda *a, **kw: pytest.fail("the split was embedded first"))
    run, data = setup["run"], setup["data"]
    base = ["--checkpoint", str(run), str(data), "--device", "cpu", "--out", str(tmp_path / "e")]
    for extra, needle in [(["--query", str(tmp_path / "none.png")], "--query"),
                          (["--query", "train/400"], "--query train/400"),
                          (["--query", "train/7", "--query-json", str(tmp_path)], "--query-json")]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"embed: error: {needle}") and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("e*.npy"))
