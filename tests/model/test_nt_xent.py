"""NT-Xent: every implementation against the naive oracle, which is checked against Algorithm 1."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from model import nt_xent as ntx
from model.nt_xent import NTXentLoss, nt_xent, nt_xent_reference, resolve_impl
from tests.marks import multi

REPO = Path(__file__).resolve().parents[2]
TOL = {torch.float64: (1e-10, 1e-15), torch.float32: (1e-5, 1e-9),  # (rtol, atol) normwise
       torch.float16: (1e-2, 1e-6)}


def algorithm1_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR Algorithm 1 (Chen et al., 2020) as a plain double loop over python floats.

    The views are interleaved as in the paper: z_{2k-1} = z1[k], z_{2k} = z2[k] (0-based here).
    """
    views = []
    for a, b in zip(z1.tolist(), z2.tolist(), strict=True):
        views += [a, b]
    m = len(views)

    def sim(u, v):
        dot = sum(x * y for x, y in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))

    s = [[sim(views[i], views[j]) for j in range(m)] for i in range(m)]

    def ell(i, j):
        denom = sum(math.exp(s[i][k] / tau) for k in range(m) if k != i)
        return -math.log(math.exp(s[i][j] / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(m // 2)) / m


def make_views(n, d, dtype, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "duplicates":  # identical positives and repeated anchors: ties everywhere
        z1[n // 2:] = z1[0]
        z2 = z1.clone()
    elif kind == "near_zero":  # one row below F.normalize's eps, one just above it
        z1[0] *= 1e-13
        z2[-1] *= 1e-9
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()


def loss_and_grads(fn, z1, z2):
    z1 = z1.detach().clone().requires_grad_()
    z2 = z2.detach().clone().requires_grad_()
    loss = fn(z1, z2)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    return loss.detach(), torch.cat([g1, g2])


def loss_and_grad_of(fn, z):
    z = z.detach().clone().requires_grad_()
    loss = fn(z)
    return loss.detach(), torch.autograd.grad(loss, [z])[0]


def assert_close_normwise(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    err = (got.double() - want.double()).abs().max().item()
    bound = rtol * want.double().abs().max().item() + atol
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


CASES = [  # (n, d, block, tau, kind)
    (37, 8, 5, 0.5, "randn"),  # 2N = 74 is no multiple of the block
    (1, 4, 3, 0.2, "randn"),  # 2N = 2: the only candidate is the positive
    (24, 16, 7, 0.05, "randn"),  # tiny temperature: logits up to 20
    (20, 6, 64, 10.0, "randn"),  # large temperature; one block bigger than 2N
    (16, 5, 6, "0.1", "duplicates"),
    (12, 4, 5, 0.5, "near_zero"),
]


def test_algorithm1_loop_equals_reference():
    for n, d, tau in [(5, 3, 0.5), (1, 2, 0.1), (4, 6, 2.0)]:
        z1, z2 = make_views(n, d, torch.float64)
        want = algorithm1_loss(z1.detach(), z2.detach(), tau)
        got = nt_xent_reference(z1, z2, tau).item()
        assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (n, d, tau, got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n,d,block,tau,kind", CASES)
def test_chunked_matches_reference(n, d, block, tau, kind, dtype):
    tau = float(tau)
    z1, z2 = make_views(n, d, dtype, kind)
    want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a, b, tau), z1, z2)
    got_l, got_g = loss_and_grads(lambda a, b: nt_xent(a, b, tau, impl="chunked", block=block),
                                  z1, z2)
    assert got_l.dtype == dtype
    assert torch.isfinite(got_g).all()
    assert_close_normwise(got_l, want_l, dtype, "loss")
    assert_close_normwise(got_g, want_g, dtype, "grad")


def test_chunked_default_block_and_module_match_reference():
    z1, z2 = make_views(300, 12, torch.float64, seed=3)
    want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a, b, 0.3), z1, z2)
    for fn in (lambda a, b: nt_xent(a, b, 0.3), NTXentLoss(0.3, impl="chunked")):
        got_l, got_g = loss_and_grads(fn, z1, z2)
        assert_close_normwise(got_l, want_l, torch.float64, "loss")
        assert_close_normwise(got_g, want_g, torch.float64, "grad")


def test_offset_anchor_rows_match_naive():
    """The form each process runs when gathered: own anchors at row_start, all rows as columns."""
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(3 * 10, 7, generator=g, dtype=torch.float64),
                                      dim=1)
    for row_start in (0, 10, 20):
        want_l, want_g = loss_and_grad_of(
            lambda a, r=row_start: ntx._reference_rows(a, r, 5, 0.4), z)
        got_l, got_g = loss_and_grad_of(
            lambda a, r=row_start: ntx._NTXentRows.apply(a, r, 5, 0.4, "chunked", 3, a.dtype), z)
        assert_close_normwise(got_l, want_l, torch.float64, f"loss row_start={row_start}")
        assert_close_normwise(got_g, want_g, torch.float64, f"grad row_start={row_start}")


def test_chunked_gradcheck():
    z1, z2 = make_views(4, 3, torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3, impl="chunked", block=3),
                                    (z1, z2))


def test_half_inputs_compute_in_float32():
    z1, z2 = make_views(10, 8, torch.bfloat16)
    loss, grads = loss_and_grads(lambda a, b: nt_xent(a, b, 0.5, impl="chunked", block=4), z1, z2)
    assert loss.dtype == torch.float32 and grads.dtype == torch.bfloat16
    want = nt_xent_reference(z1.detach().float(), z2.detach().float(), 0.5)
    assert abs(loss.item() - want.item()) < 1e-5


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_builds_the_full_matrix():
    n, d, block = 256, 16, 32
    m = 2 * n
    z1, z2 = make_views(n, d, torch.float32)
    with _LargestTensor() as seen:
        loss = nt_xent(z1, z2, 0.5, impl="chunked", block=block)
        loss.backward()
    assert seen.largest <= max(m * block, m * d), (seen.largest, m * block)
    with _LargestTensor() as naive:  # the probe does see the naive form's [2N, 2N] matrix
        nt_xent_reference(z1, z2, 0.5).backward()
    assert naive.largest >= m * m


def test_default_block_bounds_memory():
    for m in (2, 1000, 32768, 1 << 20):
        block = ntx.default_block(m, "cpu")
        assert 1 <= block <= m
        assert block * m <= max(ntx._BLOCK_ELEMENTS["cpu"], 32 * m)


# ---------------------------------------------------------------- contrastive accuracy

def brute_force_accuracy(z1: torch.Tensor, z2: torch.Tensor, normalize: bool = True) -> float:
    """Share of the 2N anchors whose positive is strictly more similar than every other candidate,
    counted over the explicit similarity matrix with python floats (a tie counts as wrong)."""
    views = z1.tolist() + z2.tolist()
    if normalize:
        views = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in views]
    m, n = len(views), len(views) // 2
    s = [[sum(x * y for x, y in zip(u, v, strict=True)) for v in views] for u in views]
    hits = 0
    for i in range(m):
        p = (i + n) % m
        hits += all(s[i][p] > s[i][k] for k in range(m) if k not in (i, p))
    return hits / m


def accuracy_cases():
    """(name, z1, z2, accuracy known by construction or None) in float64."""
    eye = torch.eye(8, dtype=torch.float64)
    half = eye.clone()
    half[4:] *= -1
    tie1 = torch.stack([eye[0], eye[0], eye[1]])  # anchors 0 and 1 tie their positive with a
    g = torch.Generator().manual_seed(7)  # negative: only the third pair is right (2 of 6)
    noisy = torch.randn(40, 6, generator=g, dtype=torch.float64)
    return [
        ("all_right", eye, eye.clone(), 1.0),  # positives 1, negatives 0
        ("all_wrong", eye, -eye, 0.0),  # positives -1, negatives 0
        ("collapsed_ties", torch.ones(6, 3, dtype=torch.float64),
         torch.ones(6, 3, dtype=torch.float64), 0.0),  # everything ties: never right
        ("half", eye, half, 0.5),
        ("ties", tie1, tie1.clone(), 2 / 6),
        ("one_pair", eye[:1], eye[1:2], 1.0),  # 2N = 2: the positive is the only candidate
        ("noisy", noisy, noisy + 0.8 * torch.randn(40, 6, generator=g, dtype=torch.float64),
         None),
    ]


@pytest.mark.parametrize("impl,block", [("reference", None), ("chunked", 1), ("chunked", 3),
                                        ("chunked", 64)])
@pytest.mark.parametrize("case", accuracy_cases(), ids=lambda c: c[0])
def test_accuracy_matches_brute_force_count(case, impl, block):
    name, z1, z2, known = case
    want = brute_force_accuracy(z1, z2)
    if known is not None:
        assert want == known, (name, want)
    loss, acc = nt_xent(z1, z2, 0.5, impl=impl, block=block, with_accuracy=True)
    assert acc.dim() == 0 and acc.dtype == torch.float64 and not acc.requires_grad
    assert acc.item() == pytest.approx(want, abs=1e-12), name
    assert 0.0 < want < 1.0 or name != "noisy"


def test_accuracy_leaves_loss_and_gradient_bit_identical():
    """Asking for the accuracy changes nothing in the loss or its gradient, to the bit."""
    for dtype, block in ((torch.float32, 5), (torch.float64, 7)):
        z1, z2 = make_views(37, 8, dtype, seed=8)
        plain_l, plain_g = loss_and_grads(
            lambda a, b, blk=block: nt_xent(a, b, 0.2, impl="chunked", block=blk), z1, z2)
        with_l, with_g = loss_and_grads(
            lambda a, b, blk=block: nt_xent(a, b, 0.2, impl="chunked", block=blk,
                                            with_accuracy=True)[0], z1, z2)
        assert torch.equal(plain_l, with_l) and torch.equal(plain_g, with_g)


def test_accuracy_is_the_same_for_every_block_and_the_reference():
    z1, z2 = make_views(50, 4, torch.float32, seed=9)
    want = nt_xent(z1, z2, 0.5, impl="reference", with_accuracy=True)[1]
    for block in (1, 7, 100):
        got = nt_xent(z1, z2, 0.5, impl="chunked", block=block, with_accuracy=True)[1]
        assert got.item() == want.item() == pytest.approx(brute_force_accuracy(z1, z2))


_INTERPRET_ACCURACY_SCRIPT = textwrap.dedent("""
    import json, torch
    from model import nt_xent as ntx
    from tests.model.test_nt_xent import accuracy_cases, brute_force_accuracy

    def forbid(*a, **k):
        raise AssertionError("chunked path ran instead of triton")
    ntx._chunked_forward = ntx._chunked_backward = forbid
    out = []
    for name, z1, z2, known in accuracy_cases():
        for dtype in (torch.float64, torch.float32):
            a, b = z1.to(dtype), z2.to(dtype)
            plain = ntx.nt_xent(a, b, 0.5, impl="triton", block=16)
            loss, acc = ntx.nt_xent(a, b, 0.5, impl="triton", block=16, with_accuracy=True)
            out.append(dict(case=f"{name}-{dtype}", got=acc.item(),
                            want=brute_force_accuracy(z1, z2), same_loss=bool(loss == plain)))
    print("RESULT " + json.dumps(out))
""")


def test_triton_accuracy_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_ACCURACY_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if (proc.returncode != 0
            and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr):
        pytest.skip("triton's interpreter cannot run loops with runtime bounds under this numpy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 2 * len(accuracy_cases())
    for r in results:
        assert r["got"] == pytest.approx(r["want"], abs=1e-6), r
        assert r["same_loss"], r


# ---------------------------------------------------------------- triton, via its CPU interpreter

_INTERPRET_SCRIPT = textwrap.dedent("""
    import json, torch
    from model import nt_xent as ntx
    from tests.model.test_nt_xent import CASES, make_views, loss_and_grads, loss_and_grad_of

    def forbid(*a, **k):
        raise AssertionError("chunked path ran instead of triton")
    ntx._chunked_forward = ntx._chunked_backward = forbid

    def err(got, want):
        return (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()

    out = []
    for dtype in (torch.float64, torch.float32):
        for n, d, block, tau, kind in CASES:
            tau = float(tau)
            z1, z2 = make_views(n, d, dtype, kind)
            wl, wg = loss_and_grads(lambda a, b: ntx.nt_xent_reference(a, b, tau), z1, z2)
            gl, gg = loss_and_grads(lambda a, b: ntx.nt_xent(a, b, tau, impl="triton", block=16),
                                    z1, z2)
            out.append(dict(case=f"{dtype}-{n}-{d}-{tau}-{kind}", dtype=str(dtype),
                            loss=err(gl, wl), grad=err(gg, wg)))
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(30, 7, generator=g, dtype=torch.float64), dim=1)
    for row_start in (0, 10, 20):
        wl, wg = loss_and_grad_of(lambda a: ntx._reference_rows(a, row_start, 5, 0.4), z)
        gl, gg = loss_and_grad_of(
            lambda a: ntx._NTXentRows.apply(a, row_start, 5, 0.4, "triton", 16, a.dtype), z)
        out.append(dict(case=f"rows-{row_start}", dtype="torch.float64", loss=err(gl, wl),
                        grad=err(gg, wg)))
    # 16-bit operands (fp32 accumulation). The interpreter multiplies raw bfloat16 bit patterns
    # in tl.dot (triton-lang/triton#11584), so float16 stands in for the shared 16-bit path.
    z1, z2 = make_views(40, 24, torch.float16, seed=6)
    wl, wg = loss_and_grads(lambda a, b: ntx.nt_xent_reference(a.float(), b.float(), 0.2), z1, z2)
    gl, gg = loss_and_grads(lambda a, b: ntx.nt_xent(a, b, 0.2, impl="triton", block=16), z1, z2)
    out.append(dict(case="fp16-operands", dtype="torch.float16", loss=err(gl, wl),
                    grad=err(gg, wg)))
    print("RESULT " + json.dumps(out))
""")


def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if (proc.returncode != 0
            and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr):
        import numpy
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run loops with runtime "
                    f"bounds under numpy {numpy.__version__} (int() of a 1-element array); the "
                    f"compiled kernels are unaffected")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 2 * len(CASES) + 4
    for r in results:
        dtype = getattr(torch, r["dtype"].removeprefix("torch."))
        rtol, atol = TOL[dtype]
        for what in ("loss", "grad"):
            e, scale = r[what]
            assert e <= rtol * scale + atol, f"{r['case']} {what}: err {e:.3g}, scale {scale:.3g}"


# ---------------------------------------------------------------- two processes == one

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, z1, z2, tau, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        n = z1.shape[0] // world
        result = {}
        for impl in ("chunked", "reference"):
            a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
            b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
            loss = nt_xent(a, b, tau, impl=impl, block=3)
            loss.backward()
            result[impl] = (loss.detach(), a.grad, b.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@multi
def test_two_processes_equal_one_on_the_concatenated_batch(tmp_path):
    world, n, d, tau = 2, 5, 6, 0.3
    z1, z2 = make_views(world * n, d, torch.float64, seed=4)
    z1, z2 = z1.detach(), z2.detach()
    mp.spawn(_dist_worker, args=(world, _free_port(), z1, z2, tau, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a, b, tau), z1, z2)
    want_g1, want_g2 = want_g[:world * n], want_g[world * n:]
    for impl in ("chunked", "reference"):
        losses = torch.stack([r[impl][0] for r in ranks])
        assert_close_normwise(losses.mean(), want_l, torch.float64, f"{impl} loss")
        # Each rank's gradient is W x the world=1 gradient; DDP divides by W.
        g1 = torch.cat([r[impl][1] for r in ranks]) / world
        g2 = torch.cat([r[impl][2] for r in ranks]) / world
        assert_close_normwise(g1, want_g1, torch.float64, f"{impl} grad z1")
        assert_close_normwise(g2, want_g2, torch.float64, f"{impl} grad z2")
    # The gathered negatives matter: without them the ranks would see a different loss.
    local = nt_xent_reference(z1[:n], z2[:n], tau)
    assert abs(local.item() - ranks[0]["chunked"][0].item()) > 1e-6


# ---------------------------------------------------------------- choosing impl, bad inputs

def test_resolve_impl(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl("auto", "cpu") == "chunked"
    assert resolve_impl("chunked", torch.device("cpu")) == "chunked"
    assert resolve_impl("reference", "cpu") == "reference"
    assert resolve_impl("auto", "cuda", dim=4096) == "chunked"
    assert resolve_impl("auto", "cuda", dtype=torch.float64) == "chunked"
    if ntx._triton_importable():
        assert resolve_impl("auto", "cuda", 128, torch.bfloat16) == "triton"
        assert resolve_impl("triton", "cuda:0") == "triton"
    monkeypatch.setattr(ntx, "_triton_importable", lambda: False)
    assert resolve_impl("auto", "cuda") == "chunked"


def _z(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,match", [
    ((_z(4, 3), _z(5, 3), 0.5), {}, "same shape"),
    ((_z(4), _z(4), 0.5), {}, "2-D"),
    ((_z(2, 4, 3), _z(2, 4, 3), 0.5), {}, "2-D"),
    ((_z(0, 3), _z(0, 3), 0.5), {}, "non-empty"),
    ((_z(4, 3, dtype=torch.int64), _z(4, 3, dtype=torch.int64), 0.5), {}, "floating"),
    ((_z(4, 3), _z(4, 3, dtype=torch.float64), 0.5), {}, "share dtype"),
    ((_z(4, 3), _z(4, 3), 0.0), {}, "temperature"),
    ((_z(4, 3), _z(4, 3), -1.0), {}, "temperature"),
    ((_z(4, 3), _z(4, 3), float("nan")), {}, "temperature"),
    ((_z(4, 3), _z(4, 3), "hot"), {}, "temperature"),
    ((_z(4, 3), _z(4, 3), 0.5), {"impl": "fast"}, "unknown NT-Xent impl"),
    ((_z(4, 3), _z(4, 3), 0.5), {"impl": "triton"}, "needs CUDA"),
    ((_z(4, 3), _z(4, 3), 0.5), {"block": 0}, "block"),
])
def test_bad_inputs_raise_clear_errors(args, kwargs, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kwargs.get("impl") == "triton":
        monkeypatch.setattr(ntx, "_triton_importable", lambda: True)
    with pytest.raises(ValueError, match=match):
        nt_xent(*args, **kwargs)


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="impl"):
        NTXentLoss(0.5, impl="naive")


def test_bench_loss_writes_the_json_schema(tmp_path):
    from tools import bench_loss

    path = tmp_path / "bench.json"
    assert bench_loss.main(["--device", "cpu", "--sizes", "512", "1024", "--dim", "8",
                            "--repeats", "1", "--impls", "reference", "chunked",
                            "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert set(report) == {"device", "versions", "settings", "results"}
    assert report["device"] == "cpu" and "torch" in report["versions"]
    rows = report["results"]
    assert ({tuple(sorted(r)) for r in rows}
            == {("baseline", "case", "impl", "metric", "ratio", "value")})
    by_key = {(r["case"], r["impl"], r["metric"]): r for r in rows}
    for m in ("2N=512", "2N=1024"):
        for metric in ("time_ms", "peak_extra_MiB"):
            ref, ch = by_key[(m, "reference", metric)], by_key[(m, "chunked", metric)]
            assert ref["ratio"] == 1.0 and ch["baseline"] == "reference"
            assert ch["ratio"] == pytest.approx(ch["value"] / ref["value"])
    assert by_key[("largest", "chunked", "largest_2N")]["value"] == 1024


def test_bench_loss_time_budget_stops_growing_2n(tmp_path):
    """The first size always runs; a spent --time-budget stops every impl before the next one."""
    from tools import bench_loss

    path = tmp_path / "bench.json"
    assert bench_loss.main(["--device", "cpu", "--sizes", "256", "512", "1024", "--dim", "8",
                            "--repeats", "1", "--impls", "reference", "chunked",
                            "--time-budget", "1e-6", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert {r["case"] for r in report["results"]} == {"2N=256", "largest"}
    for impl in ("reference", "chunked"):
        assert "--time-budget" in report["settings"]["stopped"][impl]
    assert report["settings"]["time_budget_s"] == 1e-6
    # what a budget keeps: the cheapest impls, dropping the most expensive first
    cost = {"reference": 30.0, "chunked": 12.0, "triton": 4.0}
    assert bench_loss._within_budget(cost, 20.0) == {"chunked", "triton"}
    assert bench_loss._within_budget(cost, 5.0) == {"triton"}
    assert bench_loss._within_budget(cost, 50.0) == set(cost)
    assert bench_loss._within_budget(cost, 1.0) == set()


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_matches_reference(impl, dtype):
    if impl == "triton":
        pytest.importorskip("triton")
    z1, z2 = make_views(1000, 128, torch.float32, seed=5)
    z1, z2 = z1.detach().cuda().to(dtype), z2.detach().cuda().to(dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    want_l, want_g = loss_and_grads(
        lambda a, b: nt_xent_reference(a.float(), b.float(), 0.1), z1, z2)
    got_l, got_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, impl=impl), z1, z2)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(got_l.item() - want_l.item()) <= rtol * abs(want_l.item())
    assert (got_g.float() - want_g.float()).abs().max() <= rtol * want_g.float().abs().max() + 1e-9


def _cuda_fp32_exact():
    """fp32 matmuls in full precision for the duration of a test (tf32 would loosen them)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    return old


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n,d,block,tau,kind", CASES)
def test_cuda_cases_match_reference(n, d, block, tau, kind, dtype, impl):
    """The CPU suite's edge cases on the GPU: 2N = 2, ragged tiles, ties, near-zero rows, tiny and
    large temperatures (triton tiles of 16 rows, so every case has a partial tile)."""
    if impl == "triton":
        pytest.importorskip("triton")
    old = _cuda_fp32_exact()
    try:
        tau = float(tau)
        z1, z2 = make_views(n, d, dtype, kind)
        z1, z2 = z1.detach().cuda(), z2.detach().cuda()
        want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a, b, tau), z1, z2)
        got_l, got_g = loss_and_grads(
            lambda a, b: nt_xent(a, b, tau, impl=impl, block=16 if impl == "triton" else block),
            z1, z2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert got_l.device.type == "cuda" and torch.isfinite(got_g).all()
    assert_close_normwise(got_l, want_l, dtype, f"{impl} loss")
    assert_close_normwise(got_g, want_g, dtype, f"{impl} grad")


@pytest.mark.gpu
@pytest.mark.parametrize("d,block", [(3, None), (100, None), (128, 16), (128, 32), (128, None),
                                     (128, 128), (256, None), (512, None)])
def test_cuda_triton_tiles_and_widths(d, block):
    """2N = 666 is no multiple of any tile; D = 3 and 100 leave masked feature columns; D = 512 is
    the widest triton takes. fp32 operands, ieee products."""
    pytest.importorskip("triton")
    old = _cuda_fp32_exact()
    try:
        z1, z2 = make_views(333, d, torch.float64, seed=d)
        want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a, b, 0.2),
                                        z1.cuda(), z2.cuda())
        z1, z2 = z1.detach().float().cuda(), z2.detach().float().cuda()
        got_l, got_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.2, impl="triton", block=block),
                                      z1, z2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close_normwise(got_l, want_l, torch.float32, f"loss D={d} block={block}")
    assert_close_normwise(got_g, want_g, torch.float32, f"grad D={d} block={block}")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_cuda_offset_anchor_rows_match_naive(impl):
    """The gathered form each process runs: own anchors at row_start, every row a column."""
    if impl == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(3 * 200, 40, generator=g, dtype=torch.float64),
                                      dim=1).cuda()
    for row_start in (0, 200, 400):
        want_l, want_g = loss_and_grad_of(
            lambda a, r=row_start: ntx._reference_rows(a, r, 100, 0.3), z)
        got_l, got_g = loss_and_grad_of(
            lambda a, r=row_start: ntx._NTXentRows.apply(a, r, 100, 0.3, impl,
                                                         16 if impl == "triton" else 7,
                                                         a.dtype), z)
        assert_close_normwise(got_l, want_l, torch.float64, f"{impl} loss row_start={row_start}")
        assert_close_normwise(got_g, want_g, torch.float64, f"{impl} grad row_start={row_start}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_triton_16bit_operands(dtype):
    """16-bit operands on tensor cores, fp32 accumulation: within the rounding of the inputs of the
    fp32 loss of the same (rounded) projections."""
    pytest.importorskip("triton")
    z1, z2 = make_views(2048, 128, torch.float32, seed=9)
    z1, z2 = z1.detach().to(dtype).cuda(), z2.detach().to(dtype).cuda()
    want_l, want_g = loss_and_grads(lambda a, b: nt_xent_reference(a.float(), b.float(), 0.1),
                                    z1, z2)
    got_l, got_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, impl="triton"), z1, z2)
    assert got_l.dtype == torch.float32 and got_g.dtype == dtype
    assert abs(got_l.item() - want_l.item()) <= 1e-2 * abs(want_l.item())
    err = (got_g.float() - want_g.float()).abs().max().item()
    assert err <= 3e-2 * want_g.float().abs().max().item(), err


@pytest.mark.gpu
def test_cuda_triton_large_batch_matches_chunked_and_stays_small():
    """2N = 40,000 (about 6 GB as a naive fp32 matrix): triton equals chunked, and the peak extra
    memory of a triton forward+backward is O(2N x D), not O((2N)^2)."""
    pytest.importorskip("triton")
    old = _cuda_fp32_exact()
    try:
        z1, z2 = make_views(20000, 128, torch.float32, seed=11)
        z1, z2 = z1.detach().cuda(), z2.detach().cuda()
        want_l, want_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, impl="chunked"), z1, z2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        got_l, got_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.1, impl="triton"), z1, z2)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close_normwise(got_l, want_l, torch.float32, "loss")
    assert_close_normwise(got_g, want_g, torch.float32, "grad")
    m, d = 40000, 128
    assert peak <= 16 * m * d * 4, f"peak extra memory {peak / 2**20:.0f} MiB for 2N={m}, D={d}"


@pytest.mark.gpu
def test_cuda_triton_step_never_syncs_with_the_host():
    """Forward and backward enqueue kernels only: no .item(), no host copy of a device value."""
    pytest.importorskip("triton")
    z1, z2 = make_views(512, 64, torch.float32, seed=12)
    z1, z2 = z1.detach().cuda().requires_grad_(), z2.detach().cuda().requires_grad_()
    nt_xent(z1, z2, 0.1, impl="triton").backward()  # compile the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = nt_xent(z1, z2, 0.1, impl="triton")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.mark.gpu
def test_cuda_triton_accuracy_matches_chunked_and_leaves_the_loss_alone():
    """The compiled kernel's negative running max (WITH_NEG_MAX): the same accuracy as chunked,
    the loss bit-identical to the plain call, ties counted wrong."""
    pytest.importorskip("triton")
    old = _cuda_fp32_exact()
    try:
        for name, z1, z2, _ in accuracy_cases():
            z1, z2 = z1.float().cuda(), z2.float().cuda()
            plain = nt_xent(z1, z2, 0.5, impl="triton")
            loss, acc = nt_xent(z1, z2, 0.5, impl="triton", with_accuracy=True)
            want = nt_xent(z1, z2, 0.5, impl="chunked", with_accuracy=True)[1]
            assert torch.equal(loss, plain), name
            assert acc.item() == want.item() == pytest.approx(
                brute_force_accuracy(z1.cpu().double(), z2.cpu().double())), name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
