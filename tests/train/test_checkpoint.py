"""Checkpoint writes in-process, with a stand-in for Accelerate: rotation, re-saves, `latest`
fallback, failed writes and atomic files that never write through a symlink."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from train.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint, save_checkpoint


class FakeAccelerator:
    """One process; save_state writes a weights file holding `payload`."""

    is_main_process = True

    def __init__(self, payload: bytes = b"w0"):
        self.payload = payload

    def wait_for_everyone(self):
        pass

    def save_state(self, out: str):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.safetensors").write_bytes(self.payload)


def save(root: Path, step: int, payload: bytes = b"w", keep: int = 2) -> Path:
    acc = FakeAccelerator(payload)
    return save_checkpoint(acc, root, step, {"step": step}, "model: {}\n", keep=keep)


def steps_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """Stale higher steps (another run, or a resume from an earlier checkpoint) sort after the
    new one; the new checkpoint must survive and `latest` must name it."""
    for s in (8, 10):
        save(tmp_path, s)
    final = save(tmp_path, 2)
    assert final.is_dir() and (final / "trainer_state.json").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    # keep=2: the new one and the newest other; the oldest went
    assert steps_on_disk(tmp_path) == ["latest", "step-00000002", "step-00000010"]


def test_rotation_orders_by_step_number_not_name(tmp_path):
    """step-100000000 (nine digits) sorts before step-20000000 by name but is the newer one."""
    save(tmp_path, 20_000_000)
    save(tmp_path, 100_000_000)
    save(tmp_path, 100_000_001, keep=2)
    assert steps_on_disk(tmp_path) == ["latest", "step-100000000", "step-100000001"]


def test_resave_of_a_step_failing_midway_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """The re-save of a step whose directory exists: if the move into place fails (a kill in the
    gap, simulated by an error), the old checkpoint of that step is still there and `latest`
    still resolves to it; it is never deleted before its replacement is in place."""
    save(tmp_path, 2, b"old")
    import train.checkpoint as ck

    def broken(*args, **kw):
        raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(ck.os, "rename", broken)
    monkeypatch.setattr(ck.os, "replace", broken)
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False, raising=False)
    with pytest.raises(CheckpointError):
        save(tmp_path, 2, b"new")
    monkeypatch.undo()
    got = resolve_checkpoint(tmp_path)
    assert got.name == "step-00000002" and (got / "model.safetensors").read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_resave_killed_between_its_renames_without_exchange_keeps_the_old_one(tmp_path,
                                                                             monkeypatch):
    """Where the system has no atomic exchange (NFS, Lustre), the old checkpoint is renamed to
    .old-step-N before the new one takes its name: a kill between the two renames leaves it
    there, it is what resolves, and the next save renames it back."""
    save(tmp_path, 2)
    save(tmp_path, 4, b"old")
    import train.checkpoint as ck

    real_rename, renames = os.rename, []

    def killed_after_the_first(a, b):
        renames.append((a, b))
        if len(renames) == 2:  # the new checkpoint's rename never happens
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    monkeypatch.setattr(ck.os, "rename", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, b"new")
    monkeypatch.undo()
    assert not (tmp_path / "step-00000004").exists()
    got = latest_checkpoint(tmp_path)
    assert got.name == ".old-step-00000004" and (got / "model.safetensors").read_bytes() == b"old"
    save(tmp_path, 6)
    assert steps_on_disk(tmp_path) == ["latest", "step-00000004", "step-00000006"]
    assert (tmp_path / "step-00000004" / "model.safetensors").read_bytes() == b"old"


def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Rotation deletes file by file: killed midway, what is left under a step-* name must still
    be a whole checkpoint (the half-deleted one is out of sight and removed by the next save)."""
    save(tmp_path, 2)
    save(tmp_path, 4)
    import train.checkpoint as ck

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "model.safetensors").unlink()  # the first file goes, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 6)
    monkeypatch.undo()
    for d in tmp_path.glob("step-*"):
        assert (d / "model.safetensors").is_file(), f"{d.name} is half deleted"
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    save(tmp_path, 8)
    assert steps_on_disk(tmp_path) == ["latest", "step-00000006", "step-00000008"]


def test_resave_of_a_step_replaces_it(tmp_path):
    save(tmp_path, 2, b"old")
    final = save(tmp_path, 2, b"new")
    assert (final / "model.safetensors").read_bytes() == b"new"
    assert steps_on_disk(tmp_path) == ["latest", "step-00000002"]


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / "latest").write_text("step-00000006\n")  # a kill between delete and rename
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    assert resolve_checkpoint(tmp_path.parent / tmp_path.name) == tmp_path / "step-00000004"
    (tmp_path / "latest").unlink()  # a kill after the first rename, before `latest` was written
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"


def test_a_checkpoint_completed_after_latest_was_written_is_the_one_resumed(tmp_path):
    """A kill after the rename, before `latest` is replaced: the newer complete checkpoint wins."""
    save(tmp_path, 2)
    save(tmp_path, 4)
    (tmp_path / "latest").write_text("step-00000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"


def test_checkpoints_that_are_all_broken_fail_loudly_not_afresh(tmp_path):
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "latest").write_text("step-00000002\n")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "empty") is None  # nothing at all: a fresh start is right


def test_disk_full_during_state_save_is_one_line_and_leaves_no_temp(tmp_path):
    """ENOSPC from the serializer: one line that names the cause, no .tmp directory left, the
    previous checkpoint intact and still `latest`."""
    prev = save(tmp_path, 2, b"good")

    class FullDisk(FakeAccelerator):
        def save_state(self, out: str):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError) as e:
        save_checkpoint(FullDisk(), tmp_path, 4, {"step": 4}, "model: {}\n")
    msg = str(e.value)
    assert "\n" not in msg and "disk is full" in msg
    assert "step-00000002" in msg and "--resume" in msg
    assert steps_on_disk(tmp_path) == ["latest", "step-00000002"]
    assert resolve_checkpoint(tmp_path) == prev
    assert (prev / "model.safetensors").read_bytes() == b"good"


# ---------------------------------------------------------------- atomic writes vs symlinks

def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


def test_save_config_does_not_write_through_a_symlink_at_the_temp_name(tmp_path):
    from train.config import Config, load_yaml, save_config

    victim = _victim(tmp_path)
    (tmp_path / "config.yaml.tmp").symlink_to(victim)
    save_config(Config(), tmp_path / "config.yaml")
    assert victim.read_text() == "precious"
    assert load_yaml(tmp_path / "config.yaml")["model"]["arch"] == Config().model.arch


def test_latest_is_not_written_through_a_symlink_at_the_temp_name(tmp_path):
    victim = _victim(tmp_path)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest.tmp").symlink_to(victim)
    save(root, 2)
    assert victim.read_text() == "precious"
    assert (root / "latest").read_text() == "step-00000002\n"


def test_write_atomic_refuses_to_follow_links_and_cleans_up_on_failure(tmp_path, monkeypatch):
    import train.atomic as atomic

    victim = _victim(tmp_path)
    target = tmp_path / "out.json"
    # a link planted at the exact temp name the helper picks: O_EXCL|O_NOFOLLOW refuses it
    monkeypatch.setattr(atomic, "temp_name", lambda p: p.with_name("planted"))
    (tmp_path / "planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic.write_atomic(target, "x")
    assert victim.read_text() == "precious" and not target.exists()
    monkeypatch.undo()

    target.write_text("old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", full)
    with pytest.raises(OSError):
        atomic.write_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "planted", "victim.txt"]
    atomic.write_atomic(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}


def test_load_pretrained_gives_the_checkpoints_weights_and_names_a_mismatch(tiny_run, tmp_path):
    import shutil

    import torch

    from train.checkpoint import load_model_weights, load_pretrained, write_manifest

    run = tiny_run  # read only
    ckpt, cfg, model = load_pretrained(run)
    assert ckpt == resolve_checkpoint(run) and cfg.model.width == 0.125
    saved = load_model_weights(ckpt)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    other = tmp_path / "other" / "step-00000002"
    shutil.copytree(ckpt, other)
    text = (other / "config.yaml").read_text().replace("width: 0.125", "width: 0.25")
    (other / "config.yaml").write_text(text)
    write_manifest(other)  # a consistent checkpoint, only its config does not fit its weights
    with pytest.raises(CheckpointError, match=r"does not match its config .*pass another"):
        load_pretrained(other)


def test_stale_temps_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    import subprocess

    from train.atomic import remove_stale_temps, temp_name

    target = tmp_path / "rows[1].npy"  # a name with glob characters matches only itself
    mine = temp_name(target)
    child = subprocess.Popen(["true"])
    child.wait()  # reaped by its Popen (a bare waitpid races Popen's own reaping of it)
    dead_pid = child.pid
    dead = tmp_path / f".{target.name}.{dead_pid}.0badc0de.tmp"
    other = tmp_path / f".rows1.npy.{dead_pid}.0badc0de.tmp"  # another file's temp
    for p in (mine, dead, other):
        p.write_bytes(b"partial")
    assert remove_stale_temps(target) == [dead]
    assert mine.exists() and other.exists() and not dead.exists()


def test_each_checkpoint_carries_the_sha256_of_its_files_and_a_changed_byte_is_found(tmp_path):
    import hashlib

    from train.checkpoint import MANIFEST, check_manifest

    ckpt = save(tmp_path, 2, b"weights" * 1000)
    sums = json.loads((ckpt / MANIFEST).read_text())["sha256"]
    assert set(sums) == {"model.safetensors", "trainer_state.json", "config.yaml"}
    assert sums["model.safetensors"] == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert check_manifest(ckpt) is None
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[3500] ^= 1  # one bit, the size unchanged
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert f"'{ckpt / 'model.safetensors'}' is damaged" in check_manifest(ckpt)
    (ckpt / "model.safetensors").unlink()
    assert "unreadable" in check_manifest(ckpt)
    (ckpt / MANIFEST).unlink()  # a checkpoint from before manifests: nothing to check against
    assert check_manifest(ckpt) is None
