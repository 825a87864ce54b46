"""The numba CPU backend: the same fused ops as JIT kernels (parallel=True, compiled lazily
on first use and cached on disk; the GIL released while they run, as the C++ kernels do) — the
portable CPU path where no C++ compiler was available at install. bf16 / fp16 rows are read as
their raw 16-bit patterns and widened in the kernel."""

from __future__ import annotations

import numpy as np
import torch

from ._cpu_common import DTYPE_CODE, STAGE_CODE, check_head_grad, check_head_stats, check_kd_args, merge_groups
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

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
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
            _load_row(f, fb, s, m, 0 if scode == 3 else scode, table)
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

    # softmax rows: the KD op's and the head route's two sweeps over a chunk of the vocabulary
    # (fastagg.ops.vocab_head; the contracts of fastagg.cpu_cpp.head_stats / head_grad). Logits
    # arrive as float32 or as the bits of bf16 / fp16 (code 1 / 2; one compiled version per array
    # type, the other dtypes' branches dead there) and gradients leave in the same dtype. The
    # head's b [K or 1, c] is the bias's chunk in fp32, zeros of one row (b_step 0) for a layer
    # without one, so that no inner loop branches on it.
    TASK_ROWS = 8  # rows per parallel task (the KD op, the head's first sweep)
    TASK_COLS = 128  # columns per parallel task of the head's second sweep (its db sums stay in the task)

    @njit(inline="always")
    def _load_row(x, xb, zr, n, code, table):
        """x[:n] <- the row zr (float32 or float64, or 16-bit patterns by code) as fp32 (xb: x's
        bits; also staging's)."""
        if code == 0:
            for i in range(n):
                x[i] = zr[i]
        elif code == 1:
            for i in range(n):
                xb[i] = np.uint32(zr[i]) << np.uint32(16)
        else:
            for i in range(n):
                xb[i] = table[np.uint16(zr[i])]

    @njit(inline="always")
    def _store_row(zr, x, xb, n, code):
        """zr[:n] <- x (fp32; xb its bits) in zr's dtype, 16-bit ones rounded to nearest even."""
        if code == 0:
            for i in range(n):
                zr[i] = x[i]
        elif code == 1:
            for i in range(n):
                zr[i] = _to_bf16(xb[i])
        else:
            for i in range(n):
                zr[i] = _to_f16(xb[i])

    @njit(inline="always", fastmath=True)
    def _fast_exp(x, e, bits, n):
        """e[:n] <- exp(x[:n]) for x <= 0, returning their sum (bits: an int32 buffer of n):
        csrc/fastagg_cpu.h's fast_exp, 2^i * 2^f with a degree-7 polynomial for 2^f (relative error
        < 1e-8), as plain arithmetic in loops that vectorise (numba's np.exp is a call per element
        without Intel's SVML)."""
        scale = bits.view(np.float32)
        for i in range(n):
            t = max(x[i], np.float32(-87.0)) * np.float32(1.44269504088896341)
            fi = np.floor(t + np.float32(0.5))
            f = (t - fi) * np.float32(0.693147180559945309)
            q = np.float32(1.0 / 5040.0)
            q = q * f + np.float32(1.0 / 720.0)
            q = q * f + np.float32(1.0 / 120.0)
            q = q * f + np.float32(1.0 / 24.0)
            q = q * f + np.float32(1.0 / 6.0)
            q = q * f + np.float32(0.5)
            q = q * f + np.float32(1.0)
            e[i] = q * f + np.float32(1.0)
            bits[i] = (np.int32(fi) + np.int32(127)) << np.int32(23)
        total = np.float32(0.0)
        for i in range(n):
            e[i] *= scale[i]
            total += e[i]
        return total

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
    def _kd(z, code, p, g, row_loss, plogp, T, grad_scale, table):
        """Rows r of z [M, C] (float32, or bf16 / fp16 bits by code) against the teacher's row
        r % N of p [N, C]: g (z's dtype) <- grad_scale * (softmax(z / T) - p) and row_loss
        (float64) <- sum p log p - sum p log softmax(z / T), summed in double with log s kept apart
        (csrc/kd_loss.cpp's kd_rows: the loss is the small difference of two sums of ~log C)."""
        M, C = z.shape
        N = p.shape[0]
        nb = (M + TASK_ROWS - 1) // TASK_ROWS
        for task in prange(nb):
            x = np.empty(C, np.float32)
            xb = x.view(np.uint32)
            e = np.empty(C, np.float32)
            bits = np.empty(C, np.int32)
            for r in range(task * TASK_ROWS, min(M, (task + 1) * TASK_ROWS)):
                _load_row(x, xb, z[r], C, code, table)
                pr = p[r % N]
                m = -np.inf
                for c in range(C):
                    x[c] = x[c] / T
                    m = max(m, x[c])
                cross = 0.0  # sum p (z / T - m)
                mass = 0.0  # sum p (1 within rounding)
                for c in range(C):
                    x[c] -= m
                    cross += np.float64(pr[c] * x[c])
                    mass += np.float64(pr[c])
                s = _fast_exp(x, e, bits, C)
                inv_s = np.float32(1.0 / s)
                if code == 0:  # straight into the row
                    gr = g[r]
                    for c in range(C):
                        gr[c] = (e[c] * inv_s - pr[c]) * grad_scale
                else:
                    for c in range(C):
                        x[c] = (e[c] * inv_s - pr[c]) * grad_scale
                    _store_row(g[r], x, xb, C, code)
                row_loss[r] = plogp[r % N] - (cross - mass * np.log(np.float64(s)))

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
    def _head_stats(z, code, p, b, b_step, m_acc, s_acc, pz_acc, T, table):
        K, R = m_acc.shape
        NC = p.shape[1]
        nb = (R + TASK_ROWS - 1) // TASK_ROWS
        for task in prange(K * nb):
            k, r0 = task // nb, (task % nb) * TASK_ROWS
            x = np.empty(NC, np.float32)
            xb = x.view(np.uint32)
            e = np.empty(NC, np.float32)
            bits = np.empty(NC, np.int32)
            bk = b[k * b_step]
            for r in range(r0, min(R, r0 + TASK_ROWS)):
                _load_row(x, xb, z[k, r], NC, code, table)
                pr = p[r]
                m = -np.inf
                pz = 0.0
                for c in range(NC):
                    v = (x[c] + bk[c]) / T  # divided as the references do
                    x[c] = v
                    m = max(m, v)
                    pz += np.float64(pr[c] * v)
                for c in range(NC):
                    x[c] -= m
                s = _fast_exp(x, e, bits, NC)
                # fold into the running row: max and sum of exp over the chunks so far
                m_old = m_acc[k, r]
                m_tot = max(m_old, m)
                s_old = np.float32(0.0) if m_old == -np.inf else s_acc[k, r] * np.exp(m_old - m_tot)
                s_acc[k, r] = s_old + s * np.exp(m - m_tot)
                m_acc[k, r] = m_tot
                pz_acc[k, r] += pz

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
    def _head_grad(z, code, p, b, b_step, lse, scale, db, db_rows, T, table):
        """z <- scale * (exp((z + b) / T - lse) - p) in z's dtype (bf16 / fp16 rounded to nearest
        even); db[:db_rows] <- its sums over the rows, of the values before rounding."""
        K, R = lse.shape
        NC = p.shape[1]
        nb = (NC + TASK_COLS - 1) // TASK_COLS
        for task in prange(K * nb):
            k, c0 = task // nb, (task % nb) * TASK_COLS
            n = min(NC, c0 + TASK_COLS) - c0
            g = np.empty(n, np.float32)
            gb = g.view(np.uint32)
            e = np.empty(n, np.float32)
            bits = np.empty(n, np.int32)
            acc = np.zeros(n, np.float32)
            bk = b[k * b_step, c0:c0 + n]
            for r in range(R):
                _load_row(g, gb, z[k, r, c0:c0 + n], n, code, table)
                pr = p[r, c0:c0 + n]
                lr = lse[k, r]
                for i in range(n):
                    g[i] = (g[i] + bk[i]) / T - lr
                _fast_exp(g, e, bits, n)
                for i in range(n):
                    g[i] = (e[i] - pr[i]) * scale
                    acc[i] += g[i]
                _store_row(z[k, r, c0:c0 + n], g, gb, n, code)
            if k < db_rows:
                db[k, c0:c0 + n] = acc


_EMPTY_F32 = np.zeros((1, 1), np.float32)  # placeholders for a group's unused dtype
_EMPTY_U16 = np.zeros((1, 1), np.uint16)


def fused_merge(theta, c0, groups, out=None):
    groups = merge_groups(theta, groups, out)
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


def _logits(t):
    """(array, dtype code) of fp32 / bf16 / fp16 logits as the softmax kernels read and write them:
    float32, or 16-bit patterns, any strides."""
    code = DTYPE_CODE[t.dtype]
    return (t.numpy() if code == 0 else t.view(torch.int16).numpy().view(np.uint16)), code


def kd_loss_grad(logits, teacher_probs, temperature):
    logits, teacher_probs, K, N = check_kd_args(logits, teacher_probs)
    T = float(temperature)
    grad = torch.empty_like(logits)
    z, code = _logits(logits)
    g, _ = _logits(grad)
    plogp = torch.xlogy(teacher_probs.double(), teacher_probs.double()).sum(1).numpy()
    row_loss = np.empty(z.shape[0], np.float64)
    _kd(z, code, teacher_probs.numpy(), g, row_loss, plogp, np.float32(T), np.float32(T / N), _F16_TABLE)
    loss = torch.from_numpy(row_loss).view(K, N).sum(1) * (T * T / N)
    return loss.float(), grad


def _raw(t):
    """A flat CPU tensor or numpy array as the array the kernel reads: 16-bit floats as their bits."""
    if isinstance(t, np.ndarray):
        return t.view(np.uint16) if t.itemsize == 2 else t
    t = t.view(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.element_size() == 2 else t.numpy()


def stage_row(src, dst, src_dtype=None, threads=1):  # threads: one, the caller's (see _stage)
    dtype = check_stage_args(src, dst, src_dtype)
    return float(_stage(_raw(src), STAGE_CODE[dtype], _raw(dst), STAGE_CODE[dst.dtype], _F16_TABLE))


def _head_operands(z, p, bias):
    """The chunk as the numba kernels read it, every array contiguous, so that each kernel
    compiles once per logits dtype, not once per mix of layouts (the chunks of p and the bias are
    column slices: 8-10 versions, ~40 s of compiling before): z as float32 or 16-bit patterns, p,
    and the bias (a row of zeros, b_step 0, for a layer without one)."""
    zr, code = _logits(z)
    b = np.zeros((1, z.shape[2]), np.float32) if bias is None else bias.contiguous().numpy()
    return zr, code, p.contiguous().numpy(), b, 0 if bias is None else 1


def head_stats(z, p, temperature, m, s, pz, bias=None):
    """fastagg.cpu_cpp.head_stats' contract: m, s (fp32 [K, R]) and pz (float64 [K, R]) take the
    chunk z [K, R, c]'s max, sum of exp((z + bias) / T - m) and sum p (z + bias) / T."""
    check_head_stats(z, p, m, s, pz, bias)
    zr, code, pn, b, b_step = _head_operands(z.contiguous(), p, bias)
    _head_stats(zr, code, pn, b, b_step, m.numpy(), s.numpy(), pz.numpy(), np.float32(temperature), _F16_TABLE)


def head_grad(z, p, temperature, lse, scale, db=None, bias=None):
    """fastagg.cpu_cpp.head_grad's contract: z <- scale * (softmax((z + bias) / T) - p) from each
    row's log-sum-exp lse (fp32 [K, R]); db (fp32 [K, c]) <- its sums over the rows."""
    check_head_grad(z, p, lse, db, bias)
    work = z.contiguous()  # z itself: the products' output (a copy, written back, for other layouts)
    sums = None if db is None else db.contiguous()
    zr, code, pn, b, b_step = _head_operands(work, p, bias)
    dbn = np.zeros((1, 1), np.float32) if sums is None else sums.numpy()
    _head_grad(zr, code, pn, b, b_step, lse.numpy(), np.float32(scale), dbn, 0 if db is None else db.shape[0],
               np.float32(temperature), _F16_TABLE)
    if work.data_ptr() != z.data_ptr():
        z.copy_(work)
    if sums is not None and sums.data_ptr() != db.data_ptr():
        db.copy_(sums)
