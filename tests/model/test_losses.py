"""SimCLR's contrastive losses (model/losses.py) against the paper's per-triplet formulas (Table 2)
written out over python floats; chunked against the naive form; accuracy against a brute count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from model import losses as L
from model.losses import ContrastiveLoss, contrastive_loss, resolve_loss_impl
from model.nt_xent import nt_xent
from tests.marks import multi
from tests.model.test_nt_xent import (
    REPO,
    _free_port,
    _LargestTensor,
    accuracy_cases,
    assert_close_normwise,
    brute_force_accuracy,
    loss_and_grads,
    make_views,
)

NEW = [("nt_logistic", False), ("nt_logistic", True), ("margin_triplet", False),
       ("margin_triplet", True)]
SIMS = ["cosine", "dot"]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_loss(z1, z2, loss, tau, margin, similarity="cosine", semi_hard=False) -> float:
    """Table 2's per-triplet terms, averaged over each anchor's triplets (u, v+, v-), then over the
    2N anchors; with semi_hard, each anchor's one triplet uses the negative closest to it among
    those less similar than its positive, else its least similar negative."""
    views = z1.tolist() + z2.tolist()
    if similarity == "cosine":
        views = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in views]
    m, n = len(views), len(views) // 2
    s = [[sum(x * y for x, y in zip(u, v, strict=True)) for v in views] for u in views]
    total = 0.0
    for i in range(m):
        p = (i + n) % m
        negatives = [k for k in range(m) if k not in (i, p)]
        chosen = negatives
        if semi_hard and negatives:
            farther = [k for k in negatives if s[i][k] < s[i][p]]
            chosen = ([max(farther, key=lambda k: s[i][k])] if farther
                      else [min(negatives, key=lambda k: s[i][k])])
        if loss == "nt_logistic":
            terms = [-_log_sigmoid(s[i][p] / tau) - _log_sigmoid(-s[i][k] / tau) for k in chosen]
            total += sum(terms) / len(terms) if terms else -_log_sigmoid(s[i][p] / tau)
        else:
            terms = [max(s[i][k] - s[i][p] + margin, 0.0) for k in chosen]
            total += sum(terms) / len(terms) if terms else 0.0
    return total / m


CASES = [  # (n, d, block, tau, margin, kind)
    (13, 6, 4, 0.5, 0.5, "randn"),  # 2N = 26: several blocks, the last one partial
    (1, 3, 2, 0.3, 0.2, "randn"),  # 2N = 2: no negative at all
    (2, 3, 1, 0.3, 0.2, "randn"),  # 2N = 4, one-row blocks
    (10, 5, 64, 0.1, 1.0, "randn"),  # one block bigger than 2N; tiny temperature
    (8, 4, 3, 2.0, 0.3, "ties"),  # repeated rows, small integers: exact ties in any sum order
]


def views(n, d, dtype, kind, seed=0):
    """make_views, and for "ties" its duplicates rounded to small integers, so that every dot
    product is exact whatever the order of summation and tied similarities are exactly equal."""
    if kind != "ties":
        return make_views(n, d, dtype, kind, seed)
    z1, z2 = make_views(n, d, torch.float64, "duplicates", seed)
    return [(2 * z).round().to(dtype).detach().requires_grad_() for z in (z1, z2)]


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("loss,semi_hard", NEW)
def test_reference_equals_the_paper_formula(loss, semi_hard, similarity):
    for n, d, _, tau, margin, kind in CASES:
        z1, z2 = views(n, d, torch.float64, kind, seed=n)
        z1, z2 = z1.detach(), z2.detach()
        want = paper_loss(z1, z2, loss, tau, margin, similarity, semi_hard)
        got = contrastive_loss(z1, z2, loss=loss, temperature=tau, margin=margin,
                               similarity=similarity, semi_hard=semi_hard, impl="reference")
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14), (n, kind)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("loss,semi_hard", NEW)
def test_chunked_matches_reference_loss_and_gradient(loss, semi_hard, similarity, dtype):
    for n, d, block, tau, margin, kind in CASES:
        z1, z2 = views(n, d, dtype, kind, seed=n + 1)
        kw = dict(loss=loss, temperature=tau, margin=margin, similarity=similarity,
                  semi_hard=semi_hard)
        want_l, want_g = loss_and_grads(
            lambda a, b, kw=kw: contrastive_loss(a, b, impl="reference", **kw), z1, z2)
        got_l, got_g = loss_and_grads(
            lambda a, b, kw=kw, blk=block: contrastive_loss(a, b, impl="chunked", block=blk,
                                                            **kw), z1, z2)
        assert got_l.dtype == dtype and torch.isfinite(got_g).all()
        what = f"n={n} block={block} {kind}"
        assert_close_normwise(got_l, want_l, dtype, f"loss {what}")
        assert_close_normwise(got_g, want_g, dtype, f"grad {what}")


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("loss,semi_hard", NEW)
def test_chunked_gradcheck(loss, semi_hard, similarity):
    """Finite differences, independent of both forms' gradients (no kink near these points)."""
    z1, z2 = make_views(4, 3, torch.float64, seed=21)
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_loss(a, b, loss=loss, temperature=0.4, margin=0.3,
                                      similarity=similarity, semi_hard=semi_hard,
                                      impl="chunked", block=3), (z1, z2))


def test_nt_xent_through_the_api_is_nt_xent_and_dot_is_the_unnormalised_formula():
    z1, z2 = make_views(11, 5, torch.float64, seed=3)
    plain_l, plain_g = loss_and_grads(lambda a, b: nt_xent(a, b, 0.3, impl="chunked", block=4),
                                      z1, z2)
    api_l, api_g = loss_and_grads(
        lambda a, b: contrastive_loss(a, b, temperature=0.3, impl="chunked", block=4), z1, z2)
    assert torch.equal(plain_l, api_l) and torch.equal(plain_g, api_g)

    def naive_dot(a, b, tau=0.3):  # Eq. 1 with sim(u, v) = u^T v: a loop over the anchors
        z = torch.cat([a, b])
        m, n = z.shape[0], a.shape[0]
        terms = []
        for i in range(m):
            others = torch.cat([z[:i], z[i + 1:]]) @ z[i] / tau
            terms.append(torch.logsumexp(others, 0) - z[(i + n) % m] @ z[i] / tau)
        return torch.stack(terms).mean()

    want_l, want_g = loss_and_grads(naive_dot, z1, z2)
    for impl, block in (("reference", None), ("chunked", 4), ("chunked", 64)):
        got_l, got_g = loss_and_grads(
            lambda a, b, i=impl, blk=block: contrastive_loss(a, b, temperature=0.3,
                                                             similarity="dot", impl=i,
                                                             block=blk), z1, z2)
        assert_close_normwise(got_l, want_l, torch.float64, f"{impl} loss")
        assert_close_normwise(got_g, want_g, torch.float64, f"{impl} grad")


def test_half_inputs_compute_in_float32():
    z1, z2 = make_views(10, 8, torch.bfloat16)
    for loss, semi_hard in NEW:
        got, grads = loss_and_grads(
            lambda a, b, lo=loss, sh=semi_hard: contrastive_loss(a, b, loss=lo, semi_hard=sh,
                                                                 impl="chunked", block=4), z1, z2)
        assert got.dtype == torch.float32 and grads.dtype == torch.bfloat16
        want = contrastive_loss(z1.detach().float(), z2.detach().float(), loss=loss,
                                semi_hard=semi_hard, impl="reference")
        assert abs(got.item() - want.item()) < 1e-5


# ---------------------------------------------------------------- contrastive accuracy

@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("loss,semi_hard", [("nt_xent", False)] + NEW)
def test_accuracy_matches_brute_force_count(loss, semi_hard, similarity):
    for name, z1, z2, known in accuracy_cases():
        want = brute_force_accuracy(z1, z2, normalize=similarity == "cosine")
        if known is not None and similarity == "cosine":
            assert want == known, name
        for impl, block in (("reference", None), ("chunked", 1), ("chunked", 3)):
            loss_value, acc = contrastive_loss(z1, z2, loss=loss, semi_hard=semi_hard,
                                               similarity=similarity, impl=impl, block=block,
                                               with_accuracy=True)
            assert acc.dim() == 0 and not acc.requires_grad
            assert acc.item() == pytest.approx(want, abs=1e-12), (name, impl, block)
            plain = contrastive_loss(z1, z2, loss=loss, semi_hard=semi_hard,
                                     similarity=similarity, impl=impl, block=block)
            assert torch.equal(plain, loss_value), (name, impl)


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("loss,semi_hard", NEW)
def test_chunked_never_builds_the_full_matrix(loss, semi_hard):
    n, d, block = 128, 16, 16
    m = 2 * n
    z1, z2 = make_views(n, d, torch.float32)
    with _LargestTensor() as seen:
        value, _ = contrastive_loss(z1, z2, loss=loss, semi_hard=semi_hard, impl="chunked",
                                    block=block, with_accuracy=True)
        value.backward()
    assert seen.largest <= max(m * block, m * d), (seen.largest, m * block)
    with _LargestTensor() as naive:  # the probe does see the naive form's [2N, 2N] matrix
        contrastive_loss(z1, z2, loss=loss, semi_hard=semi_hard, impl="reference").backward()
    assert naive.largest >= m * m


# ---------------------------------------------------------------- triton: NT-Xent on dot products

_INTERPRET_DOT_SCRIPT = textwrap.dedent("""
    import json, torch
    from model import losses, nt_xent as ntx
    from tests.model.test_nt_xent import make_views, loss_and_grads

    def forbid(*a, **k):
        raise AssertionError("chunked path ran instead of triton")
    ntx._chunked_forward = ntx._chunked_backward = forbid
    out = []
    for n, d, seed in ((37, 8, 0), (5, 20, 1)):
        z1, z2 = make_views(n, d, torch.float64, seed=seed)
        kw = dict(temperature=0.7, similarity="dot", with_accuracy=True)
        wl, wg = loss_and_grads(
            lambda a, b: losses.contrastive_loss(a, b, impl="reference", **kw)[0], z1, z2)
        gl, gg = loss_and_grads(
            lambda a, b: losses.contrastive_loss(a, b, impl="triton", block=16, **kw)[0], z1, z2)
        wa = losses.contrastive_loss(z1, z2, impl="reference", **kw)[1].item()
        ga = losses.contrastive_loss(z1, z2, impl="triton", block=16, **kw)[1].item()
        err = lambda x, y: ((x - y).abs().max().item(), y.abs().max().item())
        out.append(dict(case=f"{n}-{d}", loss=err(gl, wl), grad=err(gg, wg), acc=(ga, wa)))
    print("RESULT " + json.dumps(out))
""")


def test_triton_dot_product_nt_xent_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_DOT_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if (proc.returncode != 0
            and "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr):
        pytest.skip("triton's interpreter cannot run loops with runtime bounds under this numpy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    for r in json.loads(line[len("RESULT "):]):
        for what in ("loss", "grad"):
            e, scale = r[what]
            assert e <= 1e-10 * scale + 1e-15, (r["case"], what, e, scale)
        assert r["acc"][0] == r["acc"][1], r


# ---------------------------------------------------------------- two processes == one

CONFIGS = [("nt_xent", False, "cosine"), ("nt_xent", False, "dot")] + [
    (loss, sh, sim) for loss, sh in NEW for sim in SIMS]


def _dist_worker(rank, world, port, z1, z2, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        n = z1.shape[0] // world
        result = {}
        for loss, semi_hard, sim in CONFIGS:
            for impl in ("chunked", "reference"):
                a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
                b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
                value, acc = contrastive_loss(a, b, loss=loss, semi_hard=semi_hard,
                                              similarity=sim, temperature=0.3, margin=0.4,
                                              impl=impl, block=3, with_accuracy=True)
                value.backward()
                result[(loss, semi_hard, sim, impl)] = (value.detach(), acc, a.grad, b.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@multi
def test_two_processes_equal_one_on_the_concatenated_batch(tmp_path):
    world, n, d = 2, 5, 6
    z1, z2 = make_views(world * n, d, torch.float64, seed=4)
    z1, z2 = z1.detach(), z2.detach()
    mp.spawn(_dist_worker, args=(world, _free_port(), z1, z2, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for loss, semi_hard, sim in CONFIGS:
        kw = dict(loss=loss, semi_hard=semi_hard, similarity=sim, temperature=0.3, margin=0.4)
        want_l, want_g = loss_and_grads(
            lambda a, b, kw=kw: contrastive_loss(a, b, impl="reference", **kw), z1, z2)
        want_acc = contrastive_loss(z1, z2, impl="reference", with_accuracy=True, **kw)[1]
        for impl in ("chunked", "reference"):
            key = (loss, semi_hard, sim, impl)
            what = " ".join(map(str, key))
            rows = [r[key] for r in ranks]
            assert_close_normwise(torch.stack([r[0] for r in rows]).mean(), want_l,
                                  torch.float64, f"{what} loss")
            # Each rank's gradient is W x the world=1 gradient; DDP divides by W.
            g = torch.cat([torch.cat([r[2] for r in rows]), torch.cat([r[3] for r in rows])])
            assert_close_normwise(g / world, want_g, torch.float64, f"{what} grad")
            acc = torch.stack([r[1] for r in rows]).mean()
            assert acc.item() == pytest.approx(want_acc.item(), abs=1e-12), what


# ---------------------------------------------------------------- choosing impl, bad inputs

def test_resolve_loss_impl(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for loss in ("nt_logistic", "margin_triplet"):
        assert resolve_loss_impl("auto", loss, "cuda", 128, torch.bfloat16) == "chunked"
        assert resolve_loss_impl("triton", loss, "cpu") == "chunked"
        assert resolve_loss_impl("reference", loss, "cpu") == "reference"
    assert resolve_loss_impl("auto", "nt_xent", "cpu") == "chunked"
    with pytest.raises(ValueError, match="unknown loss impl"):
        resolve_loss_impl("fast", "nt_logistic", "cpu")


def _z(*shape):
    return torch.ones(*shape)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "infonce"}, "unknown contrastive loss"),
    ({"similarity": "euclid"}, "unknown similarity"),
    ({"loss": "nt_xent", "semi_hard": True}, "semi_hard"),
    ({"loss": "nt_logistic", "semi_hard": 1}, "semi_hard must be a bool"),
    ({"loss": "margin_triplet", "margin": -0.1}, "margin"),
    ({"loss": "margin_triplet", "margin": float("nan")}, "margin"),
    ({"loss": "nt_logistic", "temperature": 0.0}, "temperature"),
    ({"loss": "nt_logistic", "impl": "fast"}, "unknown loss impl"),
    ({"loss": "nt_logistic", "block": 0}, "block"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(_z(4, 3), _z(4, 3), **kwargs)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(_z(4, 3), _z(5, 3), loss="nt_logistic")


def test_module_form():
    z1, z2 = make_views(6, 4, torch.float64, seed=5)
    module = ContrastiveLoss("margin_triplet", margin=0.3, semi_hard=True, impl="chunked", block=5)
    assert torch.equal(module(z1, z2), contrastive_loss(z1, z2, loss="margin_triplet", margin=0.3,
                                                        semi_hard=True, impl="chunked", block=5))
    assert "margin_triplet" in repr(module)
    with pytest.raises(ValueError, match="semi_hard"):
        ContrastiveLoss("nt_xent", semi_hard=True)
    with pytest.raises(ValueError, match="unknown ContrastiveLoss settings"):
        ContrastiveLoss("nt_logistic", tau=0.5)
    with pytest.raises(ValueError, match="impl"):
        ContrastiveLoss("nt_logistic", impl="naive")
    assert L.LOSSES == ("nt_xent", "nt_logistic", "margin_triplet")
