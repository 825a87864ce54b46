"""conv -> relu -> 2x2 max-pool of K students on an input they all share (the first layer, on
the proxy batch), forward and weight gradient, as two Triton kernels.

Why: under vmap this layer is one dense convolution with K * Co output channels over few input
channels (3 for images). On the H100 cuDNN ran `cnn`'s first chain (conv, relu, pool) at ~11
TFLOP/s, 0.24 ms per student forward and backward, the largest single item of a corrected
update (bench/NOTES-gpu.md, seventh session): the GEMM's reduction is only C*R*S = 75 deep, so
the layer is bound by writing its [N, K*Co, Ho, Wo] output and reading it back three times
(relu, pool, and the gradient rebuilt at that size in the backward). The grouped kernels'
fused chain (fastagg.kernels.grouped_conv) does not help here: its reduction runs tap by tap
over blocks of >= 16 channels, 3 of them real.

Here the reduction runs over the flattened (c, r, s) of the im2col matrix in blocks, so a
block is filled whatever C is, and nothing of the convolution's full-size output is written:

    forward   [N*Ho*Wo, C*R*S] x [C*R*S, K*Co], the tile's pixels window by window; the epilogue
              adds the bias, applies relu, pools each window of four rows, and stores the pooled
              y [N, K*Co, Ho/2, Wo/2] (any strides) and an int8 code per window: the position
              (0..3, row-major) of its positive max, -1 where relu zeroed it (as
              fastagg.kernels.grouped_conv.conv_relu_pool_forward)
    weight    dw [K*Co, C*R*S] = sum over conv output pixels m of dz[m] x im2col[m], where
    gradient  dz[m, j] = dp[window(m), j] if code[window(m), j] is m's position, else 0: built in
              registers from the pooled gradient and the codes as the tile loads them, never
              stored; db[j] = sum of the same dz. The reduction over pixels can be split over
              programs (fp32 atomics into zeroed outputs).

The forward has a second kernel, "resident" (eighteenth session): a program gathers its pixels'
im2col block once, in two power-of-two chunks (64 + 16 for C*R*S = 75), keeps it in registers
and loops over JT channel tiles, where the first gathers it again for every tile (4096 / BN
times for 128 `cnn` students). ``FWD = "auto"`` times both once per shape on a GPU; on a CPU it
runs resident where C*R*S fits (RESIDENT_MAX_CRS).

Both have a third method, "columns" (twenty-first session): the shared input's im2col matrix
built once per pass by ``F.unfold`` (window_columns: [4, windows, C*R*S padded to a multiple of
32], one plane per window position; 42 MB for `cnn`'s 256 images in bf16, read from L2 by every
tile), so both kernels read plain [windows, C*R*S] tiles: no gather, no per-element index
arithmetic, no reshape across a tile's rows. The forward takes one product per window position
and keeps the running max and its position (two accumulators); the weight gradient loads each
window's pooled gradient and code once and multiplies, per position, the gradient there (never
stored) by that position's columns. The forward leaves its columns in ``keep`` for the weight
gradient. On the H100 in the twentieth session the resident forward took 3.2 ms for `cnn`, K =
128 (50 TFLOP/s; its 161 GFLOP and 0.8 GB of stores put the floor near 0.3 ms), the unpool
weight gradient 2.8 ms; what the columns kernels take there is for the next GPU run to measure
(auto times all the methods).

The input needs no gradient here (the proxy batch); the op's autograd (fastagg.ops.grouped_conv)
computes one in plain PyTorch if it is ever asked for.

The weight gradient has a second method, "unpool": dz written out in full (channels-last on a
GPU) by one kernel (unpool_chain), then cuDNN's dense weight gradient. On the H200 (fifteenth
session, `cnn`, K = 128) the kernel above took 12.9 ms, a third of a fused pass, at 12.5
TFLOP/s, while cuDNN's channels-last weight gradient of the same layer took 1.6 ms from a
full-size dz. The unpool writes dz (2.1 GB there) and reads it back once, so it trades memory
for cuDNN's tuned GEMM. (On the H100 in the eighteenth session it lost, 21.3 ms against the
kernel's 12.8, because dz was then written by a torch.where over a 7-D view at ~150 GB/s; the
kernel that writes it now reads each window once and writes its four pixels.) ``WGRAD = "auto"``
times both once per shape on a GPU (outside a graph capture) and keeps the faster, as Triton's
autotuner keeps a config; ``wgrad_choices`` records what it measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastagg.ops.timing import time_each

from .grouped_conv import _INTERPRET, _configs, _downcast, _mma, _out_size, _tf32, reduction_split

# BM: pixels (a multiple of 4: whole windows), BN: output channels, BK: the (c, r, s) block
_FWD = _configs([(128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 128, 64, 8, 2)])
# BM: pixels of the reduction (whole windows), BN: output channels, BK: the (c, r, s) block.
# Read with bench/compile_sm90.py (Triton 3.9, sm_90): these spill 0-200 bytes per thread; 4 warps
# at 64x64x64, or 128 pixels or channels per tile, spilled 290-2,000 (the pooled gradient and
# codes are loaded into registers, not fed to the MMA from shared memory)
_WGRAD = _configs([(64, 64, 64, 8, 2), (64, 64, 128, 8, 2), (32, 64, 128, 4, 2)])
_KEY = ["N", "C", "H", "W", "KCO", "HO", "WO", "R", "S", "SH", "SW"]


@triton.jit
def _idx(v, OFF64: tl.constexpr):
    """``v`` as an element offset: 64-bit when OFF64 (a tensor may pass 2^31 elements: the codes
    of K = 1024 `cnn` students do), else 32-bit, which halves the registers of a tile's offsets."""
    if OFF64:  # one return: Triton 3.6 types both returns of ``if c: return a; return b`` even for a constexpr c
        out = v.to(tl.int64)
    else:
        out = v
    return out


@triton.jit
def _im2col(x_ptr, pix_off, ih0, iw0, m_ok, crs, CRS, H, W, sxc, sxh, sxw,
            R: tl.constexpr, S: tl.constexpr, OFF64: tl.constexpr):
    """The [pixels, crs] block of the im2col matrix of x (zero outside the image and past CRS).
    Each offset and row is a row term plus a column term: a pixel's (pix_off, its window's top
    left ih0, iw0) plus a tap's (c, r, s), so only sums are formed per element."""
    c = crs // (R * S)
    rs = crs - c * (R * S)
    r = rs // S
    s = rs - r * S
    ih = ih0[:, None] + r[None, :]
    iw = iw0[:, None] + s[None, :]
    ok = m_ok[:, None] & (crs < CRS)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    tap_off = _idx(c, OFF64) * sxc + r * sxh + s * sxw
    return tl.load(x_ptr + (pix_off[:, None] + tap_off[None, :]), mask=ok, other=0.0)


@triton.jit
def _windows(offs, PHO, PWO, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Conv output pixels numbered window by window (four consecutive numbers: one 2x2 window):
    (image n, pooled row ph and column pw, position q in the window, and the top left corner
    ih0, iw0 of the pixel's receptive field in the input)."""
    p, q = offs // 4, offs % 4
    n = p // (PHO * PWO)
    ph, pw = (p // PWO) % PHO, p % PWO
    return n, ph, pw, q, (ph * 2 + q // 2) * SH - PH, (pw * 2 + q % 2) * SW - PW


@triton.autotune(_FWD, key=_KEY)
@triton.jit(do_not_specialize=["N", "C", "H", "W", "KCO", "HO", "WO"])
def _shared_fwd_relu_pool(x_ptr, w_ptr, b_ptr, y_ptr, code_ptr, N, C, H, W, KCO, HO, WO,
                          sxn, sxc, sxh, sxw, syn, syc, syh, syw, CO, syk,
                          SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                          R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr,
                          OFF64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """w: [C*R*S, K*Co] contiguous (B tiles load along output channels); y and the contiguous
    codes: [N, K*Co, HO/2, WO/2]."""
    PHO, PWO = HO // 2, WO // 2
    offs = tl.program_id(0) * BM + tl.arange(0, BM)
    n, _, _, _, ih0, iw0 = _windows(offs, PHO, PWO, SH, SW, PH, PW)
    m_ok = offs < N * HO * WO
    pix_off = _idx(n, OFF64) * sxn + ih0 * sxh + iw0 * sxw
    offs_o = tl.program_id(1) * BN + tl.arange(0, BN)
    o_ok = offs_o < KCO
    CRS = C * R * S
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, CRS, BK):
        crs = k0 + kk
        a = _im2col(x_ptr, pix_off, ih0, iw0, m_ok, crs, CRS, H, W, sxc, sxh, sxw, R, S, OFF64)
        b = tl.load(w_ptr + (_idx(crs, OFF64) * KCO)[:, None] + offs_o[None, :],
                    mask=(crs < CRS)[:, None] & o_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, TF32)
    _bias_relu_pool_store(acc, b_ptr, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO, syn, syc, syh, syw,
                          CO, syk, HAS_BIAS, OFF64, BM, BN)


@triton.jit
def _bias_relu_pool_store(acc, b_ptr, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO, syn, syc, syh, syw,
                          CO, syk, HAS_BIAS: tl.constexpr, OFF64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The epilogue of a [BM conv output pixels (window by window), BN channels] tile: bias, relu,
    each window's max stored into y and its position (0..3, row-major; -1 where relu zeroed the
    window) into the contiguous codes. Channel j of y is student j // CO's channel j % CO, at
    (j // CO) * syk + (j % CO) * syc (syk = CO * syc where y is a plain [N, K*Co, h, w] tensor).
    (Its offsets are formed here, after the max: formed before it, as the resident kernel first
    did for its whole loop, they cost the tile kernel 8-192 bytes a thread of spills on sm_90.)"""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    pooled, pos = tl.max(tl.reshape(tl.maximum(acc, 0.0), (BM // 4, 4, BN)), axis=1, return_indices=True,
                         return_indices_tie_break_left=True)
    code = tl.where(pooled > 0, pos, -1)
    pp = tl.program_id(0) * (BM // 4) + tl.arange(0, BM // 4)
    _store_windows(pooled, code, pp, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO, syn, syc, syh, syw, CO, syk,
                   OFF64)


@triton.jit
def _store_windows(pooled, code, pp, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO, syn, syc, syh, syw, CO, syk,
                   OFF64: tl.constexpr):
    """Store a [windows pp, channels offs_o] tile of pooled values into y and their codes into
    the contiguous codes (the addressing of _bias_relu_pool_store)."""
    p_ok = (pp < N * PHO * PWO)[:, None] & o_ok[None, :]
    pn = _idx(pp // (PHO * PWO), OFF64)
    ph, pw = (pp // PWO) % PHO, pp % PWO
    ch = _idx(offs_o, OFF64)
    dst = (pn * syn + ph * syh + pw * syw)[:, None] + ((ch // CO) * syk + (ch % CO) * syc)[None, :]
    tl.store(y_ptr + dst, _downcast(pooled, y_ptr.dtype.element_ty), mask=p_ok)
    flat = (pn * (KCO * PHO * PWO) + ph * PWO + pw)[:, None] + (ch * (PHO * PWO))[None, :]
    tl.store(code_ptr + flat, code.to(tl.int8), mask=p_ok)


# BM: pixels (whole windows), BN: output channels per tile, JT: channel tiles per program. The
# im2col block stays in registers across the JT tiles (KA + KB wide: the reduction in two
# power-of-two chunks, 64 + 16 for C*R*S = 75)
_FWD_RES = [triton.Config({"BM": 32, "BN": 16, "JT": 2}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BM": bm, "BN": bn, "JT": jt}, num_warps=w, num_stages=st)
    # (bench/compile_sm90.py, Triton 3.9, bf16 5x5: these spill nothing; 128x64 on 4 warps spilled 408
    # bytes a thread, 128x128 on 8 warps 288, 256x64 on 8 warps 760)
    for bm, bn, jt, w, st in [(128, 64, 8, 8, 2), (128, 64, 32, 8, 2), (64, 64, 8, 4, 2), (64, 64, 32, 4, 2),
                              (64, 128, 8, 8, 2)]]
RESIDENT_MAX_CRS = 160  # C*R*S up to this: the im2col block fits the registers (7x7 taps on 3 channels: 147)


def resident_chunks(crs):
    """(KA, KB): the reduction's two power-of-two chunks (each >= 16, tl.dot's least) covering crs."""
    ka = max(16, 1 << (crs.bit_length() - 1))
    return ka, max(16, triton.next_power_of_2(max(1, crs - ka)))


@triton.autotune(_FWD_RES, key=_KEY)
@triton.jit(do_not_specialize=["N", "C", "H", "W", "KCO", "HO", "WO"])
def _shared_fwd_relu_pool_resident(x_ptr, w_ptr, b_ptr, y_ptr, code_ptr, N, C, H, W, KCO, HO, WO,
                                   sxn, sxc, sxh, sxw, syn, syc, syh, syw, CO, syk,
                                   SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                                   R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr,
                                   OFF64: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                                   BM: tl.constexpr, BN: tl.constexpr, JT: tl.constexpr):
    """As _shared_fwd_relu_pool, but a program gathers its pixels' im2col block once and runs JT
    channel tiles over it (there every channel tile gathers it again: 4096 / BN times for 128
    `cnn` students, each element an index computation and a masked load)."""
    PHO, PWO = HO // 2, WO // 2
    offs = tl.program_id(0) * BM + tl.arange(0, BM)
    n, _, _, _, ih0, iw0 = _windows(offs, PHO, PWO, SH, SW, PH, PW)
    m_ok = offs < N * HO * WO
    pix_off = _idx(n, OFF64) * sxn + ih0 * sxh + iw0 * sxw
    CRS = C * R * S
    ka = tl.arange(0, KA)
    kb = KA + tl.arange(0, KB)
    a0 = _im2col(x_ptr, pix_off, ih0, iw0, m_ok, ka, CRS, H, W, sxc, sxh, sxw, R, S, OFF64)
    a1 = _im2col(x_ptr, pix_off, ih0, iw0, m_ok, kb, CRS, H, W, sxc, sxh, sxw, R, S, OFF64)
    w0_row = (_idx(ka, OFF64) * KCO)[:, None]
    w1_row = (_idx(kb, OFF64) * KCO)[:, None]
    j_lo = tl.program_id(1) * (JT * BN)
    j_hi = tl.minimum(j_lo + JT * BN, KCO)
    for j0 in range(j_lo, j_hi, BN):
        offs_o = j0 + tl.arange(0, BN)
        o_ok = offs_o < KCO
        b0 = tl.load(w_ptr + w0_row + offs_o[None, :], mask=(ka < CRS)[:, None] & o_ok[None, :], other=0.0)
        b1 = tl.load(w_ptr + w1_row + offs_o[None, :], mask=(kb < CRS)[:, None] & o_ok[None, :], other=0.0)
        acc = _mma(a0, b0, tl.zeros((BM, BN), tl.float32), TF32)
        acc = _mma(a1, b1, acc, TF32)
        _bias_relu_pool_store(acc, b_ptr, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO, syn, syc, syh, syw,
                              CO, syk, HAS_BIAS, OFF64, BM, BN)


# BP: windows (pooled pixels) per tile, BN: output channels, BK: the (c, r, s) block; CRSP, the
# columns' width, is a multiple of 32, so every BK here divides it
# (the FOUR flag: see the kernel; the tests run both ways under the interpreter)
_FWD_COLS = [triton.Config({"BP": 16, "BN": 16, "BK": 16, "FOUR": False}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BP": bp, "BN": bn, "BK": bk, "FOUR": four}, num_warps=w, num_stages=st)
    # (bench/compile_sm90.py, Triton 3.9, bf16: these spill nothing; the window positions unrolled,
    # or 128x128 tiles, spilled up to 950 bytes a thread)
    for bp, bn, bk, w, st, four in [(32, 64, 32, 4, 3, False), (64, 64, 32, 8, 3, False), (64, 128, 32, 8, 3, False),
                                    (128, 64, 32, 8, 3, False), (64, 128, 16, 8, 4, False),
                                    (32, 64, 32, 4, 3, True), (64, 64, 32, 8, 3, True), (32, 128, 32, 8, 3, True)]]
COLUMNS_ALIGN = 32  # the columns' width: C*R*S rounded up to a multiple of this


def columns_width(crs):
    return -(-crs // COLUMNS_ALIGN) * COLUMNS_ALIGN


def window_columns(x, R, S, stride, padding):
    """The im2col matrix of the shared input x [N, C, H, W], window-position-major: [4, N*h*w,
    CRSP], row (q, p) the receptive field (c, r, s flattened, zero-padded to CRSP =
    columns_width(C*R*S)) of the conv output pixel at position q (0..3, row-major) of pooled
    window p (n, ph, pw). The students share x, so this is built once per pass (for `cnn`'s 256
    images, 42 MB in bf16) and read as plain [windows, CRSP] tiles by the "columns" kernels:
    no gather, no index arithmetic per element."""
    N, C, H, W = x.shape
    HO, WO = _conv_hw(x, R, S, stride, padding)
    crs = C * R * S
    u = torch.nn.functional.unfold(x, (R, S), padding=tuple(padding), stride=tuple(stride))  # [N, CRS, HO*WO]
    u = u.view(N, crs, HO // 2, 2, WO // 2, 2).permute(3, 5, 0, 2, 4, 1)  # [qh, qw, n, ph, pw, crs]
    cols = x.new_zeros(2, 2, N, HO // 2, WO // 2, columns_width(crs))
    cols[..., :crs] = u
    return cols.view(4, N * (HO // 2) * (WO // 2), cols.shape[-1])


@triton.jit
def _first_max(acc, q, best, pos, bias, HAS_BIAS: tl.constexpr):
    """Window position q's values (its bias added) into the running max and its position: only a
    strictly larger value takes it, so ties keep the lower position (as _bias_relu_pool_store)."""
    if HAS_BIAS:
        acc += bias[None, :]
    take = acc > best
    return tl.where(take, acc, best), tl.where(take, q, pos)


@triton.autotune(_FWD_COLS, key=["NP", "KCO", "CRS"])
@triton.jit(do_not_specialize=["N", "NP", "KCO"])
def _shared_fwd_relu_pool_columns(cols_ptr, w_ptr, b_ptr, y_ptr, code_ptr, N, NP, KCO, CRS, CRSP, PHO, PWO,
                                  syn, syc, syh, syw, CO, syk, HAS_BIAS: tl.constexpr, TF32: tl.constexpr,
                                  OFF64: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                  FOUR: tl.constexpr):
    """The forward from the window columns (window_columns) and w [C*R*S, K*Co] contiguous: for
    each window position q, one product of the tile's [BP windows, CRSP] columns by the weight,
    the bias added; the window's max is the first q with the largest value, relu applied to it,
    and the code the position where that max is positive, else -1. Two ways, an autotuned choice:
    the positions one after the other, two accumulators live (each weight block loaded four
    times), or, with FOUR, the four products side by side over each weight block loaded once
    (four accumulators)."""
    pp = tl.program_id(0) * BP + tl.arange(0, BP)
    p_ok = pp < NP
    offs_o = tl.program_id(1) * BN + tl.arange(0, BN)
    o_ok = offs_o < KCO
    kk = tl.arange(0, BK)
    row = _idx(pp, OFF64) * CRSP
    plane = _idx(NP, OFF64) * CRSP
    bias = tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32) if HAS_BIAS else None
    best = tl.full((BP, BN), float("-inf"), tl.float32)
    pos = tl.zeros((BP, BN), tl.int32)
    if FOUR:
        acc0 = tl.zeros((BP, BN), tl.float32)
        acc1 = tl.zeros((BP, BN), tl.float32)
        acc2 = tl.zeros((BP, BN), tl.float32)
        acc3 = tl.zeros((BP, BN), tl.float32)
        for k0 in range(0, CRSP, BK):
            crs = k0 + kk
            b = tl.load(w_ptr + (_idx(crs, OFF64) * KCO)[:, None] + offs_o[None, :],
                        mask=(crs < CRS)[:, None] & o_ok[None, :], other=0.0)
            a_ptr = cols_ptr + row[:, None] + crs[None, :]
            acc0 = _mma(tl.load(a_ptr, mask=p_ok[:, None], other=0.0), b, acc0, TF32)
            acc1 = _mma(tl.load(a_ptr + plane, mask=p_ok[:, None], other=0.0), b, acc1, TF32)
            acc2 = _mma(tl.load(a_ptr + 2 * plane, mask=p_ok[:, None], other=0.0), b, acc2, TF32)
            acc3 = _mma(tl.load(a_ptr + 3 * plane, mask=p_ok[:, None], other=0.0), b, acc3, TF32)
        best, pos = _first_max(acc0, 0, best, pos, bias, HAS_BIAS)
        best, pos = _first_max(acc1, 1, best, pos, bias, HAS_BIAS)
        best, pos = _first_max(acc2, 2, best, pos, bias, HAS_BIAS)
        best, pos = _first_max(acc3, 3, best, pos, bias, HAS_BIAS)
    else:
        for q in range(4):  # a loop, not unrolled (as in the weight gradient)
            acc = tl.zeros((BP, BN), tl.float32)
            for k0 in range(0, CRSP, BK):
                crs = k0 + kk
                a = tl.load(cols_ptr + q * plane + row[:, None] + crs[None, :], mask=p_ok[:, None], other=0.0)
                b = tl.load(w_ptr + (_idx(crs, OFF64) * KCO)[:, None] + offs_o[None, :],
                            mask=(crs < CRS)[:, None] & o_ok[None, :], other=0.0)
                acc = _mma(a, b, acc, TF32)
            best, pos = _first_max(acc, q, best, pos, bias, HAS_BIAS)
    code = tl.where(best > 0, pos, -1)
    _store_windows(tl.maximum(best, 0.0), code, pp, offs_o, o_ok, y_ptr, code_ptr, N, KCO, PHO, PWO,
                   syn, syc, syh, syw, CO, syk, OFF64)


# BN: output channels per tile, BP: windows of the reduction, BK: the (c, r, s) block
_WGRAD_COLS = [triton.Config({"BN": 16, "BP": 16, "BK": 16}, num_warps=4)] if _INTERPRET else [
    triton.Config({"BN": bn, "BP": bp, "BK": bk}, num_warps=w, num_stages=st)
    # (as above: these spill nothing in bf16; 64 windows a block spilled 8-600 bytes a thread)
    for bn, bp, bk, w, st in [(64, 32, 128, 8, 3), (64, 32, 64, 4, 3), (128, 32, 64, 8, 3), (64, 32, 128, 8, 2)]]


@triton.autotune(_WGRAD_COLS, key=["NP", "KCO", "CRS", "SPLIT"], restore_value=["dw_ptr", "db_ptr"])
@triton.jit(do_not_specialize=["N", "NP", "KCO"])
def _shared_wgrad_relu_pool_columns(cols_ptr, dp_ptr, code_ptr, dw_ptr, db_ptr, N, NP, KCO, CO, CRS, CRSP, PHO, PWO,
                                    sdn, sdk, sdc, sdh, sdw, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                    TF32: tl.constexpr, OFF64: tl.constexpr,
                                    BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    """dw [K*Co, C*R*S] and db [K*Co] (fp32) from the window columns and the pooled gradient dp
    [N, K, Co, PHO, PWO] (strides sd*) with the contiguous codes [N, K*Co, PHO, PWO]: a block of
    windows loads each window's gradient and code once, and for each position q the gradient at
    the conv output there (dp where the code is q, else 0: never stored) times the columns of
    position q. Grid: (channel tiles, crs tiles, SPLIT slices of the windows)."""
    offs_j = tl.program_id(0) * BN + tl.arange(0, BN)
    j_ok = offs_j < KCO
    crs = tl.program_id(1) * BK + tl.arange(0, BK)
    c_ok = crs < CRSP
    per = tl.cdiv(tl.cdiv(NP, SPLIT), BP) * BP
    lo = tl.program_id(2) * per
    hi = tl.minimum(lo + per, NP)
    dp_ch = (_idx(offs_j // CO, OFF64) * sdk + _idx(offs_j % CO, OFF64) * sdc)[:, None]
    code_ch = (_idx(offs_j, OFF64) * (PHO * PWO))[:, None]
    acc = tl.zeros((BN, BK), tl.float32)
    acc_b = tl.zeros((BN,), tl.float32)
    for p0 in range(lo, hi, BP):
        p = p0 + tl.arange(0, BP)
        p_ok = p < hi
        n = _idx(p // (PHO * PWO), OFF64)
        ph, pw = (p // PWO) % PHO, p % PWO
        ok = j_ok[:, None] & p_ok[None, :]
        g = tl.load(dp_ptr + dp_ch + (n * sdn + ph * sdh + pw * sdw)[None, :], mask=ok, other=0.0)
        code = tl.load(code_ptr + code_ch + (n * (KCO * PHO * PWO) + ph * PWO + pw)[None, :], mask=ok, other=-1)
        a_ptr = cols_ptr + (_idx(p, OFF64) * CRSP)[:, None] + crs[None, :]
        a_ok = p_ok[:, None] & c_ok[None, :]
        for q in range(4):  # a loop, not unrolled: four sets of [BP, BK] pointers spilled on sm_90
            a = tl.load(a_ptr + _idx(q * NP, OFF64) * CRSP, mask=a_ok, other=0.0)
            acc = _mma(tl.where(code == q, g, 0.0).to(a.dtype), a, acc, TF32)
        if HAS_BIAS:
            acc_b += tl.sum(tl.where(code >= 0, g.to(tl.float32), 0.0), axis=1)
    _store_wgrad(acc, acc_b, dw_ptr, db_ptr, offs_j, j_ok, crs, CRS, SPLIT, HAS_BIAS)


@triton.jit
def _store_wgrad(acc, acc_b, dw_ptr, db_ptr, offs_j, j_ok, crs, CRS, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A weight-gradient tile's epilogue: the [channels offs_j, crs] tile into dw [K*Co, C*R*S] and
    the channels' bias gradient into db (the first crs tile's program), stored, or added with fp32
    atomics into zeros where SPLIT programs share the reduction."""
    dst = dw_ptr + (offs_j * CRS)[:, None] + crs[None, :]  # dw is small: 32-bit offsets
    mask = j_ok[:, None] & (crs < CRS)[None, :]
    if SPLIT == 1:
        tl.store(dst, acc, mask=mask)
    else:
        tl.atomic_add(dst, acc, mask=mask)
    if HAS_BIAS:
        if tl.program_id(1) == 0:  # one crs tile adds the bias gradient
            if SPLIT == 1:
                tl.store(db_ptr + offs_j, acc_b, mask=j_ok)
            else:
                tl.atomic_add(db_ptr + offs_j, acc_b, mask=j_ok)


# restore_value: autotuning runs the kernel once per config; dw and db must still hold the
# launcher's zeros when the chosen config runs (the split path accumulates with atomics)
@triton.autotune(_WGRAD, key=_KEY + ["SPLIT"], restore_value=["dw_ptr", "db_ptr"])
@triton.jit(do_not_specialize=["N", "C", "H", "W", "KCO", "HO", "WO"])
def _shared_wgrad_relu_pool(x_ptr, dp_ptr, code_ptr, dw_ptr, db_ptr, N, C, H, W, KCO, HO, WO, CO,
                            sxn, sxc, sxh, sxw, sdn, sdk, sdc, sdh, sdw,
                            SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                            R: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            TF32: tl.constexpr, OFF64: tl.constexpr,
                            BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """dw [K*Co, C*R*S] and db [K*Co] (fp32) from the pooled gradient dp [N, K, Co, HO/2, WO/2]
    (strides sd*: channel j = k * Co + co) and the contiguous codes [N, K*Co, HO/2, WO/2].
    Grid: (channel tiles, crs tiles, SPLIT)."""
    PHO, PWO = HO // 2, WO // 2
    CRS = C * R * S
    offs_j = tl.program_id(0) * BN + tl.arange(0, BN)
    j_ok = offs_j < KCO
    crs = tl.program_id(1) * BK + tl.arange(0, BK)
    split = tl.program_id(2)
    M = N * HO * WO
    per = tl.cdiv(tl.cdiv(M, SPLIT), BM) * BM
    lo = split * per
    hi = tl.minimum(lo + per, M)
    mm = tl.arange(0, BM)
    dp_ch = (_idx(offs_j // CO, OFF64) * sdk + _idx(offs_j % CO, OFF64) * sdc)[:, None]
    code_ch = (_idx(offs_j, OFF64) * (PHO * PWO))[:, None]
    acc = tl.zeros((BN, BK), tl.float32)
    acc_b = tl.zeros((BN,), tl.float32)
    for m0 in range(lo, hi, BM):
        m = m0 + mm
        m_ok = m < hi
        n, ph, pw, q, ih0, iw0 = _windows(m, PHO, PWO, SH, SW, PH, PW)
        nn = _idx(n, OFF64)
        ok = j_ok[:, None] & m_ok[None, :]
        g = tl.load(dp_ptr + dp_ch + (nn * sdn + ph * sdh + pw * sdw)[None, :], mask=ok, other=0.0)
        code = tl.load(code_ptr + code_ch + (nn * (KCO * PHO * PWO) + ph * PWO + pw)[None, :], mask=ok, other=-1)
        dz = tl.where(code == q[None, :], g, 0.0)  # [BN, BM]: the gradient at the conv's output
        a = _im2col(x_ptr, nn * sxn + ih0 * sxh + iw0 * sxw, ih0, iw0, m_ok, crs, CRS, H, W, sxc, sxh, sxw,
                    R, S, OFF64)
        acc = _mma(dz.to(a.dtype), a, acc, TF32)
        if HAS_BIAS:
            acc_b += tl.sum(dz.to(tl.float32), axis=1)
    _store_wgrad(acc, acc_b, dw_ptr, db_ptr, offs_j, j_ok, crs, CRS, SPLIT, HAS_BIAS)


def _off64(*tensors):
    """Whether an element offset into one of the tensors may pass 2^31 - 1 (then the kernels index
    in 64 bits; else in 32)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= (1 << 31) - 1 for t in tensors)


def _conv_hw(x, R, S, stride, padding):
    H, W = x.shape[-2:]
    return _out_size(H, R, stride[0], padding[0]), _out_size(W, S, stride[1], padding[1])


def _check(x, w, stride, padding):
    if x.dim() != 4 or w.dim() != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"shared conv + relu + pool: input {tuple(x.shape)} [N, C, H, W] and weight "
                         f"{tuple(w.shape)} [K*Co, C, R, S] do not match")
    HO, WO = _conv_hw(x, *w.shape[2:], stride, padding)
    if HO % 2 or WO % 2 or HO < 2 or WO < 2:
        raise ValueError(f"shared conv + relu + 2x2 max-pool: the convolution's output {HO}x{WO} must be "
                         "even-sized")
    return HO, WO


FWD_METHODS = ("tile", "resident", "columns")
FWD = "auto"  # the forward shared_conv_relu_pool_forward runs when none is named
fwd_choices: dict = {}  # auto's timings per shape, as wgrad_choices


def shared_conv_relu_pool_forward(x, w, b, stride, padding, channels_last=False, method=None, students=None,
                                  keep=None):
    """(y, code) for the shared input x [N, C, H, W] and the students' stacked weights
    w [K*Co, C, R, S] (same dtype as x), bias [K*Co] or None: y = max_pool2d(relu(conv2d(x, w, b)), 2)
    [N, K*Co, Ho/2, Wo/2] in x's dtype (stored channels-last if ``channels_last``), code the int8
    window codes of the same shape (contiguous). ``students`` (K, dividing K*Co): y comes back as
    [N, K, Co, Ho/2, Wo/2], stored [K, N, Ho/2, Wo/2, Co] (each student's [N, Co, h, w] a
    channels-last block: the layout fastagg.ops.dense_conv's per-student convolutions read
    without a copy); ``channels_last`` is then moot. ``method``: "tile" (_shared_fwd_relu_pool),
    "resident" (_shared_fwd_relu_pool_resident, for C*R*S up to RESIDENT_MAX_CRS), "columns"
    (_shared_fwd_relu_pool_columns, from window_columns(x)) or "auto": on a GPU each that applies
    timed once per shape and the fastest kept (fwd_choices), elsewhere resident where it applies,
    else tile; None: ``FWD``. ``keep``: a dict, where the columns method leaves the window columns
    it built (under "columns"), for the weight gradient's columns method to reuse."""
    HO, WO = _check(x, w, stride, padding)
    N, C, H, W = x.shape
    KCO, _, R, S = w.shape
    method = FWD if method is None else method
    if method not in FWD_METHODS + ("auto",):
        raise ValueError(f"shared conv + relu + pool, forward: unknown method {method!r}; choose from "
                         f"{FWD_METHODS + ('auto',)}")
    resident_ok = C * R * S <= RESIDENT_MAX_CRS
    if method == "resident" and not resident_ok:
        raise ValueError(f"shared conv + relu + pool, forward: the resident method takes C*R*S up to "
                         f"{RESIDENT_MAX_CRS}, got {C * R * S}")
    if students is not None and (students < 1 or KCO % students):
        raise ValueError(f"shared conv + relu + pool, forward: {KCO} output channels do not split into "
                         f"{students} students")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    wt = w.reshape(KCO, C * R * S).t().contiguous()  # [C*R*S, K*Co]
    b = None if b is None else b.contiguous()
    K = students or 1
    CO = KCO // K

    def run(m, keep=keep):
        shape = (N, KCO, HO // 2, WO // 2)
        if students is None:
            y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
            ys, syk = y.stride(), CO * y.stride(1)
        else:  # [K, N, h, w, Co] seen as [N, K, Co, h, w]
            y = torch.empty(K, N, *shape[2:], CO, dtype=x.dtype, device=x.device).permute(1, 0, 4, 2, 3)
            ys, syk = (y.stride(0), y.stride(2), y.stride(3), y.stride(4)), y.stride(1)
        code = torch.empty(shape, dtype=torch.int8, device=x.device)
        if m == "columns":
            cols = window_columns(x, R, S, stride, padding)
            if keep is not None:
                keep["columns"] = cols
            NP = N * (HO // 2) * (WO // 2)
            _shared_fwd_relu_pool_columns[lambda meta: (triton.cdiv(NP, meta["BP"]), triton.cdiv(KCO, meta["BN"]))](
                cols, wt, b if b is not None else wt, y, code, N, NP, KCO, C * R * S, cols.shape[-1], HO // 2,
                WO // 2, *ys, CO, syk, HAS_BIAS=b is not None, TF32=_tf32(x.dtype), OFF64=_off64(cols, wt, y, code))
            return y, code
        args = (x, wt, b if b is not None else wt, y, code, N, C, H, W, KCO, HO, WO, *x.stride(), *ys, CO, syk)
        kw = dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], R=R, S=S, HAS_BIAS=b is not None,
                  TF32=_tf32(x.dtype), OFF64=_off64(x, wt, y, code))
        if m == "tile":
            _shared_fwd_relu_pool[lambda meta: (triton.cdiv(N * HO * WO, meta["BM"]),
                                                triton.cdiv(KCO, meta["BN"]))](*args, **kw)
        else:
            ka, kb = resident_chunks(C * R * S)
            _shared_fwd_relu_pool_resident[lambda meta: (triton.cdiv(N * HO * WO, meta["BM"]),
                                                         triton.cdiv(KCO, meta["BN"] * meta["JT"]))](
                *args, KA=ka, KB=kb, **kw)
        return y, code

    if method == "auto":
        key = (x.device, tuple(x.shape), tuple(w.shape), x.dtype, tuple(stride), tuple(padding), b is not None,
               channels_last, students)
        methods = [m for m in FWD_METHODS if resident_ok or m != "resident"]
        # timed without ``keep``: columns built while timing (in a CUDA graph's pool) are not handed on
        method = _pick(fwd_choices, key, methods, lambda m: run(m, None), default="resident" if resident_ok else "tile")
    return run(method)


WGRAD_METHODS = ("kernel", "unpool", "columns")
WGRAD = "auto"  # the method shared_conv_relu_pool_wgrad uses when none is named
wgrad_choices: dict = {}  # auto's timings per shape: {key: {"kernel": ms, "unpool": ms, "chosen": method}}


@triton.jit
def _unpool_chain(dp_ptr, code_ptr, dz_ptr, db_ptr, NP, KCO, CO, PHO, PWO,
                  sdn, sdk, sdc, sdh, sdw, szn, szc, szh, szw,
                  HAS_BIAS: tl.constexpr, OFF64: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr):
    """dz [N, K*Co, 2*PHO, 2*PWO] (strides sz*) from the pooled gradient dp [N, K, Co, PHO, PWO]
    (strides sd*) and the contiguous codes [N, K*Co, PHO, PWO]: a tile of (channels, windows)
    loads each window's gradient and code once and writes its four pixels, dp at the code's
    position and 0 elsewhere (everywhere where relu zeroed the window). With HAS_BIAS it adds the
    tile's sum of the kept dp per channel into db [K*Co] (fp32 atomics into zeros).

    The tile is [channels, windows]: the loads, contiguous along windows (a row of pooled pixels),
    get the default layout, windows fastest; the stores into a channels-last dz are contiguous
    along channels, which the compiler sees (szc = 1) and gives them a layout of their own, the
    tile transposed through shared memory between. (Windows along the last axis and channels
    first, both ran channels fastest: each load a separate sector, h*w elements apart.)"""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    j_ok = j < KCO
    ok = j_ok[:, None] & (p < NP)[None, :]
    n = _idx(p // (PHO * PWO), OFF64)
    ph = _idx((p // PWO) % PHO, OFF64)
    pw = _idx(p % PWO, OFF64)
    jj = _idx(j, OFF64)
    g = tl.load(dp_ptr + ((jj // CO) * sdk + (jj % CO) * sdc)[:, None] + (n * sdn + ph * sdh + pw * sdw)[None, :],
                mask=ok, other=0.0)
    code = tl.load(code_ptr + (jj * (PHO * PWO))[:, None] + (n * (KCO * PHO * PWO) + ph * PWO + pw)[None, :],
                   mask=ok, other=-1)
    top_left = dz_ptr + (jj * szc)[:, None] + (n * szn + 2 * ph * szh + 2 * pw * szw)[None, :]
    zero = tl.zeros_like(g)
    tl.store(top_left, tl.where(code == 0, g, zero), mask=ok)  # position q = 2 * row + column
    tl.store(top_left + szw, tl.where(code == 1, g, zero), mask=ok)
    tl.store(top_left + szh, tl.where(code == 2, g, zero), mask=ok)
    tl.store(top_left + szh + szw, tl.where(code == 3, g, zero), mask=ok)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + j, tl.sum(tl.where(code >= 0, g.to(tl.float32), 0.0), axis=1), mask=j_ok)


def unpool_chain(dp5, code, channels_last, bias):
    """(dz [N, K*Co, 2h, 2w] in dp's dtype, channels-last when asked, and db [K*Co] fp32 or None):
    the gradient at the chain's convolution output, by _unpool_chain, from dp5 [N, K, Co, h, w]
    (any strides) and the contiguous codes [N, K*Co, h, w]."""
    N, K, CO, h, w = dp5.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dz = torch.empty(N, K * CO, 2 * h, 2 * w, dtype=dp5.dtype, device=dp5.device, memory_format=fmt)
    db = torch.zeros(K * CO, dtype=torch.float32, device=dp5.device) if bias else dz
    BP, BJ = (16, 16) if _INTERPRET else (32, 64)
    grid = (triton.cdiv(N * h * w, BP), triton.cdiv(K * CO, BJ))
    _unpool_chain[grid](dp5, code, dz, db, N * h * w, K * CO, CO, h, w, *dp5.stride(), *dz.stride(),
                        HAS_BIAS=bias, OFF64=_off64(dp5, code, dz), BP=BP, BJ=BJ, num_warps=4)
    return dz, (db if bias else None)


def _wgrad_unpool(x, dp5, code, w_shape, stride, padding, bias):
    """The "unpool" method: dz [N, K*Co, Ho, Wo] with each window's pooled gradient at its code's
    position (zero elsewhere, and where relu zeroed the window), written by one kernel that reads
    dp and the codes once (unpool_chain; until the eighteenth session a torch.where over a 7-D
    view, 19.7 ms for `cnn`'s 2.1 GB on the H100, ~150 GB/s), then the dense weight gradient of
    conv2d (cuDNN on a GPU; channels-last there, the layout its bf16 kernels run in). dw comes
    back in x's dtype (for bf16 that rounds it once, as the native route's does); the bias
    gradient is the kernel's fp32 sum of the kept dp."""
    cl = x.is_cuda
    dz, db = unpool_chain(dp5, code, cl, bias)
    fmt = torch.channels_last if cl else torch.contiguous_format
    dw = torch.nn.grad.conv2d_weight(x.contiguous(memory_format=fmt), w_shape, dz, stride, padding)
    return dw.float(), db


def _pick(choices, key, methods, run, default):
    """auto: ``default`` on a CPU (the Triton interpreter), and during a CUDA graph capture before
    any timing (nothing can be timed then); on a GPU each method timed once per shape
    (fastagg.ops.timing.time_each: a warm-up run, then the median of three replays of a CUDA graph
    of each, with events; "timed" in the record says if it had to time them uncaptured) and the
    fastest kept in ``choices[key]``. A method that runs out of device memory (unpool's dz is 4x
    the pooled gradient) is timed as infinitely slow."""
    if key in choices:
        return choices[key]["chosen"]
    if key[0].type != "cuda" or torch.cuda.is_current_stream_capturing():
        return default
    how = {}
    ms = time_each(methods, run, key[0], how=how)
    choices[key] = {**ms, "chosen": min(ms, key=ms.get), **how}
    return choices[key]["chosen"]


def _pick_wgrad(key, run):
    """The weight gradient's method for ``key`` (see _pick; the kernel on a CPU)."""
    return _pick(wgrad_choices, key, WGRAD_METHODS, run, default="kernel")


def shared_conv_relu_pool_wgrad(x, dp, code, w_shape, stride, padding, bias=True, method=None, columns=None):
    """(dw [K*Co, C, R, S], db [K*Co] or None), fp32, of the chain above from its pooled gradient
    (x's dtype, any strides) and the forward's codes. dp is [N, K*Co, Ho/2, Wo/2], or [N, K, Co,
    Ho/2, Wo/2] (e.g. the movedim'd view of what a vmap over the students returns: no copy).
    ``method``: "kernel", "unpool", "columns" or "auto" (see the module's docstring); None: ``WGRAD``.
    ``columns``: the forward's window columns of x (its ``keep``), which the columns method then
    does not build again."""
    N, C, H, W = x.shape
    KCO, _, R, S = w_shape
    HO, WO = _conv_hw(x, R, S, stride, padding)
    pooled = (N, KCO, HO // 2, WO // 2)
    if dp.dim() == 5:  # [N, K, Co, h, w]
        ok = dp.shape[0] == N and dp.shape[1] * dp.shape[2] == KCO and tuple(dp.shape[3:]) == pooled[2:]
    else:
        ok = tuple(dp.shape) == pooled
    if not ok or tuple(code.shape) != pooled or not code.is_contiguous():
        raise ValueError(f"shared conv + relu + pool, weight gradient: pooled gradient {tuple(dp.shape)} and "
                         f"codes {tuple(code.shape)} do not fit input {tuple(x.shape)} and weight {tuple(w_shape)}")
    method = WGRAD if method is None else method
    if method not in WGRAD_METHODS + ("auto",):
        raise ValueError(f"shared conv + relu + pool, weight gradient: unknown method {method!r}; choose from "
                         f"{WGRAD_METHODS + ('auto',)}")
    dp5 = dp if dp.dim() == 5 else dp.unsqueeze(1)  # [N, K, Co, h, w]; K = 1 for [N, K*Co, h, w]
    args = (x, dp5, code, tuple(w_shape), tuple(stride), tuple(padding), bias)
    run = {**_WGRAD_RUN, "columns": lambda *a: _wgrad_columns(*a, columns=columns)}
    if method == "auto":
        key = (x.device, tuple(x.shape), tuple(dp5.shape), x.dtype) + args[3:]
        method = _pick_wgrad(key, lambda m: run[m](*args))
    return run[method](*args)


def _wgrad_kernel(x, dp5, code, w_shape, stride, padding, bias):
    """The "kernel" method: _shared_wgrad_relu_pool, the reduction over pixels split over programs
    where the output tiles alone would not fill the device."""
    N, C, H, W = x.shape
    KCO, _, R, S = w_shape
    HO, WO = _conv_hw(x, R, S, stride, padding)
    CO, CRS = dp5.shape[2], C * R * S
    split = reduction_split(triton.cdiv(KCO, 64) * triton.cdiv(CRS, 64), N * HO * WO, x.device)
    new = torch.zeros if split > 1 else torch.empty
    dw = new(KCO, CRS, dtype=torch.float32, device=x.device)
    db = new(KCO, dtype=torch.float32, device=x.device) if bias else dw

    def grid(meta):
        return triton.cdiv(KCO, meta["BN"]), triton.cdiv(CRS, meta["BK"]), split

    _shared_wgrad_relu_pool[grid](x, dp5, code, dw, db, N, C, H, W, KCO, HO, WO, CO, *x.stride(), *dp5.stride(),
                                  SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], R=R, S=S,
                                  SPLIT=split, HAS_BIAS=bias, TF32=_tf32(x.dtype), OFF64=_off64(x, dp5, code))
    return dw.view(w_shape), (db if bias else None)


def _wgrad_columns(x, dp5, code, w_shape, stride, padding, bias, columns=None):
    """The "columns" method: _shared_wgrad_relu_pool_columns over the window columns of x (the
    forward's, or built here), the reduction over windows split as in the kernel method."""
    N, C, H, W = x.shape
    KCO, _, R, S = w_shape
    HO, WO = _conv_hw(x, R, S, stride, padding)
    cols = window_columns(x, R, S, stride, padding) if columns is None else columns
    CO, CRS, NP = dp5.shape[2], C * R * S, N * (HO // 2) * (WO // 2)
    if tuple(cols.shape) != (4, NP, columns_width(CRS)) or cols.dtype != x.dtype or not cols.is_contiguous():
        raise ValueError(f"shared conv + relu + pool, weight gradient: columns {tuple(cols.shape)} {cols.dtype} are "
                         f"not the window columns of input {tuple(x.shape)} {x.dtype} for weight {tuple(w_shape)}")
    split = reduction_split(triton.cdiv(KCO, 64) * triton.cdiv(CRS, 64), NP * 4, x.device)
    new = torch.zeros if split > 1 else torch.empty
    dw = new(KCO, CRS, dtype=torch.float32, device=x.device)
    db = new(KCO, dtype=torch.float32, device=x.device) if bias else dw

    def grid(meta):
        return triton.cdiv(KCO, meta["BN"]), triton.cdiv(CRS, meta["BK"]), split

    _shared_wgrad_relu_pool_columns[grid](cols, dp5, code, dw, db, N, NP, KCO, CO, CRS, cols.shape[-1], HO // 2,
                                          WO // 2, *dp5.stride(), SPLIT=split, HAS_BIAS=bias, TF32=_tf32(x.dtype),
                                          OFF64=_off64(cols, dp5, code))
    return dw.view(w_shape), (db if bias else None)


_WGRAD_RUN = {"kernel": _wgrad_kernel, "unpool": _wgrad_unpool, "columns": _wgrad_columns}
