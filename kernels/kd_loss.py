"""Fused KD loss + logit gradient, one program per logit row.

For row r of the student logits z [M, C] (client k = r // N, teacher row r % N):
    q = softmax(z / T);  p = teacher_probs[r % N]   (or softmax(t / T) from teacher logits)
    row_loss[r] = sum_c p (log p - log q)
    grad[r]     = grad_scale * (q - p)      (grad_scale = T / N for d loss_k / d z)
Two passes over the row: an online max / sum-of-exponentials, then loss and gradient (for
C <= 256, a second kernel holds BLOCK_M whole rows per program and makes one pass). The
logits are read twice and the gradient written once (3 * M * C * bytes); eager PyTorch
materialises softmax, log-softmax and the product in fp32 (~8 passes). ``grad`` may alias
``z`` (the chunked fused-linear path overwrites its logits chunk with the gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastagg.ops.kd_loss import check_shapes


@triton.jit
def _kd_kernel(z_ptr, z_stride, t_ptr, t_stride, g_ptr, g_stride, loss_ptr, n_teacher, C,
               inv_T, grad_scale, TEACHER_LOGITS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + (row % n_teacher) * t_stride
    g_row = g_ptr + row * g_stride
    cols = tl.arange(0, BLOCK_C)
    m = tl.zeros((), tl.float32) - float("inf")
    s = tl.zeros((), tl.float32)
    mt = tl.zeros((), tl.float32) - float("inf")
    st = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + cols
        mask = offs < C
        z = tl.load(z_row + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_T
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        if TEACHER_LOGITS:
            t = tl.load(t_row + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_T
            mt_new = tl.maximum(mt, tl.max(t, 0))
            st = st * tl.exp(mt - mt_new) + tl.sum(tl.exp(t - mt_new), 0)
            mt = mt_new
    log_s = tl.log(s)
    log_st = tl.log(tl.maximum(st, 1e-30))  # st is 0 (unused) when the teacher comes as probabilities
    loss = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + cols
        mask = offs < C
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
        logq = z - m - log_s
        q = tl.exp(logq)
        if TEACHER_LOGITS:
            t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_T
            logp = t - mt - log_st
            p = tl.exp(logp)
        else:
            p = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            logp = tl.log(tl.where(p > 0, p, 1.0))
        kl = tl.where(mask & (p > 0), p * (logp - logq), 0.0)
        loss += tl.sum(kl, 0)
        tl.store(g_row + offs, ((q - p) * grad_scale).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _kd_small_kernel(z_ptr, z_stride, t_ptr, t_stride, g_ptr, g_stride, loss_ptr, M, n_teacher, C,
                     inv_T, grad_scale, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Small vocabularies (C <= 256): BLOCK_M whole rows per program, one pass, teacher probs."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_T
    z = tl.where(cmask[None, :], z, -float("inf"))
    m = tl.max(z, 1)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e, 1)
    logq = z - m[:, None] - tl.log(s)[:, None]
    q = e / s[:, None]
    p = tl.load(t_ptr + (rows % n_teacher)[:, None] * t_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    logp = tl.log(tl.where(p > 0, p, 1.0))
    kl = tl.where(mask & (p > 0), p * (logp - logq), 0.0)
    tl.store(loss_ptr + rows, tl.sum(kl, 1), mask=rmask)
    tl.store(g_ptr + rows[:, None] * g_stride + cols[None, :], ((q - p) * grad_scale).to(g_ptr.dtype.element_ty),
             mask=mask)


SMALL_C = 256


def _block_c(C):
    return min(4096, triton.next_power_of_2(C))


def launch_kd(z, teacher, temperature, grad_scale, grad, teacher_is_logits, block_c=None, num_warps=None):
    """Row losses [M] (fp32) of sum_c p (log p - log q); writes grad_scale * (q - p) into grad."""
    M, C = z.shape
    if z.stride(1) != 1 or teacher.stride(1) != 1 or grad.stride(1) != 1:
        raise ValueError("logits, teacher and grad must be contiguous along classes")
    row_loss = torch.empty(M, dtype=torch.float32, device=z.device)
    if block_c is None and C <= SMALL_C and not teacher_is_logits:
        bc = triton.next_power_of_2(C)
        bm = max(1, 2048 // bc)
        _kd_small_kernel[(triton.cdiv(M, bm),)](z, z.stride(0), teacher, teacher.stride(0), grad, grad.stride(0),
                                                row_loss, M, teacher.shape[0], C, 1.0 / float(temperature),
                                                float(grad_scale), BLOCK_M=bm, BLOCK_C=bc, num_warps=num_warps or 4)
        return row_loss
    bc = block_c or _block_c(C)
    nw = num_warps or (4 if bc <= 1024 else 8)
    _kd_kernel[(M,)](z, z.stride(0), teacher, teacher.stride(0), grad, grad.stride(0), row_loss,
                     teacher.shape[0], C, 1.0 / float(temperature), float(grad_scale),
                     TEACHER_LOGITS=teacher_is_logits, BLOCK_C=bc, num_warps=nw)
    return row_loss


def kd_loss_grad(logits, teacher_probs, temperature, block_c=None, num_warps=None):
    """Same contract as fastagg.ops.kd_loss.kd_loss_grad_reference: (loss [K], grad [K*N, C])."""
    K, N, C = check_shapes(logits, teacher_probs)
    if logits.dtype == torch.float64:
        raise TypeError("triton kd_loss_grad takes fp32 / bf16 / fp16 logits")
    logits = logits.contiguous()
    teacher_probs = teacher_probs.float().contiguous()
    T = float(temperature)
    grad = torch.empty_like(logits)
    row_loss = launch_kd(logits, teacher_probs, T, T / N, grad, False, block_c, num_warps)
    return row_loss.view(K, N).sum(1) * (T * T / N), grad
