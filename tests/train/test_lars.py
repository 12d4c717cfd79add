"""LARS: the multi-tensor optimizer against the per-parameter oracle and against closed forms."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from train.lars import LARS, LARSReference, lars_param_groups

PATHS = ["numba", "foreach"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Each CPU test runs on both fast paths: numba, and the foreach ops GPUs take."""
    if request.param == "foreach":
        import train.lars_numba as lars_numba

        def unexpected(*args):
            raise AssertionError("the numba path ran while the foreach path was under test")

        monkeypatch.setattr(LARS, "_numba_on_cpu", False)
        monkeypatch.setattr(lars_numba, "adapted_step", unexpected)
    return request.param


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(5),
    )


def _net() -> nn.Module:
    net = _small_net()
    net(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer
    return net


def _set_grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _run(opt_cls, net, steps, lrs=None, wd=1e-4, grad_scale=1.0, **kw):
    params = list(net.parameters())
    opt = opt_cls(lars_param_groups(net, wd), lr=0.5, **kw)
    for s in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[s]
        _set_grads(params, s, grad_scale)
        opt.step()
    return opt


def _assert_close(a: nn.Module | list, b: nn.Module | list, rtol=2e-5, atol=1e-6):
    pa = list(a.parameters()) if isinstance(a, nn.Module) else a
    pb = list(b.parameters()) if isinstance(b, nn.Module) else b
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_matches_reference_over_steps_with_lr_changes(path):
    net, ref = _net(), _net()
    lrs = [0.5, 0.5, 2.0, 0.1, 0.0, 1.0]  # includes a mid-run jump and a zero LR
    # decay term and gradient of similar size, so both are far above float32 rounding
    kw = dict(lrs=lrs, wd=0.05, grad_scale=0.01, momentum=0.9, eta=0.01)
    opt = _run(LARS, net, len(lrs), **kw)
    ref_opt = _run(LARSReference, ref, len(lrs), **kw)
    _assert_close(net, ref)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   ref_opt.state[q]["momentum_buffer"], rtol=2e-5, atol=1e-7)
    # the run moved every parameter, so agreement above is not vacuous
    for p, q in zip(net.parameters(), _net().parameters(), strict=True):
        assert not torch.equal(p, q)


def _numba_calls(monkeypatch) -> list[int]:
    """Records the size of every tensor the numba kernel stepped (a silent fallback fails tests)."""
    import train.lars_numba as lars_numba

    kernel = lars_numba._lars_kernel
    calls = []

    def counting(w, *args):
        calls.append(w.size)
        return kernel(w, *args)

    monkeypatch.setattr(lars_numba, "_lars_kernel", counting)
    return calls


@pytest.fixture
def two_threads(torch_threads):
    torch_threads(2)


def test_numba_matches_reference_step_by_step_on_two_threads(monkeypatch, two_threads):
    # excluded groups, a zero weight (trust 1), a zero gradient with wd > 0 (u = wd w), a group with
    # wd = 0 and zero gradient (u = 0, trust 1), float and tensor LRs changing mid-run, a zero LR
    net, ref = _net(), _net()
    extra = [torch.zeros(3, 4), torch.full((2, 5), 0.5), torch.full((4, 2), -1.0)]
    zero_w, zero_g, still = [t.clone().requires_grad_() for t in extra]
    zero_w_r, zero_g_r, still_r = [t.clone().requires_grad_() for t in extra]

    def groups(model, zw, zg, st):
        gs = lars_param_groups(model, 0.05)
        gs[0]["params"] = gs[0]["params"] + [zw, zg]
        return gs + [{"params": [st], "weight_decay": 0.0}]

    kw = dict(lr=0.5, momentum=0.9, eta=0.01)
    opt = LARS(groups(net, zero_w, zero_g, still), **kw)
    ref_opt = LARSReference(groups(ref, zero_w_r, zero_g_r, still_r), **kw)
    ours = list(net.parameters()) + [zero_w, zero_g, still]
    theirs = list(ref.parameters()) + [zero_w_r, zero_g_r, still_r]
    calls = _numba_calls(monkeypatch)
    lrs = [0.5, 2.0, torch.tensor(0.1), 0.0, torch.tensor(1.0), 0.3]
    for s, lr in enumerate(lrs):
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = lr
        _set_grads(list(net.parameters()), s, 0.01)
        _set_grads(list(ref.parameters()), s, 0.01)
        zero_w.grad, zero_w_r.grad = torch.full((3, 4), 0.2), torch.full((3, 4), 0.2)
        zero_g.grad, zero_g_r.grad = torch.zeros(2, 5), torch.zeros(2, 5)
        still.grad, still_r.grad = torch.zeros(4, 2), torch.zeros(4, 2)
        opt.step()
        ref_opt.step()
        _assert_close(ours, theirs)
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                       ref_opt.state[q]["momentum_buffer"], rtol=2e-5, atol=1e-7)
    # every adapted tensor went through the kernel at every step; excluded ones did not
    adapted = [p for g in opt.param_groups if not g["lars_exclude"] for p in g["params"]]
    assert sorted(calls) == sorted([p.numel() for p in adapted] * len(lrs))
    assert torch.equal(still.detach(), torch.full((4, 2), -1.0))
    assert torch.isfinite(zero_w).all() and not torch.equal(zero_w.detach(), torch.zeros(3, 4))


def test_numba_error_in_a_worker_thread_surfaces_and_nothing_hangs(monkeypatch, two_threads):
    import threading
    import time

    import train.lars_numba as lars_numba

    kernel = lars_numba._lars_kernel

    def failing(w, *args):
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.2)  # leaves the worker thread time to take a tensor
            return kernel(w, *args)
        raise FloatingPointError("kernel failed")

    monkeypatch.setattr(lars_numba, "_lars_kernel", failing)
    net = _net()
    opt = LARS(lars_param_groups(net, 1e-4), lr=0.1)
    _set_grads(list(net.parameters()), 0)
    with pytest.raises(FloatingPointError, match="kernel failed"):
        opt.step()
    monkeypatch.setattr(lars_numba, "_lars_kernel", kernel)
    opt.step()  # the pool still works


def test_non_cpu_tensors_never_reach_the_numba_kernel(monkeypatch):
    w = torch.zeros(3, 3, device="meta", requires_grad=True)
    w.grad = torch.zeros(3, 3, device="meta")
    calls = _numba_calls(monkeypatch)
    LARS([w], lr=0.1).step()
    assert calls == []


def _linear_net() -> nn.Module:
    # no forward pass: torch's own OpenMP kernels can hang in a child forked from a threaded parent
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 4))


def _step_in_child(queue):
    net = _linear_net()
    opt = LARS(lars_param_groups(net, 1e-4), lr=0.1)
    _set_grads(list(net.parameters()), 0)
    opt.step()
    queue.put([p.detach().numpy().copy() for p in net.parameters()])  # plain arrays: no fd sharing


def test_numba_pool_works_in_a_forked_child(two_threads):
    import multiprocessing as mp

    net = _linear_net()
    opt = LARS(lars_param_groups(net, 1e-4), lr=0.1)
    _set_grads(list(net.parameters()), 0)
    opt.step()  # the parent's thread pool exists now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_step_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    for a, b in zip(got, net.parameters(), strict=True):
        assert torch.equal(torch.from_numpy(a), b.detach())


def test_reference_matches_hand_computed_single_step():
    w0 = torch.tensor([[3.0, 4.0]])  # ||w|| = 5
    g = torch.tensor([[0.0, 1.0]])
    lr, wd, eta, m = 0.2, 0.5, 0.01, 0.9
    for cls in (LARSReference, LARS):
        w = w0.clone().requires_grad_()
        w.grad = g.clone()
        opt = cls([w], lr=lr, momentum=m, weight_decay=wd, eta=eta)
        opt.step()
        u = g + wd * w0  # [1.5, 3.0]
        trust = eta * 5.0 / math.sqrt(1.5**2 + 3.0**2)
        torch.testing.assert_close(w.detach(), w0 - lr * trust * u)


def test_excluded_group_is_plain_momentum_sgd_with_lr_in_velocity(path):
    # excluded: v = m v + lr g; w -= v. Velocity keeps the LR of the step that produced it,
    # so a step at lr=0 still moves by m * v (torch's SGD would not move at all).
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    g = torch.tensor([0.5, 0.25])
    opt = LARS([{"params": [w], "lars_exclude": True}], lr=1.0, momentum=0.9, weight_decay=0.1)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) - g)  # no decay, no trust
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) - g - 0.9 * g)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.9 * g)


def test_momentum_accumulates_scaled_updates(path):
    # adapted group with wd=0 and a constant gradient along w: trust = eta ||w|| / ||g|| each step
    w0 = torch.tensor([[2.0, 0.0]])
    g = torch.tensor([[-1.0, 0.0]])
    lr, eta, m = 0.5, 0.1, 0.9
    w = w0.clone().requires_grad_()
    opt = LARS([w], lr=lr, momentum=m, weight_decay=0.0, eta=eta)
    expected, v = w0.clone(), torch.zeros_like(w0)
    for _ in range(3):
        w.grad = g.clone()
        opt.step()
        v = m * v + lr * (eta * expected.norm() / g.norm()) * g
        expected = expected - v
    torch.testing.assert_close(w.detach(), expected)


def test_zero_norm_cases(path):
    lr, wd, eta = 0.3, 1e-2, 1e-3
    w_zero = torch.zeros(2, 3, requires_grad=True)  # ||w|| = 0 -> trust 1
    w_nograd = torch.full((2, 3), 2.0, requires_grad=True)  # g = 0, wd > 0 -> trust eta / wd
    w_still = torch.full((4, 1), -1.0, requires_grad=True)  # g = 0, wd = 0 -> u = 0, trust 1
    g = torch.arange(6.0).reshape(2, 3) - 2.0
    w_zero.grad = g.clone()
    w_nograd.grad = torch.zeros(2, 3)
    w_still.grad = torch.zeros(4, 1)
    opt = LARS([{"params": [w_zero, w_nograd]}, {"params": [w_still], "weight_decay": 0.0}],
               lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    ref_params = [t.detach().clone().requires_grad_() for t in (w_zero, w_nograd, w_still)]
    for r, t in zip(ref_params, (w_zero, w_nograd, w_still), strict=True):
        r.grad = t.grad.clone()
    ref = LARSReference(
        [{"params": ref_params[:2]}, {"params": ref_params[2:], "weight_decay": 0.0}],
        lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    opt.step()
    ref.step()
    torch.testing.assert_close(w_zero.detach(), -lr * g)  # u = g + wd * 0 = g
    # u = wd w, trust = eta ||w|| / (wd ||w||): w <- w (1 - lr eta)
    torch.testing.assert_close(w_nograd.detach(), torch.full((2, 3), 2.0 * (1 - lr * eta)))
    torch.testing.assert_close(w_still.detach(), torch.full((4, 1), -1.0))
    for t in (w_zero, w_nograd, w_still):
        assert torch.isfinite(opt.state[t]["momentum_buffer"]).all()
    _assert_close([w_zero, w_nograd, w_still], ref_params, rtol=1e-6, atol=1e-7)


def test_params_without_grad_are_skipped():
    a = torch.ones(3, 3, requires_grad=True)
    b = torch.ones(3, 3, requires_grad=True)
    a.grad = torch.ones(3, 3)
    opt = LARS([a, b], lr=0.1)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3, 3))
    assert b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3, 3))


def test_layouts_dtypes_and_tensor_lr(path):
    # channels_last weight with channels_last grad, channels_last weight with contiguous grad,
    # float64 next to float32 in one group, and a 0-d tensor LR
    w_cl = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    w_mixed = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    w64 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    params = [w_cl, w_mixed, w64, bias]
    ref_params = [p.detach().clone().requires_grad_() for p in params]

    def grads(step):
        gen = torch.Generator().manual_seed(step)
        out = [0.03 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        out[0] = out[0].to(memory_format=torch.channels_last)
        return out

    groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "lars_exclude": True}]  # noqa: E731
    opt = LARS(groups(params), lr=torch.tensor(0.7), weight_decay=0.1, eta=0.02)
    ref = LARSReference(groups(ref_params), lr=0.7, weight_decay=0.1, eta=0.02)
    for s in range(3):
        for p, r, g in zip(params, ref_params, grads(s), strict=True):
            p.grad, r.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        opt.step()
        ref.step()
    _assert_close(params, ref_params, rtol=1e-5, atol=1e-6)
    assert w64.dtype == torch.float64


class _SyncDetector(TorchDispatchMode):
    """Records every op that copies a tensor value to the host (.item(), bool(t), float(t))."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append(func)
        return func(*args, **(kwargs or {}))


def test_step_never_reads_tensor_values_on_the_host(path):
    net = _net()
    params = list(net.parameters())
    opt = LARS(lars_param_groups(net, 1e-6), lr=torch.tensor(0.3))
    _set_grads(params, 0)
    opt.step()  # state creation on the first step
    _set_grads(params, 1)
    with _SyncDetector() as det:
        opt.step()
    assert det.syncs == []
    # the detector itself works: a Python `if` on a tensor is caught
    with _SyncDetector() as det:
        bool(params[0].norm() > 0)
    assert len(det.syncs) == 1


def _rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def test_converges_on_rosenbrock(path):
    xy = torch.tensor([1.5, 1.5], requires_grad=True)
    opt = LARS([xy], lr=1.0, momentum=0.9, weight_decay=0.0, eta=1e-3)
    start = _rosenbrock(xy).item()
    for _ in range(2000):
        opt.zero_grad()
        _rosenbrock(xy).backward()
        opt.step()
    assert _rosenbrock(xy).item() < 1e-3 * start
    assert torch.dist(xy.detach(), torch.ones(2)) < 0.02


def test_state_dict_resume_is_bit_exact(path):
    steps, cut = 6, 3
    straight = _net()
    straight_opt = _run(LARS, straight, steps)

    first = _net()
    opt = _run(LARS, first, cut)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = LARS(lars_param_groups(resumed, 1e-4), lr=0.5)
    opt2.load_state_dict(ckpt["opt"])
    params = list(resumed.parameters())
    for s in range(cut, steps):
        _set_grads(params, s)
        opt2.step()
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(straight_opt.state[a]["momentum_buffer"],
                           opt2.state[b]["momentum_buffer"])
    assert opt2.param_groups[1]["lars_exclude"] is True


def test_resume_without_momentum_state_would_differ():
    # guards the test above: dropping the optimizer state changes the trajectory
    straight = _net()
    _run(LARS, straight, 4)
    first = _net()
    _run(LARS, first, 2)
    resumed = copy.deepcopy(first)
    opt = LARS(lars_param_groups(resumed, 1e-4), lr=0.5)
    params = list(resumed.parameters())
    for s in range(2, 4):
        _set_grads(params, s)
        opt.step()
    pairs = zip(straight.parameters(), resumed.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_param_groups_exclude_exactly_the_1d_tensors_of_resnet18():
    model = torchvision.models.resnet18()
    groups = lars_param_groups(model, 1e-6)
    assert len(groups) == 2
    adapted, excluded = groups
    assert adapted["lars_exclude"] is False and adapted["weight_decay"] == 1e-6
    assert excluded["lars_exclude"] is True and excluded["weight_decay"] == 0.0

    # independent count, by module type
    want_excluded, want_adapted = set(), set()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            want_excluded |= {id(mod.weight), id(mod.bias)}
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            want_adapted.add(id(mod.weight))
            if mod.bias is not None:
                want_excluded.add(id(mod.bias))
    # 20 convs + fc; 20 BNs x 2 + fc bias
    assert len(want_adapted) == 21 and len(want_excluded) == 41
    assert {id(p) for p in adapted["params"]} == want_adapted
    assert {id(p) for p in excluded["params"]} == want_excluded
    assert len(adapted["params"]) + len(excluded["params"]) == len(list(model.parameters())) == 62

    names = {id(p): n for n, p in model.named_parameters()}
    assert "layer2.0.downsample.1.weight" in {names[id(p)] for p in excluded["params"]}
    # named pairs give the same split
    again = lars_param_groups(model.named_parameters(), 1e-6)
    want = [[id(p) for p in g["params"]] for g in groups]
    assert [[id(p) for p in g["params"]] for g in again] == want


def test_param_groups_skip_frozen_and_drop_empty_groups():
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    groups = lars_param_groups(lin, 1e-6)
    assert len(groups) == 1 and groups[0]["params"] == [lin.weight]
    with pytest.raises(ValueError, match="weight_decay"):
        lars_param_groups(lin, -1.0)
    with pytest.raises(TypeError, match="Tensor"):
        lars_param_groups([1.0], 1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-6}, "weight_decay"),
        ({"lr": 0.1, "eta": 0.0}, "eta"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_bad_group_hyperparameter_raises():
    with pytest.raises(ValueError, match="momentum"):
        LARS([{"params": [torch.zeros(2, 2, requires_grad=True)], "momentum": -0.5}], lr=0.1)


def test_the_path_is_not_a_constructor_argument():
    # the tensors' device picks it; a caller still passing strategy= fails loudly
    with pytest.raises(TypeError, match="strategy"):
        LARS([torch.zeros(2, 2, requires_grad=True)], lr=0.1, strategy="auto")


def test_lr_is_required():
    with pytest.raises(TypeError):
        LARS([torch.zeros(2, 2, requires_grad=True)])  # type: ignore[call-arg]


# ---------------------------------------------------------------- CUDA

def _cuda_run(opt_cls, net, steps, lrs, **kw):
    """Like _run, on the GPU, with the LR as a 0-d device tensor where it is a tensor."""
    params = list(net.parameters())
    opt = opt_cls(lars_param_groups(net, kw.pop("wd")), lr=lrs[0], **kw)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        gen = torch.Generator().manual_seed(1000 + s)
        for p in params:
            p.grad = (0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).to(p.device)
        opt.step()
    return opt


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_cuda_step_matches_reference(tensor_lr):
    """The GPU step (the foreach path) equals the per-parameter oracle."""
    net, ref = _net().cuda(), _net().cuda()
    lrs = [0.5, 0.5, 2.0, 0.1, 0.0, 1.0]
    if tensor_lr:
        lrs = [torch.tensor(x, device="cuda") for x in lrs]
    kw = dict(wd=0.05, momentum=0.9, eta=0.01)
    opt = _cuda_run(LARS, net, len(lrs), lrs, **dict(kw))
    ref_opt = _cuda_run(LARSReference, ref, len(lrs), lrs, **dict(kw))
    _assert_close(net, ref)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert p.is_cuda
        torch.testing.assert_close(opt.state[p]["momentum_buffer"],
                                   ref_opt.state[q]["momentum_buffer"], rtol=2e-5, atol=1e-7)
    for p, q in zip(net.parameters(), _net().parameters(), strict=True):
        assert not torch.equal(p.cpu(), q)


@pytest.mark.gpu
def test_cuda_step_on_resnet50_never_syncs_with_the_host():
    """A whole ResNet-50 step with a device-tensor LR runs without one host synchronisation."""
    net = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    params = list(net.parameters())
    opt = LARS(lars_param_groups(net, 1e-6), lr=torch.tensor(0.3, device="cuda"))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # momentum buffers are created on the first step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all().item() for p in params[:3])
