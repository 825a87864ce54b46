"""The numba CPU backend: the same two fused ops as JIT kernels (parallel=True, compiled lazily
on first use and cached on disk) — the portable CPU path where no C++ compiler was available at
install. bf16 / fp16 rows are read as their raw 16-bit patterns and widened in the kernel."""

from __future__ import annotations

import numpy as np
import torch

from ._cpu_common import DTYPE_CODE, check_kd_args, merge_groups

try:
    import numba
    from numba import njit, prange
except ImportError as exc:
    numba = None
    _why = f"numba cannot be imported ({exc})"

# fp16 -> fp32 for every 16-bit pattern (exact): 256 KB, built once
# (as fp32 bit patterns, so both 16-bit formats widen to uint32 bits in the kernel)
_F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


def available():
    if numba is None:
        return False, _why
    return True, f"numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads)"


if numba is not None:
    BLOCK = 4096

    @njit(inline="always")
    def _widen(bits, code, table):
        if code == 1:  # bf16: the high half of an fp32
            return np.uint32(np.uint16(bits)) << np.uint32(16)
        return table[np.uint16(bits)]

    @njit(inline="always", fastmath=True)
    def _accumulate(acc, i0, n, rows_f32, rows_u16, code, coefs, idx, table):
        R = coefs.shape[0]
        if code == 0:
            r = 0
            while r + 4 <= R:  # four rows per pass over the accumulators
                a, b, c, d = rows_f32[idx[r]], rows_f32[idx[r + 1]], rows_f32[idx[r + 2]], rows_f32[idx[r + 3]]
                ca, cb, cc, cd = coefs[r], coefs[r + 1], coefs[r + 2], coefs[r + 3]
                for i in range(n):
                    acc[i] += ca * a[i0 + i] + cb * b[i0 + i] + cc * c[i0 + i] + cd * d[i0 + i]
                r += 4
            while r < R:
                a = rows_f32[idx[r]]
                ca = coefs[r]
                for i in range(n):
                    acc[i] += ca * a[i0 + i]
                r += 1
        else:
            bits = np.empty(n, np.uint32)
            vals = bits.view(np.float32)
            for r in range(R):
                x = rows_u16[idx[r]]
                if code == 1:  # bf16: the high half of an fp32
                    for i in range(n):
                        bits[i] = np.uint32(x[i0 + i]) << np.uint32(16)
                else:
                    for i in range(n):
                        bits[i] = table[x[i0 + i]]
                ca = coefs[r]
                for i in range(n):
                    acc[i] += ca * vals[i]

    @njit(parallel=True, cache=True, fastmath=True)
    def _merge(theta, out, c0, a32, a16, acode, acoef, aidx, b32, b16, bcode, bcoef, bidx,
               c32, c16, ccode, ccoef, cidx, table):
        P = theta.shape[0]
        nblocks = (P + BLOCK - 1) // BLOCK
        for blk in prange(nblocks):
            i0 = blk * BLOCK
            n = min(P, i0 + BLOCK) - i0
            acc = np.empty(n, np.float32)
            for i in range(n):
                acc[i] = c0 * theta[i0 + i]
            _accumulate(acc, i0, n, a32, a16, acode, acoef, aidx, table)
            _accumulate(acc, i0, n, b32, b16, bcode, bcoef, bidx, table)
            _accumulate(acc, i0, n, c32, c16, ccode, ccoef, cidx, table)
            for i in range(n):
                out[i0 + i] = acc[i]

    @njit(parallel=True, cache=True, fastmath=True)
    def _kd(z, p, g, row_loss, plogp, inv_T, grad_scale):
        M, C = z.shape
        N = p.shape[0]
        for r in prange(M):
            t = r % N
            m = -np.inf
            for c in range(C):
                m = max(m, z[r, c] * inv_T)
            e = np.empty(C, np.float32)
            s = np.float32(0.0)
            for c in range(C):
                e[c] = np.exp(z[r, c] * inv_T - m)
                s += e[c]
            shift = m + np.log(s)
            cross = np.float32(0.0)
            for c in range(C):
                cross += p[t, c] * (z[r, c] * inv_T - shift)
                g[r, c] = (e[c] / s - p[t, c]) * grad_scale
            row_loss[r] = plogp[t] - cross


_EMPTY_F32 = np.zeros((1, 1), np.float32)  # placeholders for a group's unused dtype
_EMPTY_U16 = np.zeros((1, 1), np.uint16)


def fused_merge(theta, c0, groups, out=None):
    groups = merge_groups(theta, groups)
    if len(groups) > 3:
        raise ValueError(f"at most 3 row groups, got {len(groups)}")
    if out is None:
        out = torch.empty_like(theta)
    args = []
    for rows, cs, idx in groups:
        code = DTYPE_CODE[rows.dtype]
        args += [rows.numpy() if code == 0 else _EMPTY_F32,
                 rows.view(torch.int16).numpy().view(np.uint16) if code else _EMPTY_U16,
                 code, np.array(cs, np.float32), np.array(idx, np.int64)]
    while len(args) < 15:  # unused groups: no rows
        args += [_EMPTY_F32, _EMPTY_U16, 0, np.zeros(0, np.float32), np.zeros(0, np.int64)]
    _merge(theta.numpy(), out.numpy(), np.float32(c0), *args, _F16_TABLE)
    return out


def kd_loss_grad(logits, teacher_probs, temperature):
    logits, teacher_probs, K, N = check_kd_args(logits, teacher_probs)
    T = float(temperature)
    p = teacher_probs.numpy()
    plogp = torch.xlogy(teacher_probs.double(), teacher_probs.double()).sum(1).float().numpy()
    z = logits.float().numpy() if logits.dtype != torch.float32 else logits.numpy()
    grad = np.empty_like(z)
    row_loss = np.empty(z.shape[0], np.float32)
    _kd(z, p, grad, row_loss, plogp, np.float32(1.0 / T), np.float32(T / N))
    loss = torch.from_numpy(row_loss).view(K, N).sum(1) * (T * T / N)
    return loss, torch.from_numpy(grad).to(logits.dtype)
