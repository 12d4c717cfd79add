"""One writer per output for the commands that write a folder or a set of files after
pretraining (tools.export, tools.embed, tools.convert): while another process holds the output's
lock, a command into it is refused in one line naming the holder, exit status 2, and writes
nothing; the lock goes with the command."""

from __future__ import annotations

import os
from pathlib import Path

from tests.processes import main_here
from tests.tools.test_convert import write_idx_dir
from train.lock import acquire, lock_beside


def _refused(main, args, capsys, prog: str, out: Path) -> None:
    code = main_here(main, args)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err, err
    for needle in (str(out), "in use by", f"pid {os.getpid()}", "started"):
        assert needle in last, last


def test_export_into_a_held_folder_is_refused(tiny_run, tmp_path, capsys):
    from tools.export import main

    out = tmp_path / "x"
    with acquire(lock_beside(out), "held", "by the test"):
        _refused(main, ["--checkpoint", tiny_run, "--out", out], capsys, "export", out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".x.lock"]
    assert main_here(main, ["--checkpoint", tiny_run, "--out", out]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the lock went with it


def test_embed_into_a_held_prefix_is_refused(tiny_run, tiny_data, tmp_path, capsys):
    from tools.embed import main

    prefix = tmp_path / "rows"
    args = ["--checkpoint", tiny_run, tiny_data, "--split", "test", "--device", "cpu",
            "--out", prefix, "--workers", "0"]
    with acquire(lock_beside(prefix), "held", "by the test"):
        _refused(main, args, capsys, "embed", prefix)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".rows.lock"]
    assert main_here(main, args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.files.txt", "rows.json",
                                                         "rows.npy"]


def test_convert_into_a_held_out_is_refused(tmp_path, capsys):
    from tools.convert import main

    src, out = tmp_path / "raw", tmp_path / "data"
    write_idx_dir(src, gz=False)
    with acquire(lock_beside(out), "held", "by the test"):
        _refused(main, [src, out], capsys, "convert", out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "raw"]
    assert main_here(main, [src, out]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "raw"]
