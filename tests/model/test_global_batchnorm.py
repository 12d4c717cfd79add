"""Global BN across gloo processes, with DDP and the gathered NT-Xent, equals one process
(float64)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.global_batchnorm import GlobalBatchNorm, convert_to_global_bn
from model.nt_xent import nt_xent
from model.simclr import SimCLR
from tests.marks import multi


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SimCLR("resnet18", width=0.125, small_stem=True, head_out=16).double()


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(16, 3, 12, 12, generator=g, dtype=torch.float64),
            torch.randn(16, 3, 12, 12, generator=g, dtype=torch.float64))


def _worker(rank: int, port: int, ddp: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = convert_to_global_bn(_model(), torch.device("cpu"))
        assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 21
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model)
        v1, v2 = _views()
        rows = slice(8 * rank, 8 * rank + 8)
        _, z = model(torch.cat([v1[rows], v2[rows]]))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, 0.5, impl="chunked")
        loss.backward()
        inner = model.module if ddp else model
        queue.put((rank, loss.item(),
                   {k: p.grad.numpy().copy() for k, p in inner.named_parameters()},
                   {k: b.numpy().copy() for k, b in inner.named_buffers() if "running" in k}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@multi
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_two_processes_equal_one_process(ddp):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, ddp, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=150) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    model = _model()  # one process, plain BatchNorm, the whole batch
    v1, v2 = _views()
    _, z = model(torch.cat([v1, v2]))
    z1, z2 = z.chunk(2)
    loss = nt_xent(z1, z2, 0.5, impl="reference")
    loss.backward()

    assert (results[0][1] + results[1][1]) / 2 == pytest.approx(loss.item(), rel=1e-12)
    for name, p in model.named_parameters():
        g0, g1 = torch.from_numpy(results[0][2][name]), torch.from_numpy(results[1][2][name])
        # DDP averages the ranks' gradients; without DDP we average them here.
        got = g0 if ddp else (g0 + g1) / 2
        torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, b in model.named_buffers():
        if "running" in name:
            torch.testing.assert_close(torch.from_numpy(results[0][3][name]), b, rtol=1e-9,
                                       atol=1e-12)


def test_single_process_falls_back_to_batchnorm():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).double()
    gbn = convert_to_global_bn(torch.nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(gbn, GlobalBatchNorm) and gbn.weight.dtype == torch.float64
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(gbn(x), torch.nn.BatchNorm2d(4).double()(x))
