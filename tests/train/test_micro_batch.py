"""The micro-batched step (train.micro_batch, gradient caching) against the plain step, in float64.

Oracles: with BatchNorm frozen (eval mode) the plain step on the whole batch; in train mode a
plain step whose forward runs the same chunks one after another while keeping the whole graph
(so BatchNorm normalises each chunk alone and updates its running statistics once per chunk);
across two gloo processes, one process on the same global batch ordered so that its chunks hold
the images the processes' chunks hold together (global BN)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.global_batchnorm import convert_to_global_bn
from model.nt_xent import nt_xent
from model.simclr import SimCLR
from pipelines.spec import TwoViewBatch
from tests.marks import multi
from tests.processes import free_port
from train.step import Criterion, chunks, micro_batched_step, two_view_step

B = 10  # images per batch (each two views)
NTX, REF = Criterion(0.5, "chunked"), Criterion(0.5, "reference")  # NT-Xent at temperature 0.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SimCLR("resnet18", width=0.125, small_stem=True, head_out=16).double()


def _batch(n: int = B, seed: int = 1) -> TwoViewBatch:
    g = torch.Generator().manual_seed(seed)
    v1, v2 = (torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64) for _ in range(2))
    return TwoViewBatch(v1, v2, torch.zeros(n, dtype=torch.long), torch.arange(n))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in model.named_buffers()}


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights: gradients compared


def _assert_same(got: dict, want: dict, rtol=1e-10, atol=1e-13) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def _chunkwise_reference(model, batch: TwoViewBatch, micro: int, temperature: float,
                         scale: float = 1.0, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The plain step whose BatchNorm normalises each chunk alone: every chunk forward with
    autograd, the whole graph kept, one loss, one backward."""
    with autocast():
        zs = [model(torch.cat([batch.view1[r], batch.view2[r]]))[1].chunk(2)
              for r in chunks(len(batch.index), micro)]
    z1, z2 = (torch.cat(z) for z in zip(*zs))
    if z1.dtype == torch.bfloat16:
        z1, z2 = z1.float(), z2.float()
    loss = nt_xent(z1, z2, temperature, impl="reference")
    (loss * scale).backward()
    return loss.detach()


def _brute_force_accuracy(model, batch: TwoViewBatch) -> float:
    """The share of the 2N anchors whose positive is strictly the most cosine-similar of the
    other 2N-1 views, counted one anchor at a time (the model in eval mode)."""
    with torch.no_grad():
        z = torch.nn.functional.normalize(model(torch.cat([batch.view1, batch.view2]))[1], dim=1)
    n, hits = len(batch.index), 0
    for i in range(2 * n):
        sims = [(z[i] @ z[k]).item() for k in range(2 * n) if k != i]
        pos = (z[i] @ z[(i + n) % (2 * n)]).item()
        hits += sum(s >= pos for s in sims) == 1  # only the positive itself reaches it
    return hits / (2 * n)


def test_chunks_cover_the_batch_in_order():
    assert chunks(10, 0) == [slice(0, 10)]
    assert chunks(10, 10) == chunks(10, 12) == [slice(0, 10)]
    assert chunks(10, 5) == [slice(0, 5), slice(5, 10)]
    assert chunks(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    for rows in range(1, 20):
        for m in range(1, 22):
            got = [i for s in chunks(rows, m) for i in range(rows)[s]]
            assert got == list(range(rows))
            assert all(s.stop - s.start <= m for s in chunks(rows, m))


@pytest.mark.parametrize("micro", [5, 3, 1], ids=["divides", "does-not-divide", "one-image"])
def test_frozen_batchnorm_gives_the_plain_steps_gradients(micro):
    plain, chunked = _model().eval(), _model().eval()
    batch = _batch()
    want, want_acc = two_view_step(plain, _sgd(plain), batch, REF, loss_scale=2.0)
    got, got_acc = micro_batched_step(chunked, _sgd(chunked), batch, NTX, micro, loss_scale=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got_acc.item() == want_acc.item() == _brute_force_accuracy(plain, batch)
    _assert_same(_grads(chunked), _grads(plain))
    _assert_same(_stats(chunked), _stats(plain), rtol=0, atol=0)  # eval mode: untouched


def test_without_chunks_the_step_is_the_plain_one_bit_for_bit():
    a, b = _model(), _model()
    batch = _batch()
    two_view_step(a, _sgd(a), batch, NTX)
    for micro in (0, B, B + 3):
        c = _model()
        two_view_step(c, _sgd(c), batch, NTX, micro_batch=micro)
        _assert_same(_grads(c), _grads(a), rtol=0, atol=0)
    two_view_step(b, _sgd(b), batch, NTX, micro_batch=3)
    assert any(not torch.equal(g, _grads(a)[k]) for k, g in _grads(b).items()), \
        "train-mode chunks must change BatchNorm's statistics, hence the gradients"


@pytest.mark.parametrize("micro", [5, 3])
def test_train_mode_equals_a_step_whose_batchnorm_sees_each_chunk(micro):
    ref, chunked = _model().train(), _model().train()
    batch = _batch()
    want = _chunkwise_reference(ref, batch, micro, 0.5, scale=2.0)
    got, _ = micro_batched_step(chunked, _sgd(chunked), batch, NTX, micro, loss_scale=2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    _assert_same(_grads(chunked), _grads(ref))
    # the running statistics were updated once per chunk: by the second pass only (were the
    # first pass's updates kept too, each count would be twice the chunks)
    _assert_same(_stats(chunked), _stats(ref))
    counts = {k: int(v) for k, v in _stats(chunked).items() if k.endswith("num_batches_tracked")}
    assert set(counts.values()) == {len(chunks(B, micro))}


def test_compiled_model_takes_the_same_step():
    """torch.compile (aot_eager: dynamo's graphs without a C++ toolchain) traces both passes, the
    no-grad and the autograd one, and the running statistics put back between them."""
    eager, compiled = _model().train(), _model().train()
    batch = _batch()
    micro_batched_step(eager, _sgd(eager), batch, NTX, 4)
    step_model = torch.compile(compiled, backend="aot_eager")
    micro_batched_step(step_model, _sgd(compiled), batch, NTX, 4)
    _assert_same(_grads(compiled), _grads(eager), rtol=1e-9, atol=1e-12)
    _assert_same(_stats(compiled), _stats(eager), rtol=1e-9, atol=1e-12)


def test_bf16_autocast_step_equals_the_reference_under_autocast():
    """Mixed precision: the chunks run under autocast, the loss and its gradient in float32; the
    reference runs the same bf16 forward, so only the backward's summation order differs."""
    ref, chunked = _model().float().train(), _model().float().train()
    b = _batch()
    batch = TwoViewBatch(b.view1.float(), b.view2.float(), b.label, b.index)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    want = _chunkwise_reference(ref, batch, 4, 0.5, autocast=bf16)
    loss, _ = micro_batched_step(chunked, _sgd(chunked), batch, NTX, 4, autocast=bf16)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    got, want = _grads(chunked), _grads(ref)
    flat = [torch.cat([g.flatten() for g in d.values()]) for d in (got, want)]
    cos = torch.nn.functional.cosine_similarity(*flat, dim=0)
    assert cos > 0.999, f"bf16 gradients point elsewhere (cosine {cos:.5f})"


# ---------------------------------------------------------------- two gloo processes

WORLD_BATCH, LOCAL, MICRO = 8, 4, 2


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = convert_to_global_bn(_model().train(), torch.device("cpu"))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        whole = _batch(WORLD_BATCH)
        rows = slice(LOCAL * rank, LOCAL * rank + LOCAL)
        batch = TwoViewBatch(whole.view1[rows], whole.view2[rows], whole.label[rows],
                             whole.index[rows])
        loss, _ = micro_batched_step(ddp, _sgd(model), batch, NTX, MICRO,
                                  no_sync=ddp.no_sync)
        queue.put((rank, loss.item(), {k: v.numpy().copy() for k, v in _grads(model).items()},
                   {k: v.numpy().copy() for k, v in _stats(model).items()}))
    finally:
        dist.destroy_process_group()


@multi
@pytest.mark.timeout(180)
def test_two_processes_equal_one_process_at_the_same_global_batch():
    """Each process takes half the batch in chunks of MICRO; global BN normalises chunk k of both
    processes together. One process sees the same global batch ordered so that its chunks of
    2 x MICRO hold exactly those images: the loss (the mean over processes), the gradients (DDP's
    average) and the running statistics are the same."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=150) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    whole = _batch(WORLD_BATCH)
    order = torch.tensor([i for k in range(LOCAL // MICRO) for r in range(2)
                          for i in range(r * LOCAL + k * MICRO, r * LOCAL + (k + 1) * MICRO)])
    batch = TwoViewBatch(whole.view1[order], whole.view2[order], whole.label[order], order)
    model = _model().train()
    loss, _ = micro_batched_step(model, _sgd(model), batch, NTX, 2 * MICRO)

    assert (results[0][1] + results[1][1]) / 2 == pytest.approx(loss.item(), rel=1e-12)
    for rank in range(2):  # DDP averaged the gradients; both processes hold the same
        _assert_same({k: torch.from_numpy(v) for k, v in results[rank][2].items()},
                     _grads(model), rtol=1e-9, atol=1e-12)
        _assert_same({k: torch.from_numpy(v) for k, v in results[rank][3].items()},
                     _stats(model), rtol=1e-9, atol=1e-12)
