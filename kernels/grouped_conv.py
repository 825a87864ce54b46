"""Grouped 2-D convolution of K students, forward and both backwards, as implicit GEMMs.

Why: ``torch.func.vmap`` turns the convolution of K students (each with its own weights) into
one grouped convolution with ``groups=K``, and cuDNN's grouped kernels run far below the
tensor-core rate (the H100 figures in bench/results). Here each student is one GEMM that is
never materialised (implicit GEMM: the im2col gather happens in the loads), all K of them in
one launch, with bf16/fp16/fp32 operands and fp32 accumulation.

Shapes (logical NCHW, the layout vmap hands over), any strides:
    x  [K, N, C, H, W]    (a stride-0 K dimension is fine: the proxy batch shared by all students)
    w  [K, Co, C, R, S]
    y  [K, N, Co, Ho, Wo]  y = conv2d(x[k], w[k], stride, padding) (+ b[k]), stored NCHW or, with
                           ``channels_last=True``, [K, N, Ho, Wo, Co] (so are data gradients)

    forward        GEMM per student: [N*Ho*Wo, C*R*S] x [C*R*S, Co]
    backward data  GEMM per student: [N*H*W, Co*R*S] x [Co*R*S, C]   (gather of dy, masked on stride)
    backward weight GEMM per student: [Co, N*Ho*Wo] x [N*Ho*Wo, C] for each (r, s); the long
                   reduction over N*Ho*Wo can be split over programs (fp32 atomics)

    forward + relu + 2x2 max-pool: the forward GEMM with the tile's pixels ordered window by
                   window; the epilogue pools the fp32 tile and stores the pooled values and an
                   int8 code per window (``unpool_relu`` turns a pooled gradient back into the
                   gradient at the convolution's output in one pass)

Loops run over (r, s) outside and channels inside, so no division sits in the inner loop.
Offsets into x, dy and y are 64-bit (K*N*C*H*W passes 2^31 for a buffer of students).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET = tl.constexpr(_INTERPRET)


def _configs(shapes):
    if _INTERPRET:  # the interpreter runs one config and pays per program: few, small blocks
        return [triton.Config({"BM": 32, "BN": 16, "BK": 16}, num_warps=4)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# shapes vary per layer: one compiled kernel per (taps, stride, padding), not per divisibility of
# every size (strides stay specialised: a unit stride is what makes a load contiguous)
_SHAPE_ARGS = ["N", "C", "H", "W", "CO", "HO", "WO"]
_FWD = _configs([(128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (64, 128, 64, 4, 3)])
_WGRAD = _configs([(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (32, 32, 128, 4, 3)])


@triton.jit
def _mma(a, b, acc, TF32: tl.constexpr):
    if INTERPRET:  # the interpreter's dot does not take bf16/fp16 operands; their fp32 products are exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, allow_tf32=False)
    return tl.dot(a, b, acc, allow_tf32=TF32)


@triton.jit
def _pixels(pid, BM: tl.constexpr, N, H, W):
    """The BM pixels (n, row, col) of an [N, H, W] grid that program ``pid`` owns, and their mask."""
    offs = pid * BM + tl.arange(0, BM)
    return offs < N * H * W, (offs // (H * W)).to(tl.int64), (offs // W) % H, offs % W


@triton.jit
def _offset(n_off, row, col, sh, sw, OFF64: tl.constexpr):
    """n_off + row * sh + col * sw: a pixel's offset within one student, 64-bit when OFF64."""
    if OFF64:
        return n_off + row.to(tl.int64) * sh + col.to(tl.int64) * sw
    return n_off + row * sh + col * sw


@triton.jit
def _gather_mma(acc, a_base, a_pix, a_ok, a_step, b_base, b_tap, b_step, b_ok, c, CH, TF32: tl.constexpr):
    """acc += A @ B for one block of channels c: A [BM, c] gathered at a_base + a_pix + c * a_step
    (rows masked by a_ok), B [c, BN] at b_base + b_tap + c * b_step (columns masked by b_ok);
    a_pix and b_tap are offsets within one student (32-bit unless the tensors need 64)."""
    a = tl.load(a_base + (a_pix[:, None] + c[None, :] * a_step), mask=a_ok[:, None] & (c < CH)[None, :], other=0.0)
    b = tl.load(b_base + (b_tap[None, :] + c[:, None] * b_step), mask=(c < CH)[:, None] & b_ok[None, :], other=0.0)
    return _mma(a, b, acc, TF32)


@triton.jit
def _downcast(x, dtype: tl.constexpr):
    """fp32 -> ``dtype``, rounded to nearest even. The interpreter truncates on a downcast to
    bf16 (a GPU rounds), which would bias every stored activation by up to one bf16 ulp and move
    max-pool windows that a GPU would not; so under it the rounding is done on the bits."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _store(ptr, acc, k, n, row, col, offs_ch, syk, syn, syc, syh, syw, m_ok, ch_ok):
    """Store a [pixels, channels] tile into a [K, N, CH, H, W] tensor with strides sy* (NCHW, or
    channels-last: then the store is contiguous along the tile's channels)."""
    pix = k * syk + n * syn + row.to(tl.int64) * syh + col.to(tl.int64) * syw
    dst = ptr + pix[:, None] + offs_ch.to(tl.int64)[None, :] * syc
    tl.store(dst, _downcast(acc, ptr.dtype.element_ty), mask=m_ok[:, None] & ch_ok[None, :])


@triton.autotune(_FWD, key=["N", "C", "H", "W", "CO", "HO", "WO", "R", "S", "SH", "SW", "sxc", "syc"])
@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _conv_fwd(x_ptr, w_ptr, b_ptr, y_ptr, N, C, H, W, CO, HO, WO,
              sxk, sxn, sxc, sxh, sxw, swk, swo, swc, swr, sws, syk, syn, syc, syh, syw,
              SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
              R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr, OFF64: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    k = tl.program_id(2).to(tl.int64)
    m_ok, n, oh, ow = _pixels(tl.program_id(0), BM, N, HO, WO)  # output pixels
    offs_o = tl.program_id(1) * BN + tl.arange(0, BN)  # output channels
    o_ok = offs_o < CO
    acc = _fwd_tile(x_ptr, w_ptr, b_ptr, k, n, oh, ow, m_ok, offs_o, o_ok, C, H, W, CO,
                    sxk, sxn, sxc, sxh, sxw, swk, swo, swc, swr, sws, SH, SW, PH, PW, R, S, HAS_BIAS, TF32, OFF64,
                    BM, BN, BK)
    _store(y_ptr, acc, k, n, oh, ow, offs_o, syk, syn, syc, syh, syw, m_ok, o_ok)


@triton.jit
def _fwd_tile(x_ptr, w_ptr, b_ptr, k, n, oh, ow, m_ok, offs_o, o_ok, C, H, W, CO,
              sxk, sxn, sxc, sxh, sxw, swk, swo, swc, swr, sws,
              SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
              R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr, OFF64: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The [BM pixels, BN output channels] tile of student k's convolution (+ bias), fp32.

    One loop over (tap, channel block), the reduction of the implicit GEMM, so that it is
    software-pipelined once; unrolled per tap, nine pipelined loops kept every conv kernel at 255
    registers with up to 3.4 KB of spills per thread on sm_90 (bench/compile_sm90.py reads them)."""
    x_base, w_base = x_ptr + k * sxk, w_ptr + k * swk  # this student's tensors
    if OFF64:
        x_n, w_o = n * sxn, offs_o.to(tl.int64) * swo
    else:  # offsets within one student fit 32 bits (the host checks): fewer registers than 64-bit tiles
        x_n, w_o = n.to(tl.int32) * sxn, offs_o * swo
    acc = tl.zeros((BM, BN), tl.float32)
    nc = tl.cdiv(C, BK)
    cc = tl.arange(0, BK)
    for it in range(0, R * S * nc):
        tap = it // nc
        r = tap // S
        s = tap - r * S
        ih = oh * SH - PH + r
        iw = ow * SW - PW + s
        px_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        acc = _gather_mma(acc, x_base, _offset(x_n, ih, iw, sxh, sxw, OFF64), px_ok, sxc,
                          w_base, w_o + r * swr + s * sws, swc, o_ok, (it - tap * nc) * BK + cc, C, TF32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k * CO + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(_FWD, key=["N", "C", "H", "W", "CO", "HO", "WO", "R", "S", "SH", "SW", "sxc", "syc"])
@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _conv_fwd_relu_pool(x_ptr, w_ptr, b_ptr, y_ptr, code_ptr, N, C, H, W, CO, HO, WO,
                        sxk, sxn, sxc, sxh, sxw, swk, swo, swc, swr, sws, syk, syn, syc, syh, syw,
                        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr,
                        OFF64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """max_pool2d(relu(conv + bias), 2) in the epilogue: the tile's pixels run window by window
    (four consecutive rows are one 2x2 window of the even-sized output), so the pooled values are
    a max over groups of four rows. Stores the pooled [K, N, Co, HO/2, WO/2] (strides sy*) and,
    contiguous in the same shape, int8 codes: the window position (0..3, row-major) of the max,
    or -1 where the pooled value is not positive (relu passes no gradient there)."""
    k = tl.program_id(2).to(tl.int64)
    PHO, PWO = HO // 2, WO // 2
    offs = tl.program_id(0) * BM + tl.arange(0, BM)
    p, q = offs // 4, offs % 4
    m_ok = offs < N * HO * WO
    n = (p // (PHO * PWO)).to(tl.int64)
    oh, ow = ((p // PWO) % PHO) * 2 + q // 2, (p % PWO) * 2 + q % 2
    offs_o = tl.program_id(1) * BN + tl.arange(0, BN)
    o_ok = offs_o < CO
    acc = _fwd_tile(x_ptr, w_ptr, b_ptr, k, n, oh, ow, m_ok, offs_o, o_ok, C, H, W, CO,
                    sxk, sxn, sxc, sxh, sxw, swk, swo, swc, swr, sws, SH, SW, PH, PW, R, S, HAS_BIAS, TF32, OFF64,
                    BM, BN, BK)
    pooled, pos = tl.max(tl.reshape(tl.maximum(acc, 0.0), (BM // 4, 4, BN)), axis=1, return_indices=True,
                         return_indices_tie_break_left=True)
    code = tl.where(pooled > 0, pos, -1)
    pp = tl.program_id(0) * (BM // 4) + tl.arange(0, BM // 4)
    p_ok = pp < N * PHO * PWO
    pn, ph, pw = (pp // (PHO * PWO)).to(tl.int64), (pp // PWO) % PHO, pp % PWO
    _store(y_ptr, pooled, k, pn, ph, pw, offs_o, syk, syn, syc, syh, syw, p_ok, o_ok)
    _store(code_ptr, code, k, pn, ph, pw, offs_o, N * CO * PHO * PWO, CO * PHO * PWO, PHO * PWO, PWO, 1, p_ok, o_ok)


@triton.jit
def _unpool_relu(dp_ptr, code_ptr, dy_ptr, TOTAL, HO, WO, BLOCK: tl.constexpr):
    """dy [planes, HO, WO] from the pooled gradient dp and the codes [planes, HO/2, WO/2] (both
    contiguous): dp where this pixel is the window's positive max, else 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    w = offs % WO
    h = (offs // WO) % HO
    src = (offs // (HO * WO)) * ((HO // 2) * (WO // 2)) + (h // 2) * (WO // 2) + w // 2
    code = tl.load(code_ptr + src, mask=ok, other=-1)
    g = tl.load(dp_ptr + src, mask=ok & (code == (h % 2) * 2 + w % 2), other=0.0)
    tl.store(dy_ptr + offs, g, mask=ok)


@triton.autotune(_FWD, key=["N", "C", "H", "W", "CO", "HO", "WO", "R", "S", "SH", "SW", "sdc", "sxc"])
@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _conv_dgrad(dy_ptr, w_ptr, dx_ptr, N, C, H, W, CO, HO, WO,
                sdk, sdn, sdc, sdh, sdw, swk, swo, swc, swr, sws, sxk, sxn, sxc, sxh, sxw,
                SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                R: tl.constexpr, S: tl.constexpr, TF32: tl.constexpr, OFF64: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dx[k, n, c, h, w] = sum over (co, r, s) with h = oh*SH - PH + r of dy[k, n, co, oh, ow] w[k, co, c, r, s]."""
    k = tl.program_id(2).to(tl.int64)
    m_ok, n, h, w = _pixels(tl.program_id(0), BM, N, H, W)  # input pixels
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)  # input channels
    c_ok = offs_c < C
    dy_base, w_base = dy_ptr + k * sdk, w_ptr + k * swk  # this student's tensors
    if OFF64:
        dy_n, w_c = n * sdn, offs_c.to(tl.int64) * swc
    else:  # 32-bit offsets within one student, as in _fwd_tile
        dy_n, w_c = n.to(tl.int32) * sdn, offs_c * swc
    acc = tl.zeros((BM, BN), tl.float32)
    nc = tl.cdiv(CO, BK)
    cc = tl.arange(0, BK)
    for it in range(0, R * S * nc):  # one pipelined loop over (tap, channel block), as in _fwd_tile
        tap = it // nc
        r = tap // S
        s = tap - r * S
        th = h + PH - r  # = oh * SH when this tap reaches pixel h
        oh = th // SH
        tw = w + PW - s
        ow = tw // SW
        px_ok = m_ok & (th >= 0) & (th - oh * SH == 0) & (oh < HO) & (tw >= 0) & (tw - ow * SW == 0) & (ow < WO)
        acc = _gather_mma(acc, dy_base, _offset(dy_n, oh, ow, sdh, sdw, OFF64), px_ok, sdc,
                          w_base, w_c + r * swr + s * sws, swo, c_ok, (it - tap * nc) * BK + cc, CO, TF32)
    _store(dx_ptr, acc, k, n, h, w, offs_c, sxk, sxn, sxc, sxh, sxw, m_ok, c_ok)


# restore_value: autotuning runs the kernel once per config; dw must still hold the launcher's
# zeros when the chosen config runs (the split path accumulates with atomics)
@triton.autotune(_WGRAD, key=["N", "C", "H", "W", "CO", "HO", "WO", "R", "S", "SH", "SW", "SPLIT", "sdc", "sxc"],
                 restore_value=["dw_ptr"])
@triton.jit(do_not_specialize=_SHAPE_ARGS)
def _conv_wgrad(dy_ptr, x_ptr, dw_ptr, N, C, H, W, CO, HO, WO,
                sdk, sdn, sdc, sdh, sdw, sxk, sxn, sxc, sxh, sxw,
                SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                R: tl.constexpr, S: tl.constexpr, SPLIT: tl.constexpr, TF32: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dw[k, co, c, r, s] = sum over (n, oh, ow) of dy[k, n, co, oh, ow] x[k, n, c, oh*SH-PH+r, ow*SW-PW+s].

    Grid: (co tiles, c tiles * R * S, K * SPLIT); with SPLIT > 1 each program reduces one slice
    of the output pixels and adds its partial sum into the fp32 dw (zeroed by the launcher)."""
    pid_o, pid_cs, pid_ks = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k, split = (pid_ks // SPLIT).to(tl.int64), pid_ks % SPLIT
    rs = pid_cs % (R * S)
    r, s = rs // S, rs % S
    offs_o = pid_o * BM + tl.arange(0, BM)
    offs_c = (pid_cs // (R * S)) * BN + tl.arange(0, BN)
    o_ok, c_ok = offs_o < CO, offs_c < C
    M = N * HO * WO
    per = tl.cdiv(tl.cdiv(M, SPLIT), BK) * BK
    lo = split * per
    hi = tl.minimum(lo + per, M)
    mm = tl.arange(0, BK)
    dy_base = dy_ptr + k * sdk + offs_o.to(tl.int64)[:, None] * sdc
    x_base = x_ptr + k * sxk + offs_c.to(tl.int64)[None, :] * sxc
    acc = tl.zeros((BM, BN), tl.float32)
    for m0 in range(lo, hi, BK):
        m = m0 + mm
        m_ok = m < hi
        n = (m // (HO * WO)).to(tl.int64)
        oh, ow = (m // WO) % HO, m % WO
        ih, iw = oh * SH - PH + r, ow * SW - PW + s
        px_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(dy_base + (n * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw)[None, :],
                    mask=o_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(x_base + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None],
                    mask=px_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, TF32)
    dw = dw_ptr + k * CO * C * R * S + (offs_o * (C * R * S))[:, None] + (offs_c * (R * S))[None, :] + rs
    mask = o_ok[:, None] & c_ok[None, :]
    if SPLIT == 1:
        tl.store(dw, acc, mask=mask)
    else:
        tl.atomic_add(dw, acc, mask=mask)


def _out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _relayout(w, order):
    """w [K, Co, C, R, S] with its memory laid out in ``order`` (same logical shape): a copy of
    the weights (small next to the activations) so that the GEMM's B tiles load contiguously."""
    inverse = [order.index(d) for d in range(5)]
    return w.permute(*order).contiguous().permute(*inverse)


def _off64(*tensors):
    """Whether offsets within one student ([1:] dims of [K, ...] tensors) may pass 2^30: then the
    kernels index in 64 bits throughout; else in 32 bits within a student (the student's own base
    stays 64-bit, so K * (one student) may pass 2^31 either way)."""
    return any(sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 1 << 30 for t in tensors)


def _tf32(dtype):
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _empty(K, N, C, H, W, dtype, device, channels_last):
    """[K, N, C, H, W], stored as [K, N, H, W, C] when ``channels_last``."""
    if channels_last:
        return torch.empty(K, N, H, W, C, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)
    return torch.empty(K, N, C, H, W, dtype=dtype, device=device)


def _fwd_shape(x, w, stride, padding):
    """(K, N, C, H, W, Co, R, S, Ho, Wo) of a forward, with input and weight checked."""
    K, N, C, H, W = x.shape
    Kw, CO, Cw, R, S = w.shape
    if Kw != K or Cw != C:
        raise ValueError(f"grouped conv: input {tuple(x.shape)} and weight {tuple(w.shape)} do not match")
    return K, N, C, H, W, CO, R, S, _out_size(H, R, stride[0], padding[0]), _out_size(W, S, stride[1], padding[1])


def conv_forward(x, w, b, stride, padding, channels_last=False):
    """y [K, N, Co, Ho, Wo] (dtype of x) for x [K, N, C, H, W], w [K, Co, C, R, S], b [K, Co] or
    None; ``channels_last``: y stored as [K, N, Ho, Wo, Co] (the next layer's loads along
    channels are then contiguous)."""
    K, N, C, H, W, CO, R, S, HO, WO = _fwd_shape(x, w, stride, padding)
    (SH, SW), (PH, PW) = stride, padding
    y = _empty(K, N, CO, HO, WO, x.dtype, x.device, channels_last)
    w = _relayout(w, (0, 3, 4, 2, 1))  # [K, R, S, C, Co] in memory: B tiles load along Co
    if b is not None:
        b = b.reshape(K, CO).contiguous()

    def grid(meta):
        return triton.cdiv(N * HO * WO, meta["BM"]), triton.cdiv(CO, meta["BN"]), K

    _conv_fwd[grid](x, w, b if b is not None else y, y, N, C, H, W, CO, HO, WO,
                    *x.stride(), *w.stride(), *y.stride(), SH=SH, SW=SW, PH=PH, PW=PW, R=R, S=S,
                    HAS_BIAS=b is not None, TF32=_tf32(x.dtype), OFF64=_off64(x, w, y))
    return y


def conv_relu_pool_forward(x, w, b, stride, padding):
    """(y, code): y = max_pool2d(relu(conv2d(x[k], w[k], b[k])), 2) [K, N, Co, Ho/2, Wo/2] (dtype
    of x, contiguous) and the int8 codes of the same shape (window position of the max, -1 where
    y is not positive); Ho and Wo must be even."""
    K, N, C, H, W, CO, R, S, HO, WO = _fwd_shape(x, w, stride, padding)
    (SH, SW), (PH, PW) = stride, padding
    if HO % 2 or WO % 2:
        raise ValueError(f"conv + relu + 2x2 max-pool: the convolution's output {HO}x{WO} must be even-sized")
    y = torch.empty(K, N, CO, HO // 2, WO // 2, dtype=x.dtype, device=x.device)
    code = torch.empty(y.shape, dtype=torch.int8, device=x.device)
    w = _relayout(w, (0, 3, 4, 2, 1))
    if b is not None:
        b = b.reshape(K, CO).contiguous()

    def grid(meta):
        return triton.cdiv(N * HO * WO, meta["BM"]), triton.cdiv(CO, meta["BN"]), K

    _conv_fwd_relu_pool[grid](x, w, b if b is not None else y, y, code, N, C, H, W, CO, HO, WO,
                              *x.stride(), *w.stride(), *y.stride(), SH=SH, SW=SW, PH=PH, PW=PW, R=R, S=S,
                              HAS_BIAS=b is not None, TF32=_tf32(x.dtype), OFF64=_off64(x, w, y))
    return y, code


def unpool_relu(dp, code, HO, WO):
    """The gradient at the convolution's output [..., HO, WO] from the pooled gradient and codes."""
    dp, code = dp.contiguous(), code.contiguous()
    dy = torch.empty(*dp.shape[:-2], HO, WO, dtype=dp.dtype, device=dp.device)
    BLOCK = 256 if _INTERPRET else 1024
    _unpool_relu[(triton.cdiv(dy.numel(), BLOCK),)](dp, code, dy, dy.numel(), HO, WO, BLOCK=BLOCK)
    return dy


def conv_backward_data(dy, w, x_shape, stride, padding, channels_last=False):
    """dx [K, N, C, H, W] (dtype of dy; stored channels-last when ``channels_last``)."""
    K, N, C, H, W = x_shape
    _, CO, _, R, S = w.shape
    HO, WO = dy.shape[-2:]
    (SH, SW), (PH, PW) = stride, padding
    dx = _empty(K, N, C, H, W, dy.dtype, dy.device, channels_last)
    w = _relayout(w, (0, 3, 4, 1, 2))  # [K, R, S, Co, C] in memory: B tiles load along C

    def grid(meta):
        return triton.cdiv(N * H * W, meta["BM"]), triton.cdiv(C, meta["BN"]), K

    _conv_dgrad[grid](dy, w, dx, N, C, H, W, CO, HO, WO,
                      *dy.stride(), *w.stride(), *dx.stride(), SH=SH, SW=SW, PH=PH, PW=PW, R=R, S=S,
                      TF32=_tf32(dy.dtype), OFF64=_off64(dy, w, dx))
    return dx


def _wgrad_split(K, CO, C, R, S, M, device):
    """Programs along the reduction so that the grid fills the device (~4 waves of its SMs)."""
    return reduction_split(K * triton.cdiv(CO, 64) * triton.cdiv(C, 64) * R * S, M, device)


def reduction_split(tiles, M, device):
    """How many programs share a reduction over M pixels, given ``tiles`` output tiles: enough for
    ~4 waves of the device's SMs, each slice at least 1024 pixels (2 under the interpreter, so
    that the tests exercise the atomic path)."""
    if _INTERPRET:
        return 2 if M > 64 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while tiles * split < 4 * sms and M // (split * 2) >= 1024:
        split *= 2
    return split


def conv_backward_weight(dy, x, w_shape, stride, padding):
    """dw [K, Co, C, R, S] in fp32 (the students' master parameters are fp32)."""
    K, N, C, H, W = x.shape
    _, CO, _, R, S = w_shape
    HO, WO = dy.shape[-2:]
    (SH, SW), (PH, PW) = stride, padding
    split = _wgrad_split(K, CO, C, R, S, N * HO * WO, dy.device)
    dw = (torch.zeros if split > 1 else torch.empty)(K, CO, C, R, S, dtype=torch.float32, device=dy.device)

    def grid(meta):
        return triton.cdiv(CO, meta["BM"]), triton.cdiv(C, meta["BN"]) * R * S, K * split

    _conv_wgrad[grid](dy, x, dw, N, C, H, W, CO, HO, WO, *dy.stride(), *x.stride(),
                      SH=SH, SW=SW, PH=PH, PW=PW, R=R, S=S, SPLIT=split, TF32=_tf32(dy.dtype))
    return dw


# -- the weight gradient over rows of taps (the dense routes' students-last operands) ------------
# For a layer with few input channels (`cnn`'s second: 32) the kernel above masks off half of its
# 64-channel tiles (more in its wider configs) and reloads dy once per tap (25 times for 5x5).
# Here a program owns one row r of taps and a block of the (s, c) pairs along it: for a
# channels-last x those are BJ consecutive elements from one pixel onwards (x[n, ih, iw0 + s, c] =
# x_row + (iw0 * C + s * C + c)), one vector load per row of the tile; dy's tile is loaded once
# for all of them.
# Two kinds of config: pipelined (cp.async into shared memory, which bypasses L1, so the x tile's
# overlapping rows, BJ / C pixels wide each, are all read from L2) and unpipelined (one stage: x's
# vector loads go through L1, where those overlaps hit; latency hidden by the other resident
# programs). Which wins is the device's to say. Few configs: each is compiled at the first
# autotuning of every layer shape (ResNet-18 has about five that the rows ways take: ROWS_MAX_RUN).
_ROWS = ([triton.Config({"BM": 16, "BCO": 16, "BJ": 16}, num_warps=4)] if _INTERPRET else
         [triton.Config({"BM": bm, "BCO": bco, "BJ": bj}, num_warps=w, num_stages=s)
          for bm, bco, bj, w, s in [(64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (64, 64, 256, 8, 3),
                                    (64, 64, 128, 4, 1), (64, 64, 256, 8, 1)]])
# The longest row of taps (S * C) the dense ops give the rows kernel: beyond it a tile holds less
# than one tap's channels, dy is read once per tap as in cuDNN's own, and the extra compilations
# (a kernel per channel count) would buy nothing that a timing has shown.
ROWS_MAX_RUN = 512


@triton.autotune(_ROWS, key=["N", "H", "W", "CO", "HO", "WO", "C", "R", "S", "SH", "SW", "SPLIT"],
                 restore_value=["dw_ptr"])
@triton.jit(do_not_specialize=["N", "H", "W", "HO", "WO"])  # CO specialised: dy's rows are CO long
def _conv_wgrad_rows(dy_ptr, x_ptr, dw_ptr, N, H, W, CO, HO, WO, sdk, sxk, swk, swo, swc, swr, sws,
                     C: tl.constexpr, R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     PH: tl.constexpr, PW: tl.constexpr, SPLIT: tl.constexpr, TF32: tl.constexpr,
                     BM: tl.constexpr, BCO: tl.constexpr, BJ: tl.constexpr):
    """dw[k, co, c, r, s] = sum over (n, oh, ow) of dy[k, n, oh, ow, co] x[k, n, oh*SH-PH+r, ow*SW-PW+s, c]
    for dy [K, N, HO, WO, CO] and x [K, N, H, W, C], each student's block contiguous (k strides
    sdk, sxk); dw [K, CO, C, R, S] with strides swk, swo, swc, swr, sws (stored [K, CO, R, S, C],
    the dense ops' layout, each row of the tile's store is contiguous).

    Grid: (co tiles * j tiles * R, K * SPLIT), j = s * C + c over the row's S * C pairs; with
    SPLIT > 1 each program reduces one slice of the N*HO*WO pixels into the fp32 dw (zeroed by the
    launcher) with atomics, else it stores in dw's dtype."""
    JT: tl.constexpr = (S * C + BJ - 1) // BJ
    pid_t, pid_ks = tl.program_id(0), tl.program_id(1)
    r = pid_t % R
    jt = (pid_t // R) % JT
    ct = pid_t // (R * JT)
    k, split = (pid_ks // SPLIT).to(tl.int64), pid_ks % SPLIT
    offs_co = ct * BCO + tl.arange(0, BCO)
    offs_j = jt * BJ + tl.arange(0, BJ)
    co_ok, j_ok = offs_co < CO, offs_j < S * C
    s_j = offs_j // C  # C is a constant: whole vectors of the tile share one s
    M = N * HO * WO
    per = tl.cdiv(tl.cdiv(M, SPLIT), BM) * BM
    lo = split * per
    hi = tl.minimum(lo + per, M)
    dy_k = dy_ptr + k * sdk
    x_k = x_ptr + k * sxk
    mm = tl.arange(0, BM)
    acc = tl.zeros((BCO, BJ), tl.float32)
    for m0 in range(lo, hi, BM):
        m = m0 + mm
        m_ok = m < hi
        n = m // (HO * WO)
        oh, ow = (m // WO) % HO, m % WO
        ih, iw0 = oh * SH - PH + r, ow * SW - PW
        a = tl.load(dy_k + (m * CO)[:, None] + offs_co[None, :], mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        iw = iw0[:, None] + s_j[None, :]
        b_ok = (m_ok & (ih >= 0) & (ih < H))[:, None] & (iw >= 0) & (iw < W) & j_ok[None, :]
        # (".ca": through L1 where the load is not pipelined; a pipelined one is cp.async.cg anyway)
        b = tl.load(x_k + ((n * H + ih) * W * C + iw0 * C)[:, None] + offs_j[None, :], mask=b_ok, other=0.0,
                    cache_modifier=".ca")
        acc = _mma(tl.trans(a), b, acc, TF32)
    c = offs_j % C
    dst = dw_ptr + k * swk + (offs_co * swo)[:, None] + (c * swc + r * swr + s_j * sws)[None, :]
    mask = co_ok[:, None] & j_ok[None, :]
    if SPLIT == 1:
        tl.store(dst, _downcast(acc, dw_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(dst, acc, mask=mask)


def rows_layout_ok(t):
    """Whether t [K, N, C, H, W] is stored [K, N, H, W, C] with each student's block contiguous
    (what conv_backward_weight_rows reads): the dense ops' students-last layout."""
    K, N, C, H, W = t.shape
    want = (H * W * C, 1, W * C, C)  # a dimension of size 1 may have any stride
    return all(n == 1 or st == wt for n, st, wt in zip(t.shape[1:], t.stride()[1:], want)) and N * C * H * W < 1 << 31


def conv_backward_weight_rows(dy, x, w_shape, stride, padding, dtype=None, out=None):
    """dw [K, Co, C, R, S] (contiguous, ``dtype``, default x's; written into ``out`` when given, a
    tensor of that shape with any strides, the dense ops' [K, Co, R, S, C] storage included) for
    dy [K, N, Co, Ho, Wo] and x [K, N, C, H, W] both stored students-last (``rows_layout_ok``), by
    _conv_wgrad_rows: one launch for all K students, fp32 accumulation (atomics into an fp32
    buffer where the reduction is split, then one cast)."""
    K, N, C, H, W = x.shape
    CO, R, S = w_shape[1], w_shape[3], w_shape[4]
    HO, WO = dy.shape[-2:]
    (SH, SW), (PH, PW) = stride, padding
    if tuple(dy.shape) != (K, N, CO, HO, WO) or tuple(w_shape) != (K, CO, C, R, S) or (
            HO, WO) != (_out_size(H, R, SH, PH), _out_size(W, S, SW, PW)):
        raise ValueError(f"weight gradient by rows: dy {tuple(dy.shape)}, x {tuple(x.shape)} and weight "
                         f"{tuple(w_shape)} do not fit stride {tuple(stride)}, padding {tuple(padding)}")
    if not (rows_layout_ok(x) and rows_layout_ok(dy)):
        raise ValueError("weight gradient by rows: x and dy must be stored [K, N, H, W, C], each student's "
                         f"block contiguous (strides {x.stride()}, {dy.stride()})")
    dtype = (x.dtype if dtype is None else dtype) if out is None else out.dtype
    if out is not None and tuple(out.shape) != (K, CO, C, R, S):
        raise ValueError(f"weight gradient by rows: out {tuple(out.shape)} must be a {(K, CO, C, R, S)}")
    tiles = K * triton.cdiv(CO, 64) * triton.cdiv(S * C, 128) * R
    split = reduction_split(tiles, N * HO * WO, x.device)
    if split > 1 or out is None:  # a split reduction sums into fp32 first
        dw = (torch.zeros if split > 1 else torch.empty)(K, CO, C, R, S, device=x.device,
                                                         dtype=torch.float32 if split > 1 else dtype)
    else:
        dw = out

    def grid(meta):
        return triton.cdiv(CO, meta["BCO"]) * triton.cdiv(S * C, meta["BJ"]) * R, K * split

    _conv_wgrad_rows[grid](dy, x, dw, N, H, W, CO, HO, WO, dy.stride(0), x.stride(0), *dw.stride(),
                           C=C, R=R, S=S, SH=SH, SW=SW, PH=PH, PW=PW, SPLIT=split, TF32=_tf32(x.dtype))
    if out is None:
        return dw if dw.dtype == dtype else dw.to(dtype)
    if dw is not out:
        out.copy_(dw)
    return out


# -- convolutions over rows of taps: the forward, and the data gradient as one (students-last) ------
# y[n, oh, ow, co] = sum over (r, s, c) of x[n, oh*SH - PH + r, ow*SW - PW + s, c] * w[co, c, r, s].
# For one row r of taps the (s, c) pairs read x at S consecutive pixels of one input row: S * C
# consecutive elements from x[n, ih, iw0] on. So a program's A tile is, per output pixel, BJ
# consecutive elements of that run (one vector load per row; the rows' overlaps are L1 hits where
# the config is unpipelined), and B the weights relaid [K, R, S, C, CO]; one loop over (r, j tile)
# is the whole reduction. y is written straight into its students-last storage. The data gradient
# of a stride-1 convolution is such a forward of dy with the weights flipped and their channels
# swapped, padding R-1-PH (negative where PH > R-1: the masks handle it), so dx too is written in
# place, with no copy after, as cuDNN's data gradient needs one (conv_backward_data_rows).
_FROWS = ([triton.Config({"BM": 16, "BCO": 16, "BJ": 16}, num_warps=4)] if _INTERPRET else
          [triton.Config({"BM": bm, "BCO": bco, "BJ": bj}, num_warps=w, num_stages=s)
           for bm, bco, bj, w, s in [(128, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 128, 4, 3),
                                     (128, 32, 64, 4, 1), (128, 64, 64, 8, 1)]])


@triton.autotune(_FROWS, key=["N", "H", "W", "CO", "HO", "WO", "C", "R", "S", "SH", "SW"])
@triton.jit(do_not_specialize=["N", "H", "W", "HO", "WO"])
def _conv_rows(x_ptr, w_ptr, y_ptr, N, H, W, CO, HO, WO, sxk, swk, syk,
               C: tl.constexpr, R: tl.constexpr, S: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               PH: tl.constexpr, PW: tl.constexpr, TF32: tl.constexpr,
               BM: tl.constexpr, BCO: tl.constexpr, BJ: tl.constexpr):
    """y [K, N, HO, WO, CO] from x [K, N, H, W, C] and the weights relaid [K, R, S, C, CO] (each
    student's block contiguous; k strides sxk, swk, syk). Grid: (pixel tiles, CO tiles, K)."""
    pid_m, pid_o, k = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_o = pid_o * BCO + tl.arange(0, BCO)
    m_ok, o_ok = offs_m < N * HO * WO, offs_o < CO
    n = offs_m // (HO * WO)
    oh, ow = (offs_m // WO) % HO, offs_m % WO
    iw0 = ow * SW - PW  # the run's first pixel in the row (s = 0)
    x_k = x_ptr + k * sxk
    w_k = w_ptr + k * swk
    jj = tl.arange(0, BJ)
    JT = tl.cdiv(S * C, BJ)
    acc = tl.zeros((BM, BCO), tl.float32)
    for t in range(0, R * JT):  # one loop over (r, j tile), so that the whole reduction is pipelined
        r = t // JT
        j = (t % JT) * BJ + jj
        ih = oh * SH - PH + r
        iw = iw0[:, None] + (j // C)[None, :]
        a_ok = (m_ok & (ih >= 0) & (ih < H))[:, None] & (iw >= 0) & (iw < W) & (j < S * C)[None, :]
        a = tl.load(x_k + ((n * H + ih) * W * C + iw0 * C)[:, None] + j[None, :], mask=a_ok, other=0.0)
        b = tl.load(w_k + (r * S * C + j)[:, None] * CO + offs_o[None, :],
                    mask=(j < S * C)[:, None] & o_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, TF32)
    dst = y_ptr + k * syk + (offs_m * CO)[:, None] + offs_o[None, :]
    tl.store(dst, _downcast(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


def _rows_out(shape, like, out, what):
    """``out`` checked to be a ``shape`` [K, N, C, H, W] stored [K, N, H, W, C], or a new one."""
    K, N, C, H, W = shape
    if out is None:
        return torch.empty(K, N, H, W, C, dtype=like.dtype, device=like.device).permute(0, 1, 4, 2, 3)
    if tuple(out.shape) != tuple(shape) or not rows_layout_ok(out):
        raise ValueError(f"{what} by rows: out {tuple(out.shape)} must be a {tuple(shape)} stored [K, N, H, W, C]")
    return out


def _launch_rows(x, wr, out, stride, padding):
    K, N, C, H, W = x.shape
    R, S, CO = wr.shape[1], wr.shape[2], wr.shape[4]
    HO, WO = out.shape[-2:]
    (SH, SW), (PH, PW) = stride, padding

    def grid(meta):
        return triton.cdiv(N * HO * WO, meta["BM"]), triton.cdiv(CO, meta["BCO"]), K

    _conv_rows[grid](x, wr, out, N, H, W, CO, HO, WO, x.stride(0), wr.stride(0), out.stride(0),
                     C=C, R=R, S=S, SH=SH, SW=SW, PH=PH, PW=PW, TF32=_tf32(x.dtype))
    return out


def conv_forward_rows(x, w, stride, padding, out=None):
    """y [K, N, Co, Ho, Wo] stored students-last ([K, N, Ho, Wo, Co]; into ``out`` when given, a
    tensor so stored) for x [K, N, C, H, W] stored so (``rows_layout_ok``) and w [K, Co, C, R, S]
    (any layout: relaid here, a copy of the weights), no bias, in x's dtype, by _conv_rows (one
    launch for all K students, fp32 accumulation)."""
    K, N, C, H, W, CO, R, S, HO, WO = _fwd_shape(x, w, stride, padding)
    if not rows_layout_ok(x):
        raise ValueError(f"convolution by rows: x must be stored [K, N, H, W, C] (strides {x.stride()})")
    out = _rows_out((K, N, CO, HO, WO), x, out, "convolution")
    return _launch_rows(x, w.permute(0, 3, 4, 2, 1).contiguous(), out, stride, padding)  # [K, R, S, C, CO]


def conv_backward_data_rows(dy, w, x_shape, padding, out=None):
    """dx [K, N, C, H, W] stored students-last ([K, N, H, W, C]; into ``out`` when given, a tensor
    so stored) of a stride-1 convolution, from dy [K, N, Co, Ho, Wo] stored students-last
    (``rows_layout_ok``) and w [K, Co, C, R, S] (any layout), in dy's dtype: the forward by rows of
    dy with the weights flipped and their channels swapped, padding R-1-P."""
    K, N, C, H, W = x_shape
    CO, R, S = w.shape[1], w.shape[3], w.shape[4]
    HO, WO = dy.shape[-2:]
    PH, PW = padding
    if tuple(w.shape) != (K, CO, C, R, S) or tuple(dy.shape) != (K, N, CO, HO, WO) or (HO, WO) != (
            _out_size(H, R, 1, PH), _out_size(W, S, 1, PW)):
        raise ValueError(f"data gradient by rows: dy {tuple(dy.shape)}, weight {tuple(w.shape)} and input "
                         f"{tuple(x_shape)} do not fit stride 1, padding {tuple(padding)}")
    if not rows_layout_ok(dy):
        raise ValueError(f"data gradient by rows: dy must be stored [K, N, H, W, C] (strides {dy.stride()})")
    out = _rows_out(x_shape, dy, out, "data gradient")
    wr = w.flip(3, 4).permute(0, 3, 4, 1, 2).contiguous()  # [K, R, S, CO, C]: r, s reversed
    return _launch_rows(dy, wr, out, (1, 1), (R - 1 - PH, S - 1 - PW))
