"""Precision: native-bf16 detection against /proc/cpuinfo, what `auto` picks, and a bf16 autocast
step on the CPU that keeps the parameters, LARS, BatchNorm's statistics and the loss in float32."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import pytest
import torch

from model.simclr import SimCLR
from pipelines.spec import TwoViewBatch
from train import precision
from train.lars import LARS, lars_param_groups
from train.step import Criterion, two_view_step


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="reads the x86 flags of /proc/cpuinfo")
def test_native_bf16_is_what_the_cpus_flags_say():
    """Oracle: the kernel's list of the CPU's features (AVX512-BF16, or AMX with its bf16 unit)."""
    flags = _cpuinfo_flags()
    assert precision.cpu_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags), flags


def test_an_arm_cpu_is_native_when_its_features_list_bf16(monkeypatch, tmp_path):
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", info)
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert precision.cpu_native_bf16()
    info.write_text("processor\t: 0\nFeatures\t: fp asimd sve i8mm\nflags\t: bf16\n")
    assert not precision.cpu_native_bf16()  # only the Features line counts
    info.unlink()
    assert not precision.cpu_native_bf16()  # unreadable: no claim


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_a_gpu_and_on_a_native_bf16_cpu_only(native, monkeypatch):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    assert precision.accelerate_precision("auto", cuda=True) == "bf16"
    assert precision.accelerate_precision("auto", cuda=False) == ("bf16" if native else "no")
    for cuda in (True, False):  # an explicit choice is kept
        assert precision.accelerate_precision("fp32", cuda) == "no"
        assert precision.accelerate_precision("bf16", cuda) == "bf16"


def _model() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR("resnet18", width=0.125, small_stem=True, head_out=16).train()


def _step(autocast) -> tuple[SimCLR, LARS, torch.Tensor, dict]:
    model = _model()
    opt = LARS(lars_param_groups(model, 1e-6), lr=0.5, momentum=0.9, eta=0.001)
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(16, 3, 16, 16, generator=g) for _ in range(2))
    batch = TwoViewBatch(v1, v2, torch.zeros(16, dtype=torch.long), torch.arange(16))
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is kept
            seen[name] = output.dtype
        return hook

    hooks = [m.register_forward_hook(record(n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    loss, _ = two_view_step(model, opt, batch, Criterion(0.5, "chunked"), autocast)
    for h in hooks:
        h.remove()
    return model, opt, loss, seen


def test_a_bf16_step_on_the_cpu_keeps_the_float32_state():
    """The convolutions run in bf16; the loss, the parameters, LARS's momentum and BatchNorm's
    running statistics stay float32, and the step is the float32 step's to bf16's precision."""
    ref, _, ref_loss, ref_seen = _step(precision.autocast("no", "cpu"))
    got, opt, loss, seen = _step(precision.autocast("bf16", "cpu"))
    assert set(ref_seen.values()) == {torch.float32} and set(seen.values()) == {torch.bfloat16}
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    assert all(p.dtype == torch.float32 for p in got.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
    assert all(p.grad.dtype == torch.float32 for p in got.parameters())
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (got, ref)]
    # the same direction to bf16's 8 significant bits: 0.95 at this tiny width at initialisation,
    # where the gradient is small beside the rounding; a gradient lost or of another sign is not
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.9
    stats = dict(got.named_buffers())
    for name, want in ref.named_buffers():
        assert stats[name].dtype == want.dtype  # float32 (the count int64)
        if want.is_floating_point():
            torch.testing.assert_close(stats[name], want, rtol=0.05, atol=0.02)


@pytest.mark.slow(reason="pretrains two steps in this process under CPU bf16 autocast, which "
                         "runs several times slower than float32 on CPUs without native bf16")
@pytest.mark.timeout(600)
def test_pretraining_in_bf16_on_the_cpu_records_it(tmp_path_factory, tmp_path, capsys):
    from tests.fashion_mnist import subset_dataset
    from tests.train.test_pretrain import TINY, records, run_here

    data = subset_dataset(tmp_path_factory, 256, 128)  # test_pretrain's slice, built once
    run_here([*TINY, f"--data.path={data}", "--train.max_steps=2",
              "--train.mixed_precision=bf16", f"--train.out_dir={tmp_path / 'run'}"], capsys,
             check=True)
    start = next(r for r in records(tmp_path / "run") if r.get("event") == "start")
    assert start["precision"] == "bf16"
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
