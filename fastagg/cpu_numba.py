"""The numba CPU backend: the same two fused ops as JIT kernels (parallel=True, compiled lazily
on first use and cached on disk) — the portable CPU path where no C++ compiler was available at
install. bf16 / fp16 rows are read as their raw 16-bit patterns and widened in the kernel."""

from __future__ import annotations

import numpy as np
import torch

from ._cpu_common import DTYPE_CODE, STAGE_CODE, check_kd_args, merge_groups
from .ops.stage import check_stage_args

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
                # the block's views: indexing them vectorises, a[i0 + i] did not (as in _stage)
                a, b = rows_f32[idx[r]][i0:i0 + n], rows_f32[idx[r + 1]][i0:i0 + n]
                c, d = rows_f32[idx[r + 2]][i0:i0 + n], rows_f32[idx[r + 3]][i0:i0 + n]
                ca, cb, cc, cd = coefs[r], coefs[r + 1], coefs[r + 2], coefs[r + 3]
                for i in range(n):
                    acc[i] += ca * a[i] + cb * b[i] + cc * c[i] + cd * d[i]
                r += 4
            while r < R:
                a = rows_f32[idx[r]][i0:i0 + n]
                ca = coefs[r]
                for i in range(n):
                    acc[i] += ca * a[i]
                r += 1
        else:
            bits = np.empty(n, np.uint32)
            vals = bits.view(np.float32)
            for r in range(R):
                x = rows_u16[idx[r]][i0:i0 + n]
                if code == 1:  # bf16: the high half of an fp32
                    for i in range(n):
                        bits[i] = np.uint32(x[i]) << np.uint32(16)
                else:
                    for i in range(n):
                        bits[i] = table[x[i]]
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
            th, o = theta[i0:i0 + n], out[i0:i0 + n]
            for i in range(n):
                acc[i] = c0 * th[i]
            _accumulate(acc, i0, n, a32, a16, acode, acoef, aidx, table)
            _accumulate(acc, i0, n, b32, b16, bcode, bcoef, bidx, table)
            _accumulate(acc, i0, n, c32, c16, ccode, ccoef, cidx, table)
            for i in range(n):
                o[i] = acc[i]

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


    @njit(inline="always")
    def _to_bf16(u):  # fp32 bits -> bf16 bits, rounded to nearest even; NaN stays NaN
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
        return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @njit(inline="always")
    def _to_f16(u):  # fp32 bits -> fp16 bits, rounded to nearest even (numba has no float16)
        sign = (u >> np.uint32(16)) & np.uint32(0x8000)
        a = u & np.uint32(0x7FFFFFFF)
        if a > np.uint32(0x7F800000):  # NaN
            return np.uint16(sign | np.uint32(0x7E00))
        if a >= np.uint32(0x477FF000):  # 65520 and up (Inf included) round to Inf
            return np.uint16(sign | np.uint32(0x7C00))
        if a >= np.uint32(0x38800000):  # a normal fp16: rebias the exponent, round the mantissa
            a = a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))
            return np.uint16(sign | ((a - np.uint32(112 << 23)) >> np.uint32(13)))
        e = a >> np.uint32(23)  # below 2^-14: an fp16 subnormal, m * 2^(e - 126) units of 2^-24
        if e < np.uint32(102):  # below 2^-25: rounds to zero
            return np.uint16(sign)
        m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - e
        h = m >> shift
        rem = m & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if rem > half or (rem == half and (h & np.uint32(1)) == np.uint32(1)):
            h += np.uint32(1)
        return np.uint16(sign | h)

    @njit(nogil=True, cache=True, fastmath=True)
    def _stage(src, scode, dst, dcode, table):
        """dst <- src, both flat; codes 0 fp32, 1 bf16, 2 fp16 (raw uint16 bits), 3 fp64.
        Returns the sum of squares of the stored values (double). One thread, GIL released: the
        aggregator's submitting threads stage at once. Each dtype pair has its own loop (a
        branch inside would keep it from vectorising)."""
        n = dst.shape[0]
        total = 0.0
        buf = np.empty(BLOCK, np.float32)
        for i0 in range(0, n, BLOCK):
            m = min(n, i0 + BLOCK) - i0
            s, d = src[i0:i0 + m], dst[i0:i0 + m]  # views: indexing them vectorises, src[i0 + i] does not
            f = buf[:m]
            fb = f.view(np.uint32)
            acc = 0.0
            if dcode == 3 and scode == 3:
                for i in range(m):
                    v = np.float64(s[i])
                    d[i] = v
                    acc += v * v
                total += acc
                continue
            # the block as fp32 values (fp64 rounded once, as torch does)
            if scode == 0 or scode == 3:
                for i in range(m):
                    f[i] = np.float32(s[i])
            elif scode == 1:
                for i in range(m):
                    fb[i] = np.uint32(s[i]) << np.uint32(16)
            else:
                for i in range(m):
                    fb[i] = table[np.uint16(s[i])]
            # stored, the block then holding the stored values
            if dcode == 1:
                for i in range(m):
                    h = _to_bf16(fb[i])
                    d[i] = h
                    fb[i] = np.uint32(h) << np.uint32(16)
            elif dcode == 2:
                for i in range(m):
                    h = _to_f16(fb[i])
                    d[i] = h
                    fb[i] = table[h]
            else:
                for i in range(m):
                    d[i] = f[i]
            for i in range(m):
                w = np.float64(f[i])
                acc += w * w
            total += acc
        return total

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


def _raw(t):
    """A flat CPU tensor or numpy array as the array the kernel reads: 16-bit floats as their bits."""
    if isinstance(t, np.ndarray):
        return t.view(np.uint16) if t.itemsize == 2 else t
    t = t.view(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.element_size() == 2 else t.numpy()


def stage_row(src, dst, src_dtype=None, threads=1):  # threads: one, the caller's (see _stage)
    dtype = check_stage_args(src, dst, src_dtype)
    return float(_stage(_raw(src), STAGE_CODE[dtype], _raw(dst), STAGE_CODE[dst.dtype], _F16_TABLE))
