"""Fused Triton kernels for NT-Xent (Chen et al., 2020, Eq. 1); called by `model.nt_xent`.

Layout shared with the chunked form: z [M, D] holds the L2-normalised projections, the anchors are
the 2N rows z[row_start : row_start + 2N], anchor j's positive is row row_start + (j + N) mod 2N,
and S = z_a z^T / tau with each anchor's own column masked out.

* forward: one program per tile of anchors streams column tiles with an online max/logsumexp
  (as in flash attention) and picks the positive logit when its tile passes; writes lse and pos
  per anchor, never S.
* backward: G = softmax(S) - onehot(positive), recomputed tile by tile from the saved lse.
  dz_rows = G z (one program per anchor tile) and dz_cols = G^T z_a (one program per column tile),
  two kernels so that no program needs atomics; dz = dz_cols + dz_rows on the anchors' rows.

Dot operands are the input dtype (bf16/fp16 use tensor cores; fp32 follows
torch.backends.cuda.matmul.allow_tf32), accumulation is fp32 (fp64 for fp64 inputs). Under
TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nt_xent_fwd_kernel(Z, LSE, POS, NEG_MAX, INV_TAU, M, D, stride_z, row_start, n_half,
                        n_anchor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, WITH_NEG_MAX: tl.constexpr):
    inv_tau = tl.load(INV_TAU)  # fp32 or fp64: fixes the accumulation dtype
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # anchor index in [0, 2N)
    row_ok = rows < n_anchor
    grow = row_start + rows  # the anchor's own column
    pcol = row_start + (rows + n_half) % n_anchor  # its positive's column
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Z + grow[:, None] * stride_z + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), inv_tau.dtype)
    l_i = tl.zeros([BLOCK_M], inv_tau.dtype)
    pos = tl.zeros([BLOCK_M], inv_tau.dtype)
    if WITH_NEG_MAX:  # running max over the negatives alone (the positive's column left out)
        neg_max = tl.full([BLOCK_M], float("-inf"), inv_tau.dtype)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION).to(inv_tau.dtype)
             * inv_tau)  # [BM, BN]
        pos += tl.sum(tl.where(cols[None, :] == pcol[:, None], s, 0.0), axis=1)
        s = tl.where(col_ok[None, :] & (cols[None, :] != grow[:, None]), s, float("-inf"))
        if WITH_NEG_MAX:
            neg_max = tl.maximum(neg_max, tl.max(
                tl.where(cols[None, :] == pcol[:, None], float("-inf"), s), axis=1))
        # The first tile holds >= 2 valid columns, at most one masked: m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=row_ok)
    tl.store(POS + rows, pos, mask=row_ok)
    if WITH_NEG_MAX:
        tl.store(NEG_MAX + rows, neg_max, mask=row_ok)


@triton.jit
def _nt_xent_bwd_rows_kernel(Z, LSE, SCALE, INV_TAU, DQ, M, D, stride_z, stride_dq, row_start,
                             n_half, n_anchor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """DQ[j] = scale * sum_k G[j, k] z_k for the anchors j of this program."""
    inv_tau = tl.load(INV_TAU)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_anchor
    grow = row_start + rows
    pcol = row_start + (rows + n_half) % n_anchor
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Z + grow[:, None] * stride_z + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)  # [BM]

    dq = tl.zeros([BLOCK_M, BLOCK_D], inv_tau.dtype)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        k = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(inv_tau.dtype) * inv_tau
        p = tl.exp(s - lse[:, None])
        p = tl.where(col_ok[None, :] & (cols[None, :] != grow[:, None]), p, 0.0)
        g = p - tl.where(cols[None, :] == pcol[:, None], 1.0, 0.0)  # [BM, BN]
        dq += tl.dot(g.to(k.dtype), k, input_precision=PRECISION).to(inv_tau.dtype)
    scale = tl.load(SCALE)
    tl.store(DQ + rows[:, None] * stride_dq + offs_d[None, :], dq * scale,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _nt_xent_bwd_cols_kernel(Z, LSE, SCALE, INV_TAU, DK, M, D, stride_z, stride_dk, row_start,
                             n_half, n_anchor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """DK[k] = scale * sum_j G[j, k] z_j over all anchors j, for the columns k of this program."""
    inv_tau = tl.load(INV_TAU)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]

    dk = tl.zeros([BLOCK_N, BLOCK_D], inv_tau.dtype)
    for r0 in range(0, n_anchor, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_anchor
        grow = row_start + rows
        pcol = row_start + (rows + n_half) % n_anchor
        q = tl.load(Z + grow[:, None] * stride_z + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        st = (tl.dot(k, tl.trans(q), input_precision=PRECISION).to(inv_tau.dtype)
              * inv_tau)  # [BN, BM]
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(row_ok[None, :] & (cols[:, None] != grow[None, :]), pt, 0.0)
        gt = pt - tl.where(row_ok[None, :] & (cols[:, None] == pcol[None, :]), 1.0, 0.0)
        dk += tl.dot(gt.to(q.dtype), q, input_precision=PRECISION).to(inv_tau.dtype)
    scale = tl.load(SCALE)
    tl.store(DK + cols[:, None] * stride_dk + offs_d[None, :], dk * scale,
             mask=col_ok[:, None] & d_ok[None, :])


def _config(z: torch.Tensor, block: int | None) -> dict:
    block_d = max(16, triton.next_power_of_2(z.shape[1]))
    if block is None:
        block = 64 if block_d <= 128 else (32 if block_d <= 256 else 16)
    if z.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # ignored for 16-bit operands; fp64 has no tf32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision,
                num_warps=4 if block * block_d <= 64 * 128 else 8)


def forward(z: torch.Tensor, row_start: int, n: int, inv_tau: float, *, block: int | None = None,
            acc_dtype: torch.dtype = torch.float32, with_neg_max: bool = False) -> tuple:
    """Per-anchor logsumexp and positive logit, each [2N] in acc_dtype. z: [M, D] (normalised
    for cosine similarity, raw for the dot product). with_neg_max=True also returns each anchor's
    largest negative logit (-inf when it has none), kept beside the online max: the contrastive
    accuracy's input. Without it the kernel compiles exactly as before (a constexpr switch)."""
    z = z.contiguous()
    m, d = z.shape
    a = 2 * n
    lse = torch.empty(a, dtype=acc_dtype, device=z.device)
    pos = torch.empty(a, dtype=acc_dtype, device=z.device)
    inv = torch.full((1,), inv_tau, dtype=acc_dtype, device=z.device)  # a fill kernel, no host copy
    neg_max = torch.empty(a, dtype=acc_dtype, device=z.device) if with_neg_max else lse
    cfg = _config(z, block)
    grid = (triton.cdiv(a, cfg["BLOCK_M"]),)
    _nt_xent_fwd_kernel[grid](z, lse, pos, neg_max, inv, m, d, z.stride(0), row_start, n, a,
                              WITH_NEG_MAX=with_neg_max, **cfg)
    return (lse, pos, neg_max) if with_neg_max else (lse, pos)


def backward(z: torch.Tensor, row_start: int, n: int, inv_tau: float, lse: torch.Tensor,
             scale: torch.Tensor, *, block: int | None = None,
             acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dz [M, D] in acc_dtype for loss = (scale * tau) * sum_j (lse_j - pos_j); scale is 0-dim."""
    z = z.contiguous()
    m, d = z.shape
    a = 2 * n
    inv = torch.full((1,), inv_tau, dtype=acc_dtype, device=z.device)
    scale = scale.reshape(1).to(acc_dtype)
    dz = torch.empty((m, d), dtype=acc_dtype, device=z.device)  # column part, every row
    dq = torch.empty((a, d), dtype=acc_dtype, device=z.device)  # row part, anchors only
    cfg = _config(z, block)
    _nt_xent_bwd_cols_kernel[(triton.cdiv(m, cfg["BLOCK_N"]),)](
        z, lse, scale, inv, dz, m, d, z.stride(0), dz.stride(0), row_start, n, a, **cfg)
    _nt_xent_bwd_rows_kernel[(triton.cdiv(a, cfg["BLOCK_M"]),)](
        z, lse, scale, inv, dq, m, d, z.stride(0), dq.stride(0), row_start, n, a, **cfg)
    dz[row_start:row_start + a] += dq
    return dz
