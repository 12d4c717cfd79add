"""The contrastive losses of SimCLR's loss study (Chen et al., 2020, Sec. 5.1, Tables 2 and 4).

One entry point, `contrastive_loss`, for NT-Xent (`model.nt_xent`, the default), NT-Logistic and
the margin triplet loss, each with cosine similarity (l2-normalised projections, the paper's
default) or the plain dot product, the last two also with semi-hard negative mining; and the
contrastive accuracy of Table 5 from the same forward pass.

Notation (as in Table 2): an anchor u = z_i has one positive v+ = z_p(i) (the other view of the
same image) and the K = 2N - 2 other projections of the batch as negatives v- (K = 2NW - 2 with
negatives gathered from W processes). s(u, v) = u^T v, with u, v l2-normalised for
similarity="cosine" and as they are for "dot"; tau is the temperature, m the margin.

* nt_logistic: Table 2's per-triplet term is ``-log sigma(u^T v+/tau) - log sigma(-u^T v-/tau)``.
  The paper does not say how the K triplets of an anchor are weighed; each anchor's loss here is
  the MEAN over its K triplets, i.e. ``-log sigma(s+/tau) - (1/K) sum_{v-} log sigma(-s-/tau)``:
  the positive and the negatives weigh the same whatever the batch (the one place this is decided
  is `_per_anchor`).
* margin_triplet: Table 2's term is ``max(u^T v- - u^T v+ + m, 0)`` (no temperature); an anchor's
  loss is the mean over its K triplets.
* semi_hard=True: Sec. 5.1 computes "the gradient using semi-hard negative terms (i.e., those that
  are within the loss margin and closest in distance, but farther than positive examples)", after
  FaceNet (Schroff et al., 2015). Here each anchor keeps ONE negative, the one closest to it among
  those strictly farther than the positive: k* = argmax {s(u, v-) : s(u, v-) < s(u, v+)} (farther
  means less similar, in the similarity the loss uses); when no negative is farther than the
  positive, the farthest negative, argmin s(u, v-), as TensorFlow's triplet_semihard_loss does.
  The anchor's loss is then its one triplet's term, so a mined negative beyond the margin adds
  nothing to the triplet loss ("within the loss margin"). The margin only enters the triplet loss:
  NT-Logistic has none, so its mined negative is the same k* and its term the logistic one.
  Mining is not defined for NT-Xent (the paper applies it to the other two), and is refused.
* When an anchor has no negative at all (2N = 2, one process) the negative terms are 0.

The loss is the mean over the anchors, with `model.nt_xent`'s distributed convention (projections
all-gathered with gradient; each process returns the mean over its own 2N anchors against every
gathered column, so the mean over processes is the world=1 loss on the concatenated batch and
the local gradient is W times its gradient, which DDP's averaging cancels).

Implementations: "reference" writes the formulas over the full [2N, M] similarity matrix (the
tests' oracle); "chunked" streams row blocks of it in forward and recomputes them in backward
(NT-Logistic, margin triplet), or keeps just the mined negative's index per anchor (semi-hard:
its backward touches 3 rows per anchor), so the extra memory is O(block x M), never O(M^2).
There are no Triton kernels for NT-Logistic and the margin triplet: "auto" and "triton" run
"chunked" for them (`resolve_loss_impl`). NT-Xent takes every impl with either similarity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from model import nt_xent as _ntx

LOSSES = ("nt_xent", "nt_logistic", "margin_triplet")
SIMILARITIES = ("cosine", "dot")


def resolve_loss_impl(impl: str, loss: str, device: torch.device | str, dim: int | None = None,
                      dtype: torch.dtype | None = None) -> str:
    """The implementation `contrastive_loss(..., loss=loss, impl=impl)` runs, e.g. for a log line.

    nt_xent: `model.nt_xent.resolve_impl` (Triton on CUDA for "auto", cosine or dot alike).
    nt_logistic, margin_triplet: "reference" stays; "auto", "chunked" and "triton" run
    "chunked" (there are no Triton kernels for them).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown contrastive loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "nt_xent":
        return _ntx.resolve_impl(impl, device, dim, dtype)
    if impl not in _ntx.IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; expected one of {', '.join(_ntx.IMPLS)}")
    return "reference" if impl == "reference" else "chunked"


def _check_number(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0) or (not positive and x < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite "
                         f"number, got {x}")
    return x


# ---------------------------------------------------------------- the formulas, in one place

def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = -log sigma(-x), exactly (F.softplus returns x itself above 20, off by e^-x)
    and 0 at -inf."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _per_anchor(loss: str, s_pos: torch.Tensor, neg_term_sum: torch.Tensor, weight: float,
                inv_tau: float) -> torch.Tensor:
    """An anchor's loss from its positive similarity and the sum of its negative terms, weighed by
    `weight` (1/K for the mean over the K triplets, 1 for the mined one, 0 without negatives)."""
    if loss == "nt_logistic":
        return _softplus(-s_pos * inv_tau) + neg_term_sum * weight  # -log sigma(x) = softplus(-x)
    return neg_term_sum * weight


def _neg_terms(loss: str, s_neg: torch.Tensor, s_pos: torch.Tensor, inv_tau: float,
               margin: float) -> torch.Tensor:
    """Each negative's term: -log sigma(-s-/tau) = softplus(s-/tau), or max(s- - s+ + m, 0).
    s_pos broadcasts against s_neg; an s_neg of -inf (not a negative) gives 0."""
    if loss == "nt_logistic":
        return _softplus(s_neg * inv_tau)
    return (s_neg - s_pos + margin).clamp(min=0)


def _weight(m: int, semi_hard: bool) -> float:
    k = m - 2  # negatives per anchor
    if k <= 0:
        return 0.0
    return 1.0 if semi_hard else 1.0 / k


# ---------------------------------------------------------------- reference (the oracle)

def _reference_rows(z: torch.Tensor, row_start: int, n: int, *, loss: str, inv_tau: float,
                    margin: float, semi_hard: bool, with_accuracy: bool):
    """The naive form over the full [2N, M] similarity matrix of the anchors
    z[row_start : row_start + 2N] against all rows of z."""
    a, m = 2 * n, z.shape[0]
    sim = z[row_start:row_start + a] @ z.T  # [2N, M]
    rows = torch.arange(a, device=z.device)
    positive = row_start + (rows + n) % a  # [2N]
    neg = torch.ones(a, m, dtype=torch.bool, device=z.device)
    neg[rows, row_start + rows] = False
    neg[rows, positive] = False
    s_pos = sim[rows, positive]  # [2N]
    if semi_hard:
        with torch.no_grad():
            farther = neg & (sim < s_pos[:, None])
            closest_farther = sim.masked_fill(~farther, float("-inf")).argmax(dim=1)
            farthest = sim.masked_fill(~neg, float("inf")).argmin(dim=1)
            mined = torch.where(farther.any(dim=1), closest_farther, farthest)  # [2N]
        neg_sum = _neg_terms(loss, sim[rows, mined], s_pos, inv_tau, margin)
    else:
        terms = _neg_terms(loss, sim, s_pos[:, None], inv_tau, margin)
        neg_sum = torch.where(neg, terms, torch.zeros_like(terms)).sum(dim=1)
    value = _per_anchor(loss, s_pos, neg_sum, _weight(m, semi_hard), inv_tau).mean()
    if not with_accuracy:
        return value
    with torch.no_grad():
        best_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1)
        accuracy = (s_pos > best_neg).to(z.dtype).mean()
    return value, accuracy


# ---------------------------------------------------------------- chunked (any device)

def _block_negatives(z: torch.Tensor, row_start: int, n: int, r0: int, r1: int):
    """Similarities of anchors r0..r1 against every row, with the anchor's own column and its
    positive's set to -inf (so [b, M] holds negatives only), the positive similarities [b, 1] and
    the positive columns [b]."""
    a = 2 * n
    q = z[row_start + r0:row_start + r1]  # [b, D]
    s = q @ z.T  # [b, M]
    cols = row_start + (torch.arange(r0, r1, device=z.device) + n) % a  # [b]
    p = s.gather(1, cols[:, None])  # [b, 1]
    s.diagonal(row_start + r0).fill_(float("-inf"))
    s.scatter_(1, cols[:, None], float("-inf"))
    return q, s, p, cols


class _ContrastiveRows(torch.autograd.Function):
    """Mean NT-Logistic or margin-triplet loss over the 2N anchors z[row_start : row_start + 2N]
    against all rows of z, one row block of the similarity matrix at a time (optionally with the
    contrastive accuracy, not differentiable)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, row_start: int, n: int, loss: str, inv_tau: float,
                margin: float, semi_hard: bool, block: int, with_accuracy: bool):
        a, m = 2 * n, z.shape[0]
        weight = _weight(m, semi_hard)
        per = z.new_empty(a)
        s_pos = z.new_empty(a)
        correct = torch.empty(a, dtype=torch.bool, device=z.device) if with_accuracy else None
        mined = torch.empty(a, dtype=torch.long, device=z.device) if semi_hard else None
        for r0 in range(0, a, block):
            r1 = min(r0 + block, a)
            _, s, p, _ = _block_negatives(z, row_start, n, r0, r1)
            s_pos[r0:r1] = p.squeeze(1)
            if correct is not None:
                correct[r0:r1] = (p > s.amax(dim=1, keepdim=True)).squeeze(1)
            if semi_hard:
                # argmax/argmin take the first of equal values, as the reference does.
                farther = s.masked_fill(s >= p, float("-inf"))
                closest_idx = farther.argmax(dim=1)
                farthest_idx = s.masked_fill(s == float("-inf"), float("inf")).argmin(dim=1)
                has = farther.gather(1, closest_idx[:, None]).squeeze(1) > float("-inf")
                k = torch.where(has, closest_idx, farthest_idx)
                mined[r0:r1] = k
                neg_sum = _neg_terms(loss, s.gather(1, k[:, None]).squeeze(1), p.squeeze(1),
                                     inv_tau, margin)
            else:
                neg_sum = _neg_terms(loss, s, p, inv_tau, margin).sum(dim=1)
            per[r0:r1] = _per_anchor(loss, p.squeeze(1), neg_sum, weight, inv_tau)
        ctx.save_for_backward(z, *(() if mined is None else (mined,)))
        ctx.row_start, ctx.n, ctx.loss, ctx.inv_tau = row_start, n, loss, inv_tau
        ctx.margin, ctx.semi_hard, ctx.block, ctx.weight = margin, semi_hard, block, weight
        value = per.mean()
        if not with_accuracy:
            return value
        accuracy = correct.to(z.dtype).mean()
        ctx.mark_non_differentiable(accuracy)
        return value, accuracy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *unused):
        z = ctx.saved_tensors[0]
        n, row_start, inv_tau, margin, w = ctx.n, ctx.row_start, ctx.inv_tau, ctx.margin, ctx.weight
        a = 2 * n
        scale = grad.to(z.dtype) / a  # the mean over the 2N anchors; 0-dim, stays on device
        if ctx.semi_hard:
            return (_mined_backward(z, ctx.saved_tensors[1], row_start, n, ctx.loss, inv_tau,
                                    margin, w, scale),) + (None,) * 8
        dz = torch.zeros_like(z)
        for r0 in range(0, a, ctx.block):
            r1 = min(r0 + ctx.block, a)
            q, s, p, cols = _block_negatives(z, row_start, n, r0, r1)
            # g[j, k] = d loss_j / d s(z_j, z_k); 0 on the -inf (own) column by construction.
            if ctx.loss == "nt_logistic":
                g = torch.sigmoid(s.mul_(inv_tau)).mul_(inv_tau * w)
                g_pos = -torch.sigmoid(-p * inv_tau) * inv_tau  # [b, 1]
            else:
                g = (s.sub_(p) > -margin).to(z.dtype).mul_(w)  # active: s- - s+ + m > 0
                g_pos = -g.sum(dim=1, keepdim=True)
            g.scatter_(1, cols[:, None], g_pos).mul_(scale)
            dz[row_start + r0:row_start + r1].addmm_(g, z)
            dz.addmm_(g.T, q)
        return dz, None, None, None, None, None, None, None, None


def _mined_backward(z, mined, row_start, n, loss, inv_tau, margin, w, scale):
    """d loss / d z with one mined negative per anchor: three rows per anchor, no block."""
    a = 2 * n
    anchors = row_start + torch.arange(a, device=z.device)
    positive = row_start + (torch.arange(a, device=z.device) + n) % a
    u, vp, vn = z[anchors], z[positive], z[mined]  # [2N, D] each
    s_pos, s_neg = (u * vp).sum(dim=1), (u * vn).sum(dim=1)
    if loss == "nt_logistic":
        g_pos = -torch.sigmoid(-s_pos * inv_tau) * inv_tau
        g_neg = torch.sigmoid(s_neg * inv_tau) * (inv_tau * w)
    else:
        g_neg = (s_neg - s_pos + margin > 0).to(z.dtype) * w
        g_pos = -g_neg
    g_pos, g_neg = (g_pos * scale)[:, None], (g_neg * scale)[:, None]
    dz = torch.zeros_like(z)
    dz.index_add_(0, anchors, g_pos * vp + g_neg * vn)
    dz.index_add_(0, positive, g_pos * u)
    dz.index_add_(0, mined, g_neg * u)
    return dz


# ---------------------------------------------------------------- public API

def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, *, loss: str = "nt_xent",
                     temperature: float = 0.5, margin: float = 0.5, similarity: str = "cosine",
                     semi_hard: bool = False, impl: str = "auto", block: int | None = None,
                     gather: bool = True, with_accuracy: bool = False):
    """One of SimCLR's contrastive losses (module docstring: the definitions), averaged over the
    2N anchors; with with_accuracy=True, ``(loss, accuracy)``.

    z1, z2: [N, D] projections of the two views (row i of each are positives). loss: "nt_xent" |
    "nt_logistic" | "margin_triplet". temperature: tau of NT-Xent and NT-Logistic (unused by the
    margin triplet). margin: m of the margin triplet loss (unused by the others; the paper tuned it
    without reporting a value, so 0.5 is this code's default, not the paper's). similarity:
    "cosine" (l2-normalised, the paper's default, and gradients flow through the normalisation)
    or "dot" (u^T v of the raw projections). semi_hard: semi-hard negative mining, for
    nt_logistic and margin_triplet only. impl, block, gather: as for `model.nt_xent.nt_xent`
    (impl per `resolve_loss_impl`).

    accuracy: the contrastive accuracy of Table 5, the share of this process's 2N anchors whose
    positive is strictly more similar than each of its 2N-2 negatives (2NW-2 when gathered; a tie
    counts as wrong), taken from the loss's own forward pass; a 0-dim tensor on the device, no
    gradient, no host sync; the mean over processes is the global share.

    Returns the loss in the input dtype (float32 for float16/bfloat16 inputs).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown contrastive loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; expected one of "
                         f"{', '.join(SIMILARITIES)}")
    if not isinstance(semi_hard, bool):
        raise ValueError(f"semi_hard must be a bool, got {semi_hard!r}")
    if loss == "nt_xent":
        if semi_hard:
            raise ValueError("semi_hard mining is defined for nt_logistic and margin_triplet "
                             "(the paper weighs NT-Xent's negatives by their hardness instead)")
        return _ntx._nt_xent(z1, z2, temperature, impl=impl, block=block, gather=gather,
                             with_accuracy=with_accuracy, normalize=similarity == "cosine")

    tau = _ntx._check_inputs(z1, z2, temperature)
    m = _check_number("margin", margin, positive=False)
    n, dim = z1.shape
    impl = resolve_loss_impl(impl, loss, z1.device, dim, z1.dtype)
    _ntx._check_block(block, impl)
    half = z1.dtype in (torch.float16, torch.bfloat16)
    z = torch.cat([z1, z2]).to(torch.float32 if half else z1.dtype)  # [2N, D]
    if similarity == "cosine":
        z = F.normalize(z, dim=1)  # per row, so before the gather
    z, row_start = _ntx._gathered_rows(z, n, gather)
    if impl == "reference":
        return _reference_rows(z, row_start, n, loss=loss, inv_tau=1.0 / tau, margin=m,
                               semi_hard=semi_hard, with_accuracy=with_accuracy)
    block = block or _ntx.default_block(z.shape[0], z.device)
    return _ContrastiveRows.apply(z, row_start, n, loss, 1.0 / tau, m, semi_hard, block,
                                  with_accuracy)


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss`: ``ContrastiveLoss("margin_triplet", margin=0.4,
    semi_hard=True)(z1, z2)``; the keyword settings are those of the function."""

    def __init__(self, loss: str = "nt_xent", **settings):
        super().__init__()
        allowed = {"temperature", "margin", "similarity", "semi_hard", "impl", "block", "gather",
                   "with_accuracy"}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown ContrastiveLoss settings {sorted(unknown)}; expected some "
                             f"of {sorted(allowed)}")
        if settings.get("impl", "auto") not in _ntx.IMPLS:
            raise ValueError(f"unknown loss impl {settings['impl']!r}; expected one of "
                             f"{', '.join(_ntx.IMPLS)}")
        self.loss, self.settings = loss, settings
        probe = torch.ones(2, 2)  # checks every setting now, not at the first step
        contrastive_loss(probe, probe, loss=loss, **{**settings, "impl": "reference",
                                                       "gather": False, "block": None})

    def forward(self, z1: torch.Tensor, z2: torch.Tensor):
        return contrastive_loss(z1, z2, loss=self.loss, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join([f"loss={self.loss!r}"] + [f"{k}={v!r}" for k, v in self.settings.items()])
