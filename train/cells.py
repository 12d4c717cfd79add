"""One cell of an experiment: a pretraining under fixed settings for a fixed budget, launched as
any pretraining is (`accelerate launch -m train.pretrain`), then its evaluation: the run's kNN top-1
and contrastive accuracy from its summary, and a linear probe of its final checkpoint. The row of
one cell is what `tools.study` puts in a grid and what `tools.bench_quality` compares with its
peer, so both share this runner, and both check the same thing: that every run trained its whole
budget (`budget_check`: the run's training clock within BUDGET_TOLERANCE of the budget).

    summary = pretrain(PretrainJob(config, overrides, run_dir, budget, device_type, threads))
    top1 = probe_top1(cfg, features, train_split, eval_split, (n_train, n_eval), device)

An interrupted cell resumes: `pretrain` continues a run directory that holds a checkpoint with
`--resume auto` (the training clock and the budget's plan ride in the checkpoint, so the resumed
run still trains the budget once in total), restarts one that holds none with `--overwrite`, and
returns at once (the run says it is finished) for a run that ended.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_TOLERANCE = 0.02  # a run's training seconds may differ from its budget by this share


class CellFailed(RuntimeError):
    """A pretraining that did not end well; the message says why (its log's last line)."""


class CellInterrupted(RuntimeError):
    """The pretraining stopped on a signal (its checkpoint kept): run the cell again to resume."""


@dataclass(frozen=True)
class Budget:
    """How long every cell trains: `seconds` of training (train.time_budget_s), else `epochs`
    (optim.epochs), else `max_steps` (train.max_steps); all 0: the recipe's own setting."""

    seconds: float = 0.0
    epochs: int = 0
    max_steps: int = 0

    def overrides(self) -> list[str]:
        if self.seconds > 0:
            return [f"--train.time_budget_s={self.seconds:g}"]
        out = ["--train.time_budget_s=0"] if self.epochs or self.max_steps else []
        if self.epochs:
            out.append(f"--optim.epochs={self.epochs}")
        if self.max_steps:
            out.append(f"--train.max_steps={self.max_steps}")
        return out

    def describe(self) -> str:
        if self.seconds > 0:
            return f"{self.seconds:g} s of training"
        parts = [f"{self.epochs} epochs"] if self.epochs else []
        parts += [f"at most {self.max_steps} steps"] if self.max_steps else []
        return ", ".join(parts) or "the recipe's length"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(device_type: str, threads: int, processes: int | None = None) -> list[str]:
    """`accelerate launch -m train.pretrain` as the README launches it: on the GPUs, one process
    per local device (`--multi_gpu` over several, on a free port); on the CPU one process with
    `threads` intra-op threads (Accelerate gives it one otherwise)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if device_type == "cuda":
        if processes is None:
            import torch

            processes = max(1, torch.cuda.device_count())
        if processes > 1:
            cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
        cmd += ["--num_processes", str(processes)]
    else:
        cmd += ["--num_processes", "1", "--num_cpu_threads_per_process", str(threads)]
    return [*cmd, "-m", "train.pretrain"]


def launch_env(device_type: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if device_type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
    return env


@dataclass(frozen=True)
class PretrainJob:
    """One pretraining: the recipe, its overrides (`--section.key=value`), where it runs, how."""

    config: str
    overrides: tuple[str, ...]
    run_dir: Path
    budget: Budget = field(default_factory=Budget)
    device_type: str = "cpu"
    threads: int = 1
    timeout: float | None = None  # seconds before the pretraining is killed (None: never)
    processes: int | None = None  # on GPUs (None: one per local device)

    def command(self) -> list[str]:
        # absolute paths: the pretraining runs in the repository
        return [*launch_command(self.device_type, self.threads, self.processes), "--config",
                str(Path(self.config).resolve()), f"--train.out_dir={self.run_dir.resolve()}",
                *self.budget.overrides(), *self.overrides, *resume_flags(self.run_dir)]


def resume_flags(run_dir: Path) -> list[str]:
    """`--resume auto` where the run directory holds a checkpoint (or the run's summary: a
    finished run says so and returns), `--overwrite` where a run began there without writing
    one (it starts again), nothing for a new directory."""
    from train.run_dir import earlier_run

    ckpts = run_dir / "checkpoints"
    if (run_dir / "summary.json").is_file() or (ckpts.is_dir() and any(ckpts.iterdir())):
        return ["--resume", "auto"]
    return ["--overwrite"] if run_dir.is_dir() and earlier_run(run_dir) else []


def pretrain(job: PretrainJob, log: Path) -> dict:
    """Run `job` (its output into `log`) and return the run's summary.json with `train_s`, the
    run's training clock at its end (every invocation together), added. CellFailed when it
    fails, CellInterrupted when it stopped on a signal; a SIGTERM or Ctrl-C that reaches this
    process is passed on to the pretraining, which checkpoints before it exits."""
    summary_path = job.run_dir / "summary.json"
    summary = _finished(summary_path)
    if summary is not None:  # ended earlier: nothing to launch
        summary["train_s"] = train_seconds(job.run_dir, summary)
        return summary
    cmd = job.command()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        rc = _run(cmd, launch_env(job.device_type, job.threads), out, job.timeout)
    if rc != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        raise CellFailed(f"pretraining exited with status {rc}: "
                         f"{lines[-1].strip() if lines else 'no output'} (log: {log})")
    if not summary_path.is_file():
        raise CellFailed(f"pretraining wrote no {summary_path} (log: {log})")
    summary = json.loads(summary_path.read_text())
    if summary.get("signal") or summary.get("interrupted"):
        raise CellInterrupted(f"the pretraining in {job.run_dir} stopped on "
                              f"{summary.get('signal') or 'a signal'}; its checkpoint is kept: "
                              f"run again to resume it")
    summary["train_s"] = train_seconds(job.run_dir, summary)
    return summary


def _finished(summary_path: Path) -> dict | None:
    """The summary of a run that ended (not stopped by a signal), else None."""
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("signal") or summary.get("interrupted"):
        return None
    return summary


def _run(cmd: list[str], env: dict, out, timeout: float | None) -> int:
    """The command's exit status; a SIGTERM to this process is passed on to it (the launcher's
    death stops the pretraining as a signal would: it checkpoints) and raises CellInterrupted."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    previous = signal.getsignal(signal.SIGTERM)
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    in_main = _main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, forward)
    try:
        try:
            rc = proc.wait(timeout=timeout)
            if stopped:
                raise CellInterrupted("stopped by SIGTERM: the pretraining checkpoints as it "
                                      "stops; run again to resume it")
            return rc
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise CellFailed(f"still training after {timeout:.0f} s: stopped (its last "
                             f"checkpoint is kept)") from None
        except KeyboardInterrupt:  # Ctrl-C reached the pretraining too (one process group)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train_seconds(run_dir: Path, summary: dict | None = None) -> float | None:
    """The run's training clock where it ended (evaluations excluded, every invocation of a
    resumed run together): the final checkpoint's `train_seconds`, else the last kNN point's."""
    from train.checkpoint import CheckpointError, read_trainer_state

    ckpt = Path(str((summary or {}).get("checkpoint") or ""))
    if ckpt.name and ckpt.is_dir():
        try:
            seconds = read_trainer_state(ckpt).get("train_seconds")
            if seconds is not None:
                return float(seconds)
        except CheckpointError:
            pass
    last = None
    log = run_dir / "log.jsonl"
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("event") == "knn" and "train_s" in r:
            last = float(r["train_s"])
    return last


def budget_check(train_s: float | None, budget_s: float,
                 tolerance: float = BUDGET_TOLERANCE) -> dict:
    """Whether a run trained its whole budget: {"train_s", "budget_s", "ratio", "ok"} (ok: the
    training seconds within `tolerance` of the budget; None without a budget)."""
    if not budget_s or budget_s <= 0:
        return {"train_s": train_s, "budget_s": None, "ratio": None, "ok": None}
    if train_s is None or not math.isfinite(train_s):
        return {"train_s": None, "budget_s": budget_s, "ratio": None, "ok": False}
    ratio = train_s / budget_s
    return {"train_s": train_s, "budget_s": budget_s, "ratio": ratio,
            "ok": abs(ratio - 1) <= tolerance + 1e-9}  # 102/100 - 1 is 0.02 + 2e-17


def budget_warning(name: str, check: dict) -> str | None:
    """One line when a run did not train its budget (None when it did or had none)."""
    if check["ok"] is not False:
        return None
    if check["train_s"] is None:
        return f"{name}: its training seconds are unknown (budget {check['budget_s']:g} s)"
    return (f"{name}: trained {check['train_s']:.1f} s of its {check['budget_s']:g} s budget "
            f"({100 * (check['ratio'] - 1):+.1f}%, beyond +-{100 * BUDGET_TOLERANCE:g}%)")


# ---------------------------------------------------------------- evaluation

def probe_top1(cfg, features, train_split, eval_split, probe: tuple[int, int],
               device="cpu") -> float:
    """Linear-probe top-1 (train.linear_eval's protocol) of `features(split, indices) -> (x, y)`
    on seeded subsets of `probe` = (train images, evaluation images) (0: the whole split)."""
    from train.linear_eval import linear_probe, subset

    train_idx = subset(len(train_split), probe[0] or None, cfg.train.seed)
    eval_idx = subset(len(eval_split), probe[1] or None, cfg.train.seed + 1)
    tx, ty = features(train_split, train_idx)
    ex, ey = features(eval_split, eval_idx)
    return linear_probe(tx, ty, ex, ey, l2_grid=cfg.eval.l2_grid,
                        val_fraction=cfg.eval.val_fraction, max_iter=cfg.eval.max_iter,
                        seed=cfg.train.seed, search=cfg.eval.l2_search, device=device)["top1"]


def network_features(cfg, net, device):
    """`features(split, indices)` of a frozen network on the evaluation view."""
    import torch

    from train.features import extract_features

    net = net.to(device).to(memory_format=torch.channels_last)
    kw = dict(batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers)
    return lambda split, idx: extract_features(net, split, cfg.augment, indices=idx, **kw)


def probe_eval_count(eval_split, probe: tuple[int, int]) -> int:
    """How many evaluation images `probe_top1` scores (`probe`[1], 0 = the whole split)."""
    return min(len(eval_split), probe[1]) if probe[1] else len(eval_split)


def probe_run(run_dir: Path, probe: tuple[int, int], device="cpu",
              features: tuple[str, ...] = ("h",)) -> tuple[dict[str, float], int]:
    """({"h": top-1, "g": top-1, ...}, the evaluation images scored): the linear probe of the
    run's final checkpoint on each of `features` (h the encoder's output, g the head's)."""
    from pipelines.sources import open_dataset
    from train.checkpoint import load_pretrained

    _, cfg, model = load_pretrained(run_dir)
    ds = open_dataset(cfg.data.path)
    train_split, eval_split = ds.split(cfg.data.train_split), ds.split(cfg.data.eval_split)
    return ({f: probe_top1(cfg, network_features(cfg, model.features(f), device), train_split,
                           eval_split, probe, device) for f in features},
            probe_eval_count(eval_split, probe))


def cell_row(summary: dict, budget: Budget, batch_size: int) -> dict:
    """A cell's figures from its run's summary (`pretrain`'s, with train_s): kNN top-1, the
    contrastive accuracy of the last logged step, images/s over the whole training clock, the
    training seconds and the budget check."""
    train_s = summary.get("train_s")
    steps = int(summary.get("steps") or 0)
    ips = steps * batch_size / train_s if train_s else summary.get("images_per_s")
    return {"knn_top1": summary.get("knn_top1"), "contrastive_acc": summary.get("contrastive_acc"),
            "images_per_s": ips, "steps": steps, "epochs": summary.get("epochs"),
            "train_s": train_s, "budget": budget_check(train_s, budget.seconds)}


def timed(fn, *args, **kwargs):
    """(fn's result, its wall seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
