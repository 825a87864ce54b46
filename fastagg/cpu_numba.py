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

    @njit(parallel=True, cache=True)
    def _merge(theta, out, c0, rows_f32, rows_u16, codes, group_of, row_of, coefs, table):
        P = theta.shape[0]
        nblocks = (P + BLOCK - 1) // BLOCK
        for b in prange(nblocks):
            i0 = b * BLOCK
            i1 = min(P, i0 + BLOCK)
            acc = np.empty(i1 - i0, np.float32)
            for i in range(i0, i1):
                acc[i - i0] = c0 * theta[i]
            for k in range(coefs.shape[0]):
                g = group_of[k]
                r = row_of[k]
                c = coefs[k]
                if codes[g] == 0:
                    x = rows_f32[g]
                    for i in range(i0, i1):
                        acc[i - i0] += c * x[r, i]
                else:
                    x16 = rows_u16[g]
                    bits = np.empty(i1 - i0, np.uint32)
                    for i in range(i0, i1):
                        bits[i - i0] = _widen(x16[r, i], codes[g], table)
                    vals = bits.view(np.float32)
                    for i in range(i1 - i0):
                        acc[i] += c * vals[i]
            for i in range(i0, i1):
                out[i] = acc[i - i0]

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


_EMPTY_F32 = np.zeros((1, 1), np.float32)
_EMPTY_U16 = np.zeros((1, 1), np.uint16)


def fused_merge(theta, c0, groups, out=None):
    groups = merge_groups(theta, groups)
    if out is None:
        out = torch.empty_like(theta)
    f32s, u16s, codes, group_of, row_of, coefs = [], [], [], [], [], []
    for gi, (rows, cs, idx) in enumerate(groups):
        code = DTYPE_CODE[rows.dtype]
        codes.append(code)
        f32s.append(rows.numpy() if code == 0 else _EMPTY_F32)
        u16s.append(rows.view(torch.int16).numpy().view(np.uint16) if code else _EMPTY_U16)
        group_of += [gi] * len(cs)
        row_of += idx
        coefs += cs
    if not groups:
        out.copy_(theta * float(c0))
        return out
    _merge(theta.numpy(), out.numpy(), np.float32(c0), numba.typed.List(f32s), numba.typed.List(u16s),
           np.array(codes, np.int64), np.array(group_of, np.int64), np.array(row_of, np.int64),
           np.array(coefs, np.float32), _F16_TABLE)
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
