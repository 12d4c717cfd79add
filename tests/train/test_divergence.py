"""Nothing lost when training goes wrong (issue 23): a diverging run stops in one line keeping its
last good checkpoint and never writes an unsound one; a damaged or unsound checkpoint is never
loaded, and `--resume auto` falls back to the newest one that verifies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.fashion_mnist import subset_dataset
from tests.marks import multi
from tests.processes import accelerate_launch
from tests.train.test_pretrain import TINY, run, run_here
from train.bookkeeping import agree
from train.checkpoint import (
    MANIFEST,
    SOUND_LIMIT,
    CheckpointError,
    load_model_weights,
    load_pretrained,
    resolve_checkpoint,
    step_dirs,
    unsound,
    write_manifest,
)
from train.step import step_finite

TRAINS = pytest.mark.slow(reason="pretrains a few steps (in this process)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subset_dataset(tmp_path_factory, 256, 128)  # 8 steps of 32 per epoch


def sound_on_disk(run_dir: Path) -> list[str]:
    """The step-* checkpoints of a run whose weights and optimizer state are all sound."""
    names = []
    for _, ckpt in step_dirs(run_dir / "checkpoints"):
        opt = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=False)
        tensors = [*load_model_weights(ckpt).values(),
                   *[t for s in opt["state"].values() for t in s.values()]]
        assert not unsound(tensors), f"{ckpt} holds NaN, infinite or astronomical values"
        names.append(ckpt.name)
    return names


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pretrain: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- defect 1: divergence


def test_step_finite_flags_a_nan_loss_and_an_infinite_gradient_without_changing_them():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert step_finite(opt, loss.detach()).item() is True
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert step_finite(opt, torch.tensor(float("nan"))).item() is False
    model.bias.grad[0] = float("inf")
    assert step_finite(opt, loss.detach()).item() is False
    flag = step_finite(opt, loss.detach())
    assert flag.shape == () and flag.dtype == torch.bool  # a device flag, not a Python bool


def test_agree_carries_the_first_unsound_step_in_its_one_table():
    loss = torch.tensor(4.0)
    assert agree(loss, False, 1.0, 0.0, world=1, rank=0).diverged_at == 0
    got = agree(loss, False, 1.0, 0.0, world=1, rank=0, bad_step=torch.tensor(3.0, dtype=float))
    assert got.diverged_at == 3 and got.loss == 4.0


def test_unsound_is_nan_infinite_or_beyond_the_limit():
    assert not unsound([torch.ones(3), torch.tensor([SOUND_LIMIT / 2]), torch.arange(3)])
    for bad in (float("nan"), float("inf"), -float("inf"), SOUND_LIMIT * 4):
        assert unsound([torch.ones(3), torch.tensor([1.0, bad])])


@TRAINS
@pytest.mark.parametrize("optim", ["lars", "sgd"])
def test_a_diverging_run_keeps_its_last_good_checkpoint_and_stops_in_one_line(
        optim, dataset, tmp_path, capsys):
    """LR 1e6: LARS weights pass 1e19 by step 4 and turn NaN by step 7 (the loss at step 10), SGD
    grows them to ~1e23 with a finite loss and used to finish with status 0. Unlogged steps too
    (log_every 3): the check before each checkpoint catches what the logged steps have not."""
    out = tmp_path / optim
    got = run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--optim.lr=1e6",
                    f"--optim.name={optim}", "--train.log_every=3", "--train.checkpoint_every=1",
                    "--train.max_steps=12"], capsys)
    assert got.returncode == 2, got.stderr[-3000:]
    line = error_line(got.stderr)
    assert line.startswith("pretrain: error: training diverged by step "), line
    assert "lower optim.lr" in line
    kept = sound_on_disk(out)
    assert not (out / "summary.json").exists()
    assert line.endswith("and start again with --overwrite or another train.out_dir")
    if kept:
        latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
        assert latest.name == kept[-1] and f"'{latest}' is kept as `latest`" in line
        load_pretrained(out)  # loads: it verifies
    else:
        assert "no good checkpoint yet" in line


@TRAINS
def test_rotation_keeps_the_last_finite_checkpoint_and_resume_picks_it(dataset, tmp_path, capsys):
    """keep_checkpoints=1: the good checkpoint is never rotated away by an unsound one and stays
    `latest`; `--resume auto` continues from it (and, the settings unchanged, diverges again)."""
    out = tmp_path / "run"
    args = [*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--optim.lr=1e6",
            "--train.keep_checkpoints=1", "--train.checkpoint_every=1", "--train.log_every=4",
            "--train.max_steps=8"]
    got = run_here(args, capsys)
    assert got.returncode == 2, got.stderr[-3000:]
    kept = sound_on_disk(out)
    assert len(kept) == 1
    good = out / "checkpoints" / kept[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == good.name
    assert f"its last good checkpoint '{good}' is kept" in error_line(got.stderr)
    got = run_here([*args, "--resume"], capsys)
    assert f"resumed from {good} at step {int(good.name[5:])}" in got.stdout
    assert got.returncode == 2 and sound_on_disk(out) == kept


@multi
@pytest.mark.timeout(400)
def test_two_processes_stop_together_keeping_the_last_good_checkpoint(dataset, tmp_path):
    """Over gloo the verdict is agreed (the logged steps' table, an all-reduce before an unlogged
    checkpoint): both processes stop, neither waits for the other, nothing unsound is written."""
    out = tmp_path / "run"
    proc = run([*TINY, f"--data.path={dataset}", f"--train.out_dir={out}", "--optim.lr=1e6",
                "--train.log_every=3", "--train.checkpoint_every=1", "--train.max_steps=12"],
               launcher=accelerate_launch("train.pretrain"), check=False, timeout=300)
    assert proc.returncode != 0
    assert "pretrain: error: training diverged by step " in proc.stderr, proc.stderr[-3000:]
    assert sound_on_disk(out)
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------- defect 4: damaged checkpoints


@pytest.fixture(scope="module")
def good_run(dataset, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (read only: copy before changing it)."""
    from tests.processes import main_here
    from train.pretrain import main

    out = tmp_path_factory.mktemp("good") / "run"
    code = main_here(main, [*TINY, f"--data.path={dataset}", f"--train.out_dir={out}",
                            "--train.max_steps=4", "--train.log_every=2"])
    assert code == 0
    return out


@pytest.fixture
def run_copy(good_run, tmp_path) -> Path:
    return Path(shutil.copytree(good_run, tmp_path / "run", symlinks=True))


def damage(f: Path) -> None:
    """64 KB overwritten in the middle, the size unchanged."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 65536] = bytes(len(data[mid:mid + 65536]))
    f.write_bytes(bytes(data))


def poison(ckpt: Path, manifest: bool = True) -> None:
    """NaN in one weight tensor, written with a matching manifest (or none: an older checkpoint)."""
    from safetensors.torch import save_file

    state = load_model_weights(ckpt)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / MANIFEST).unlink()
    if manifest:
        write_manifest(ckpt)


@TRAINS
def test_every_checkpoint_has_a_manifest_of_its_files(good_run):
    for _, ckpt in step_dirs(good_run / "checkpoints"):
        sums = json.loads((ckpt / MANIFEST).read_text())["sha256"]
        files = {f.relative_to(ckpt).as_posix() for f in ckpt.rglob("*") if f.is_file()}
        assert set(sums) == files - {MANIFEST} and "model.safetensors" in sums


@TRAINS
def test_a_damaged_or_nan_checkpoint_is_refused_by_load_pretrained_naming_the_file(run_copy):
    ckpt = resolve_checkpoint(run_copy)
    assert ckpt.name == "step-00000004"
    damage(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(run_copy)
    msg = str(e.value)
    assert "\n" not in msg and f"'{ckpt / 'model.safetensors'}' is damaged" in msg
    assert msg.endswith("pass another checkpoint")

    poison(ckpt)
    with pytest.raises(CheckpointError, match=r"hold NaN, infinite or astronomically large"):
        load_pretrained(ckpt)
    poison(ckpt, manifest=False)  # an older checkpoint: no manifest, its weights still checked
    with pytest.raises(CheckpointError, match=r"hold NaN"):
        load_pretrained(ckpt)


@TRAINS
def test_a_checkpoint_without_manifest_is_still_accepted(run_copy):
    for _, ckpt in step_dirs(run_copy / "checkpoints"):
        (ckpt / MANIFEST).unlink()
    ckpt, _, model = load_pretrained(run_copy)
    saved = load_model_weights(ckpt)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@TRAINS
@pytest.mark.parametrize("harm", ["damaged", "nan"])
def test_resume_auto_passes_over_a_bad_checkpoint_and_says_so(harm, run_copy, dataset, capsys):
    ckpts = run_copy / "checkpoints"
    bad = ckpts / "step-00000004"
    damage(bad / "model.safetensors") if harm == "damaged" else poison(bad)
    args = [*TINY, f"--data.path={dataset}", f"--train.out_dir={run_copy}",
            "--train.max_steps=6", "--train.log_every=2"]
    got = run_here([*args, f"--resume={bad}"], capsys)  # named explicitly: refused
    assert got.returncode == 2
    line = error_line(got.stderr)
    assert line.startswith(f"pretrain: error: checkpoint '{bad}' is unusable"), line

    got = run_here([*args, "--resume"], capsys)
    assert got.returncode == 0, got.stderr[-3000:]
    warning = [line for line in got.stderr.splitlines() if "pretrain: warning:" in line]
    assert len(warning) == 1 and f"'{bad}" in warning[0]
    assert warning[0].endswith(f"resuming from the newest checkpoint that verifies, "
                               f"'{ckpts / 'step-00000002'}'")
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in got.stdout


@TRAINS
def test_the_flag_reads_nothing_back_on_unlogged_steps(dataset, tmp_path, capsys, monkeypatch):
    """No host sync per step: between logged steps (every 4th) and checkpoints (none but the
    final one) neither `step_finite` nor the bookkeeping reads a tensor back from the device."""
    import train.bookkeeping as bookkeeping
    import train.pretrain as pretrain

    reads: list[tuple[int | None, str]] = []
    where: list[int | None] = [None]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if where[0] is not None:
                reads.append((where[0], _name))
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    after_step, step_finite_ = bookkeeping.Bookkeeper.after_step, pretrain.step_finite

    def watched_after_step(self, rec):
        where[0] = rec.step
        try:
            return after_step(self, rec)
        finally:
            where[0] = None

    def watched_step_finite(*a, **kw):
        where[0] = -1
        try:
            return step_finite_(*a, **kw)
        finally:
            where[0] = None
    monkeypatch.setattr(bookkeeping.Bookkeeper, "after_step", watched_after_step)
    monkeypatch.setattr(pretrain, "step_finite", watched_step_finite)
    run_here([*TINY, f"--data.path={dataset}", f"--train.out_dir={tmp_path / 'run'}",
              "--train.log_every=4", "--train.checkpoint_every=0", "--train.max_steps=10"],
             capsys, check=True)
    steps = {s for s, _ in reads}
    assert -1 not in steps, reads  # step_finite: never
    assert steps <= {4, 8, 10}, reads  # the logged steps only
    assert {4, 8, 10} <= steps  # where the loss and the flag are read
