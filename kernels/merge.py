"""Fused correct-and-merge: out = c0 * theta + sum over row groups of coef_r * row_r.

Why: merging K client updates is a weighted reduction of K rows of P parameters. The floor is
reading every row once, plus theta, plus writing out: (K * bytes(row) + 2 * 4) * P bytes. A
per-client ``_foreach_add_`` reads and writes theta K times; a cuBLAS GEMV is ~65-80% of
copy bandwidth. Here each program owns BLOCK consecutive parameters, keeps them in fp32
registers, and streams every row of every group through them once.

Groups (up to three: client deltas, KD correction rows, base versions) each have their own
dtype (fp32 / bf16 / fp16), coefficient vector (fp32) and optional int64 row index (a base
version is a row of the version store). Offsets are 64-bit: K * P passes 2^31 quickly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastagg.ops.merge import to_device

MAX_GROUPS = 3


@triton.jit
def _row(acc, rows_ptr, coef_ptr, idx_ptr, r, stride, offs, mask, HAS_IDX: tl.constexpr):
    coef = tl.load(coef_ptr + r)
    if HAS_IDX:
        row = tl.load(idx_ptr + r).to(tl.int64)
    else:
        row = tl.cast(r, tl.int64)
    x = tl.load(rows_ptr + row * stride + offs, mask=mask, other=0.0)
    return acc + coef * x.to(tl.float32)


@triton.jit
def _accumulate(acc, rows_ptr, coef_ptr, idx_ptr, R, stride, offs, mask, HAS_IDX: tl.constexpr,
                UNROLL: tl.constexpr):
    # UNROLL rows per iteration: their loads are independent, so several are in flight at once
    R_main = (R // UNROLL) * UNROLL
    for r0 in range(0, R_main, UNROLL):
        for u in tl.static_range(UNROLL):
            acc = _row(acc, rows_ptr, coef_ptr, idx_ptr, r0 + u, stride, offs, mask, HAS_IDX)
    for r in range(R_main, R):
        acc = _row(acc, rows_ptr, coef_ptr, idx_ptr, r, stride, offs, mask, HAS_IDX)
    return acc


@triton.jit
def _merge_kernel(theta_ptr, out_ptr, c0, P,
                  a_ptr, a_coef, a_idx, RA, a_stride,
                  b_ptr, b_coef, b_idx, RB, b_stride,
                  c_ptr, c_coef, c_idx, RC, c_stride,
                  A_IDX: tl.constexpr, B_IDX: tl.constexpr, C_IDX: tl.constexpr, BLOCK: tl.constexpr,
                  UNROLL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c0
    acc = _accumulate(acc, a_ptr, a_coef, a_idx, RA, a_stride, offs, mask, A_IDX, UNROLL)
    acc = _accumulate(acc, b_ptr, b_coef, b_idx, RB, b_stride, offs, mask, B_IDX, UNROLL)
    acc = _accumulate(acc, c_ptr, c_coef, c_idx, RC, c_stride, offs, mask, C_IDX, UNROLL)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def merge_block(P, sms):
    """Elements per program: 4096 (97-102% of the copy bandwidth on the H100 for P = 11.7M and
    100M, seventh session) where that still gives >= 8 programs per multiprocessor, else the
    largest power of two down to 512 that does. `cnn`'s 1.1M parameters in blocks of 4096 are 270
    programs for 132 multiprocessors: its merge of 2 x 128 rows ran at 40% of the copy bandwidth
    (eighteenth session)."""
    for block in (4096, 2048, 1024):
        if triton.cdiv(P, block) >= 8 * sms:
            return block
    return 512


def fused_merge(theta, c0, groups, out=None, block=None, num_warps=4, unroll=4):
    """Same contract as fastagg.ops.merge.fused_merge_reference (theta fp32). ``block``: elements per
    program (None: merge_block for the device; 4096 elsewhere, e.g. under the interpreter)."""
    if theta.dtype != torch.float32:
        raise TypeError(f"triton fused_merge takes float32 parameters, got {theta.dtype}")
    if not theta.is_contiguous():
        raise ValueError("theta must be contiguous")
    groups = [g for g in groups if g[0] is not None and len(g[1]) > 0]
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"at most {MAX_GROUPS} row groups, got {len(groups)}")
    if out is None:
        out = torch.empty_like(theta)
    P = theta.numel()
    args, flags = [], []
    for rows, coefs, index in groups:
        if rows.stride(1) != 1:
            raise ValueError("rows must be contiguous along parameters")
        if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"rows must be fp32, bf16 or fp16, got {rows.dtype}")
        coef_t = to_device(coefs, torch.float32, theta.device)
        idx_t = coef_t if index is None else to_device(index, torch.int64, theta.device)  # coef_t: unused
        args += [rows, coef_t, idx_t, len(coef_t), rows.stride(0)]
        flags.append(index is not None)
    while len(flags) < MAX_GROUPS:
        args += [theta, theta, theta, 0, 0]
        flags.append(False)
    if block is None:
        block = merge_block(P, torch.cuda.get_device_properties(theta.device).multi_processor_count) \
            if theta.is_cuda else 4096
    grid = (triton.cdiv(P, block),)
    _merge_kernel[grid](theta, out, float(c0), P, *args, A_IDX=flags[0], B_IDX=flags[1], C_IDX=flags[2],
                        BLOCK=block, UNROLL=unroll, num_warps=num_warps)
    return out
