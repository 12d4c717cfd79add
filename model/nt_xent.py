"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020, Eq. 1).

Three implementations of one loss:

* ``reference``: the naive full 2N x 2N similarity matrix (the oracle in tests).
* ``chunked``: an ``autograd.Function`` that streams row blocks of the similarity matrix. Forward
  keeps only the per-row logsumexp and positive logit; backward recomputes each block. Peak extra
  memory is O(2N x block + 2N x D) on any device.
* ``triton``: fused CUDA kernels (``model/nt_xent_triton.py``) with an online logsumexp over column
  tiles; never materialises the similarity matrix.

With ``torch.distributed`` initialised (world W > 1) the normalised projections of every process are
all-gathered, each process scores its own 2N anchors against all 2NW columns, and the gradients of
the gathered columns are summed back to their owners.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IMPLS = ("auto", "reference", "chunked", "triton")
# Triton kernels hold a [tile, D] block of z in registers; wider projections use `chunked`.
TRITON_MAX_DIM = 512
# Elements of one [block, 2N] similarity block: ~16 MiB of fp32 on CPU (stays near cache),
# ~256 MiB on CUDA (large enough to keep the GPU busy).
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Naive NT-Xent over the full 2N x 2N similarity matrix (the oracle for faster forms).

    z1, z2: [N, D] projections of the two views. Returns the mean over the 2N anchors of
    -sim(z_i, z_p(i))/tau + logsumexp_{k != i} sim(z_i, z_k)/tau, with cosine similarity.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    n = z1.shape[0]
    logits = z @ z.T / temperature  # [2N, 2N]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # [2N]
    return F.cross_entropy(logits, positive)


# ---------------------------------------------------------------- implementation choice

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device | str, dim: int | None = None,
                 dtype: torch.dtype | None = None) -> str:
    """The implementation `nt_xent(..., impl=impl)` runs for tensors on `device` (of width `dim`
    and dtype `dtype` when given), e.g. for the trainer to log.

    "auto" is "triton" on CUDA when triton imports, D <= TRITON_MAX_DIM and the dtype is not
    float64 (no tensor cores for it), else "chunked". "triton" on a CPU device is accepted only
    under TRITON_INTERPRET=1 (Triton's CPU interpreter).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent impl {impl!r}; expected one of {', '.join(IMPLS)}")
    dev = torch.device(device)
    wide = dim is not None and dim > TRITON_MAX_DIM
    if impl == "auto":
        if dev.type == "cuda" and not wide and dtype != torch.float64 and _triton_importable():
            return "triton"
        return "chunked"
    if impl == "triton":
        if not _triton_importable():
            raise ValueError("impl='triton' needs the triton package, which is not importable")
        if dev.type != "cuda" and not _interpreting():
            raise ValueError(f"impl='triton' needs CUDA tensors, got device {dev.type!r}")
        if wide:
            raise ValueError(f"impl='triton' supports D <= {TRITON_MAX_DIM}, got D={dim}; "
                             "use 'chunked'")
    return impl


def default_block(rows: int, device: torch.device | str) -> int:
    """Row-block size of `chunked` for a [rows, rows] similarity matrix: a fixed element budget."""
    budget = _BLOCK_ELEMENTS.get(torch.device(device).type, _BLOCK_ELEMENTS["cuda"])
    block = max(32, min(4096, budget // max(rows, 1)))
    return min(rows, block)


def _check_inputs(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    if not isinstance(z1, torch.Tensor) or not isinstance(z2, torch.Tensor):
        raise ValueError("z1 and z2 must be tensors")
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(f"z1 and z2 must be 2-D [N, D], got shapes {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"z1 and z2 must be non-empty, got shape {tuple(z1.shape)}")
    if not z1.is_floating_point() or not z2.is_floating_point():
        raise ValueError(f"z1 and z2 must be floating point, got {z1.dtype} and {z2.dtype}")
    if z1.dtype != z2.dtype or z1.device != z2.device:
        raise ValueError(f"z1 and z2 must share dtype and device, got {z1.dtype}/{z1.device} "
                         f"and {z2.dtype}/{z2.device}")
    if isinstance(temperature, bool):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature must be a positive finite number, got {tau}")
    return tau


# ---------------------------------------------------------------- chunked (any device)
# Notation: z [M, D] holds every normalised projection (M = 2N, or 2NW when gathered); the anchors
# are the 2N rows z[row_start : row_start + 2N], and anchor j's positive is row
# row_start + (j + N) mod 2N. S = z_a z^T / tau with the anchor's own column masked.

def _chunked_forward(z: torch.Tensor, row_start: int, n: int, inv_tau: float, block: int,
                     correct: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor logsumexp and positive logit. With `correct` (bool [2N]) also writes whether
    each anchor's positive is strictly more similar than its most similar negative (the
    contrastive accuracy's tie rule), from the same blocks: the positive column is masked for the
    row max of the negatives, then put back, so lse is bit-identical either way."""
    a = 2 * n
    lse = z.new_empty(a)  # [2N]
    pos = z.new_empty(a)  # [2N]
    zt = z.T  # [D, M]
    for r0 in range(0, a, block):
        r1 = min(r0 + block, a)
        s = (z[row_start + r0:row_start + r1] * inv_tau) @ zt  # [b, M]
        cols = row_start + (torch.arange(r0, r1, device=z.device) + n) % a  # [b]
        pos[r0:r1] = s.gather(1, cols[:, None]).squeeze(1)
        s.diagonal(row_start + r0).fill_(float("-inf"))
        if correct is None:
            mx = s.amax(dim=1, keepdim=True)  # [b, 1]; finite: every row has its positive
        else:
            p = pos[r0:r1, None]  # [b, 1]
            s.scatter_(1, cols[:, None], float("-inf"))
            neg_max = s.amax(dim=1, keepdim=True)  # [b, 1]; -inf when there is no negative
            correct[r0:r1] = (p > neg_max).squeeze(1)
            s.scatter_(1, cols[:, None], p)
            mx = torch.maximum(neg_max, p)  # the row max, exactly
        lse[r0:r1] = s.sub_(mx).exp_().sum(dim=1).log_().add_(mx.squeeze(1))
    return lse, pos


def _chunked_backward(z: torch.Tensor, row_start: int, n: int, inv_tau: float, lse: torch.Tensor,
                      scale: torch.Tensor, block: int) -> torch.Tensor:
    """d loss / d z for loss = scale_0 * sum_j (lse_j - pos_j), scale = scale_0 / tau
    (0-dim tensor).

    G = softmax(S) - onehot(positive) per anchor row; dz = scale * (G z + G^T z_a). The softmax part
    is accumulated block by block (rows into the anchors' rows, columns into every row); the one-hot
    part is the same for rows and columns: -scale * z_{p(i)} twice per anchor.
    """
    a = 2 * n
    dz = torch.zeros_like(z)  # [M, D]
    for r0 in range(0, a, block):
        r1 = min(r0 + block, a)
        q = z[row_start + r0:row_start + r1]  # [b, D]
        p = (q * inv_tau) @ z.T  # [b, M]
        p.diagonal(row_start + r0).fill_(float("-inf"))
        p.sub_(lse[r0:r1, None]).exp_().mul_(scale)  # softmax rows, scaled
        dz[row_start + r0:row_start + r1].addmm_(p, z)
        dz.addmm_(p.T, q)
    own = z[row_start:row_start + a]  # [2N, D]
    dz[row_start:row_start + a].sub_(own.roll(n, dims=0) * (2 * scale))
    return dz


# ---------------------------------------------------------------- autograd

class _NTXentRows(torch.autograd.Function):
    """Mean NT-Xent over the 2N anchors z[row_start : row_start + 2N] against all rows of z.

    With with_accuracy=True it returns (loss, accuracy): accuracy is the share of these anchors
    whose positive is strictly the most similar of their candidates, from the same forward pass
    (a 0-dim tensor, not differentiable).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, row_start: int, n: int, temperature: float, impl: str,
                block: int | None, operand_dtype: torch.dtype, with_accuracy: bool = False):
        inv_tau = 1.0 / temperature
        correct = None
        if impl == "triton":
            from model import nt_xent_triton

            if with_accuracy:
                lse, pos, neg_max = nt_xent_triton.forward(
                    z.to(operand_dtype), row_start, n, inv_tau, block=block, acc_dtype=z.dtype,
                    with_neg_max=True)
                correct = pos > neg_max
            else:
                lse, pos = nt_xent_triton.forward(z.to(operand_dtype), row_start, n, inv_tau,
                                                  block=block, acc_dtype=z.dtype)
        else:
            if with_accuracy:
                correct = torch.empty(2 * n, dtype=torch.bool, device=z.device)
            lse, pos = _chunked_forward(z, row_start, n, inv_tau, block, correct)
        ctx.save_for_backward(z, lse)
        ctx.row_start, ctx.n, ctx.inv_tau = row_start, n, inv_tau
        ctx.impl, ctx.block, ctx.operand_dtype = impl, block, operand_dtype
        loss = (lse - pos).mean()
        if not with_accuracy:
            return loss
        accuracy = correct.to(z.dtype).mean()
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        z, lse = ctx.saved_tensors
        # Mean over 2N anchors, and S carries 1/tau: both scale every entry of G.
        scale = grad.to(z.dtype) * (ctx.inv_tau / (2 * ctx.n))  # 0-dim, stays on device
        if ctx.impl == "triton":
            from model import nt_xent_triton

            dz = nt_xent_triton.backward(z.to(ctx.operand_dtype), ctx.row_start, ctx.n, ctx.inv_tau,
                                         lse, scale, block=ctx.block, acc_dtype=z.dtype)
        else:
            dz = _chunked_backward(z, ctx.row_start, ctx.n, ctx.inv_tau, lse, scale, ctx.block)
        return dz, None, None, None, None, None, None, None


class _AllGatherRows(torch.autograd.Function):
    """All-gather [R, D] from every process into [W*R, D]; backward sums the gradients of each
    process's rows from every process (reduce-scatter) and returns the caller's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.world, ctx.rank, ctx.rows = world, rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)  # [W*R, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # gloo has no reduce-scatter: all-reduce a private copy, keep ours
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _reference_rows(z: torch.Tensor, row_start: int, n: int, temperature: float,
                    with_accuracy: bool = False):
    """The naive form for the anchors z[row_start : row_start + 2N] against all rows of z
    (and, with with_accuracy, the share of anchors whose positive logit is strictly above every
    negative's, from the same [2N, M] logits)."""
    a = 2 * n
    logits = z[row_start:row_start + a] @ z.T / temperature  # [2N, M]
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask.diagonal(row_start).fill_(True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = row_start + (torch.arange(a, device=z.device) + n) % a  # [2N]
    loss = F.cross_entropy(logits, positive)
    if not with_accuracy:
        return loss
    with torch.no_grad():
        rows = torch.arange(a, device=z.device)
        pos = logits[rows, positive]
        negatives = logits.index_put((rows, positive), torch.tensor(float("-inf"), dtype=z.dtype,
                                                                    device=z.device))
        accuracy = (pos > negatives.amax(dim=1)).to(z.dtype).mean()
    return loss, accuracy


# ---------------------------------------------------------------- public API

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, impl: str = "auto",
            block: int | None = None, gather: bool = True, with_accuracy: bool = False):
    """NT-Xent loss of SimCLR (Chen et al., 2020, Eq. 1), averaged over the 2N anchors.

    z1, z2: [N, D] projections of the two views (any scale: the loss L2-normalises them, and the
    gradient flows through the normalisation). Row i of z1 and row i of z2 are positives; every
    other row is a negative. Returns a 0-dim tensor: the mean over the anchors i of
    ``-sim(z_i, z_p(i))/tau + logsumexp_{k != i} sim(z_i, z_k)/tau`` (cosine sim), in the input
    dtype (float32 for float16/bfloat16 inputs).

    impl: "auto" | "reference" | "chunked" | "triton" (see `resolve_impl`). block: rows per block
    for "chunked" (default `default_block`), tile size (power of 2, >= 16) for "triton".

    with_accuracy=True returns ``(loss, accuracy)``: the contrastive accuracy of the paper's
    Table 5, the share of this process's 2N anchors whose positive is the most similar of all its
    2N-1 candidates (2NW-1 when gathered). Ties count as wrong: an anchor is correct only when its
    positive is strictly more similar than every negative (so collapsed projections score 0, not
    1). It comes from the loss's own forward pass (each row's max over the negatives, kept beside
    its logsumexp), as a 0-dim tensor on the device in the loss's dtype, without gradient and
    without a host sync; the mean over processes is the global share (every process has 2N
    anchors).

    Distributed convention (torch.distributed initialised, world W > 1, gather=True; every process
    passes the same N): the projections of all processes are all-gathered with gradient, and each
    process returns the mean over its OWN 2N anchors against all 2NW candidates. So the mean of the
    returned values over processes equals the world=1 loss on the concatenated batch
    (z1 = cat_r z1_r, z2 = cat_r z2_r), and the gradient wrt the local z1, z2 is W times the
    gradient of that world=1 loss: the column gradients are summed (not averaged) back to their
    owners, which DDP/Accelerate's gradient averaging over W processes then cancels exactly.
    With gather=False each process uses only its own negatives.
    """
    return _nt_xent(z1, z2, temperature, impl=impl, block=block, gather=gather,
                    with_accuracy=with_accuracy, normalize=True)


def _gathered_rows(z: torch.Tensor, n: int, gather: bool) -> tuple[torch.Tensor, int]:
    """All rows of every process (with gradient) and where this process's 2N anchors start."""
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllGatherRows.apply(z), dist.get_rank() * 2 * n  # [2NW, D]
    return z, 0


def _check_block(block, impl: str) -> None:
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int, got {block!r}")
    if impl == "triton" and block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"triton block must be a power of 2 >= 16, got {block}")


def _nt_xent(z1, z2, temperature, *, impl, block, gather, with_accuracy, normalize):
    """`nt_xent`, with `normalize=False` for the plain dot product u^T v (paper, Table 5's rows
    without l2 norm): every impl takes it, since none normalises inside."""
    tau = _check_inputs(z1, z2, temperature)
    n, dim = z1.shape
    impl = resolve_impl(impl, z1.device, dim, z1.dtype)
    _check_block(block, impl)

    half = z1.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if half else z1.dtype
    # Normalise in >= fp32 (and differentiably) before any gather: it is per row, so local.
    z = torch.cat([z1, z2]).to(compute_dtype)  # [2N, D]
    if normalize:
        z = F.normalize(z, dim=1)
    z, row_start = _gathered_rows(z, n, gather)

    if impl == "reference":
        return _reference_rows(z, row_start, n, tau, with_accuracy)
    if impl == "chunked":
        block = block or default_block(z.shape[0], z.device)
    operand_dtype = z1.dtype if impl == "triton" else compute_dtype
    if with_accuracy:
        return _NTXentRows.apply(z, row_start, n, tau, impl, block, operand_dtype, True)
    return _NTXentRows.apply(z, row_start, n, tau, impl, block, operand_dtype)


class NTXentLoss(nn.Module):
    """Module form of `nt_xent`: ``loss = NTXentLoss(0.5)(z1, z2)`` with z1, z2 [N, D]."""

    def __init__(self, temperature: float = 0.5, impl: str = "auto", block: int | None = None,
                 gather: bool = True):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if impl not in IMPLS:
            raise ValueError(f"unknown NT-Xent impl {impl!r}; expected one of {', '.join(IMPLS)}")
        self.temperature, self.impl, self.block, self.gather = (
            float(temperature), impl, block, gather)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, impl=self.impl, block=self.block,
                       gather=self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather={self.gather}"
