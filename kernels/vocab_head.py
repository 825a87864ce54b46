"""The elementwise steps of fastagg.ops.vocab_head's two sweeps over a chunk of the vocabulary,
one kernel each, so that a chunk's logits z [K, R, c] (the products' output, any float dtype) are
read once per sweep and never widened to fp32 in memory:

- ``head_stats``: for each row, the running max and sum of exp(z / T) (an online log-sum-exp)
  and sum_c p z / T, combined into [K, R] fp32 accumulators that persist across the chunks;
- ``head_grad``: g = scale * (softmax(z / T) - p) from each row's log-sum-exp, written over z (in
  z's dtype, for the products that follow) and summed over the rows into the chunk's columns
  of db (in fp32, before g is rounded).

Programs: (student, block of rows) looping over the chunk's columns; (student, block of
columns) looping over the rows, which keeps db's column sums in registers (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_stats_kernel(z_ptr, zs_k, zs_r, p_ptr, ps_r, m_ptr, s_ptr, pz_ptr, R, NC, inv_T,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_C)
    z_rows = z_ptr + k * zs_k + rows.to(tl.int64)[:, None] * zs_r
    p_rows = p_ptr + rows.to(tl.int64)[:, None] * ps_r
    m = tl.full((BLOCK_R,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    pz = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        c = c0 + cols
        mask = rmask[:, None] & (c < NC)[None, :]
        z = tl.load(z_rows + c[None, :], mask=mask, other=0.0).to(tl.float32) * inv_T
        p = tl.load(p_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        pz += tl.sum(p * z, 1)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows past R: no NaN from -inf - -inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
        m = m_new
    at = k * R + rows
    m_old = tl.load(m_ptr + at, mask=rmask, other=0.0)
    s_old = tl.load(s_ptr + at, mask=rmask, other=0.0)
    m_tot = tl.maximum(m_old, m)
    m_tot_safe = tl.where(m_tot == -float("inf"), 0.0, m_tot)
    tl.store(s_ptr + at, s_old * tl.exp(m_old - m_tot_safe) + s * tl.exp(m - m_tot_safe), mask=rmask)
    tl.store(m_ptr + at, m_tot, mask=rmask)
    tl.store(pz_ptr + at, tl.load(pz_ptr + at, mask=rmask, other=0.0) + pz, mask=rmask)


@triton.jit
def _head_grad_kernel(z_ptr, zs_k, zs_r, p_ptr, ps_r, lse_ptr, db_ptr, dbs_k, R, NC, inv_T, scale,
                      HAS_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < NC
    r_off = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + r_off
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        zp = z_ptr + k * zs_k + rows.to(tl.int64)[:, None] * zs_r + c[None, :]
        z = tl.load(zp, mask=mask, other=0.0).to(tl.float32) * inv_T
        p = tl.load(p_ptr + rows.to(tl.int64)[:, None] * ps_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + k * R + rows, mask=rmask, other=0.0)
        g = tl.where(mask, (tl.exp(z - lse[:, None]) - p) * scale, 0.0)
        acc += tl.sum(g, 0)
        tl.store(zp, g.to(z_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        tl.store(db_ptr + k * dbs_k + c, acc.to(db_ptr.dtype.element_ty), mask=cmask)


# 16 rows x 128 columns a tile, 4 warps: 48 registers, vectorised loads, no spills for sm_90 with
# Triton 3.6 (32 x 128 took 80 for the first kernel, 254 with spills before its strides were
# hinted); for `lm` (16 students, 512 rows, chunks of 4,096 columns) 512 programs per launch
BLOCK_R, BLOCK_C = 16, 128


def _check(z, p):
    if z.dim() != 3 or z.stride(2) != 1 or p.dim() != 2 or p.stride(1) != 1 or p.shape != z.shape[1:]:
        raise ValueError(f"a chunk's logits must be [K, R, c] and its teacher probabilities [R, c], each contiguous "
                         f"along c; got {tuple(z.shape)} (strides {z.stride()}) and {tuple(p.shape)}")


def head_stats(z, p, temperature, m, s, pz):
    """Fold the chunk z [K, R, c] with teacher probabilities p [R, c] into the fp32 [K, R]
    accumulators (contiguous): m, s (max and sum of exp(z / T - m)), pz (sum p z / T)."""
    _check(z, p)
    K, R, NC = z.shape
    for t in (m, s, pz):
        if t.shape != (K, R) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"accumulators must be contiguous fp32 [{K}, {R}], got {tuple(t.shape)} {t.dtype}")
    grid = (K, triton.cdiv(R, BLOCK_R))
    _head_stats_kernel[grid](z, z.stride(0), z.stride(1), p, p.stride(0), m, s, pz, R, NC, 1.0 / float(temperature),
                             BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)


def head_grad(z, p, temperature, lse, scale, db=None):
    """z [K, R, c] <- scale * (softmax over the whole vocabulary - p), from each row's log-sum-exp
    of z / T, lse [K, R] (contiguous fp32); db [K, c] (any row stride, contiguous along c) <- its
    sum over the rows."""
    _check(z, p)
    K, R, NC = z.shape
    if lse.shape != (K, R) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be contiguous fp32 [{K}, {R}], got {tuple(lse.shape)} {lse.dtype}")
    if db is not None and (db.shape != (K, NC) or db.stride(1) != 1):
        raise ValueError(f"db must be [{K}, {NC}] contiguous along columns, got {tuple(db.shape)} {db.stride()}")
    grid = (K, triton.cdiv(NC, BLOCK_C))
    _head_grad_kernel[grid](z, z.stride(0), z.stride(1), p, p.stride(0), lse, z if db is None else db,
                            0 if db is None else db.stride(0), R, NC, 1.0 / float(temperature), float(scale),
                            HAS_DB=db is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
