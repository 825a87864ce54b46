"""Argument checks shared by the CPU backends (C++ and numba): both take fp32 parameters,
contiguous fp32 / bf16 / fp16 rows (stage_row: fp64 too), and return what the references in
fastagg.ops return."""

from __future__ import annotations

import torch

from .ops.kd_loss import check_shapes

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STAGE_CODE = {**DTYPE_CODE, torch.float64: 3}  # stage_row also reads and writes fp64


def merge_groups(theta, groups, out=None):
    """-> [(rows, [float coefs], [int row numbers])] after checking dtypes and layout (and those of
    ``out``, which the kernels write through its pointer)."""
    for what, t in (("parameters", theta), ("out", out)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
            raise TypeError(f"CPU kernels take contiguous float32 CPU {what}, got {t.dtype} on {t.device}")
    if out is not None and out.numel() != theta.numel():
        raise ValueError(f"out has {out.numel()} values, the parameters {theta.numel()}")
    checked = []
    for rows, coefs, index in groups:
        if rows.dtype not in DTYPE_CODE:
            raise TypeError(f"rows must be fp32, bf16 or fp16, got {rows.dtype}")
        if rows.device.type != "cpu" or rows.dim() != 2 or rows.shape[1] != theta.numel() or rows.stride(1) != 1:
            raise ValueError(f"rows must be CPU tensors [R, {theta.numel()}], contiguous along parameters, got "
                             f"{tuple(rows.shape)} on {rows.device}")
        coefs = coefs.tolist() if isinstance(coefs, torch.Tensor) else [float(c) for c in coefs]
        idx = list(range(len(coefs))) if index is None else [int(i) for i in index]
        if idx and (min(idx) < 0 or max(idx) >= rows.shape[0]):
            raise IndexError(f"row index out of range for {rows.shape[0]} rows")
        checked.append((rows, coefs, idx))
    return checked


def check_on_cpu(*tensors):
    """The CPU kernels read host memory through raw pointers: a tensor elsewhere is refused here,
    before its pointer is taken."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise TypeError(f"CPU kernels take CPU tensors, got one on {t.device}")


def check_kd_args(logits, teacher_probs):
    check_on_cpu(logits, teacher_probs)
    K, N, _ = check_shapes(logits, teacher_probs)
    if logits.dtype not in DTYPE_CODE:
        raise TypeError(f"CPU kd kernels take fp32 / bf16 / fp16 logits, got {logits.dtype}")
    return logits.contiguous(), teacher_probs.float().contiguous(), K, N


def check_head_chunk(z, p, bias):
    """The head route's chunk kernels' operands (fastagg.ops.vocab_head): logits z [K, R, c]
    (fp32 / bf16 / fp16, contiguous along c), the teacher's p fp32 [R, c] and the bias's chunk
    fp32 [K, c] or None, each contiguous along c. Returns (K, R, c)."""
    check_on_cpu(z, p, bias)
    if z.dim() != 3 or p.dim() != 2:
        raise ValueError(f"a chunk's logits must be [K, R, c] and its teacher probabilities [R, c], got "
                         f"{tuple(z.shape)} and {tuple(p.shape)}")
    K, R, NC = z.shape
    if (z.dtype not in DTYPE_CODE or z.stride(2) != 1 or p.stride(1) != 1 or p.shape != (R, NC)
            or p.dtype != torch.float32):
        raise ValueError(f"a chunk's logits must be fp32 / bf16 / fp16 [K, R, c] and its teacher probabilities fp32 "
                         f"[R, c], each contiguous along c; got {tuple(z.shape)} {z.dtype} {z.stride()} and "
                         f"{tuple(p.shape)} {p.dtype}")
    if bias is not None and (bias.shape != (K, NC) or bias.dtype != torch.float32 or bias.stride(1) != 1):
        raise ValueError(f"bias must be fp32 [{K}, {NC}] contiguous along c, got {tuple(bias.shape)} {bias.dtype}")
    return K, R, NC


def check_head_stats(z, p, m, s, pz, bias):
    """head_stats' arguments: the chunk's (check_head_chunk) and the rows' accumulators m, s fp32
    and pz float64, each contiguous [K, R]."""
    K, R, NC = check_head_chunk(z, p, bias)
    check_on_cpu(m, s, pz)
    for t, dt in ((m, torch.float32), (s, torch.float32), (pz, torch.float64)):
        if t.shape != (K, R) or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"accumulators must be contiguous [{K}, {R}] (m, s fp32, pz float64), got "
                             f"{tuple(t.shape)} {t.dtype}")
    return K, R, NC


def check_head_grad(z, p, lse, db, bias):
    """head_grad's arguments: the chunk's (check_head_chunk), lse fp32 [K, R] contiguous, db fp32
    [K, c] contiguous along c or None."""
    K, R, NC = check_head_chunk(z, p, bias)
    check_on_cpu(lse, db)
    if lse.shape != (K, R) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be contiguous fp32 [{K}, {R}], got {tuple(lse.shape)} {lse.dtype}")
    if db is not None and (db.shape != (K, NC) or db.dtype != torch.float32 or db.stride(1) != 1):
        raise ValueError(f"db must be fp32 [{K}, {NC}] contiguous along c, got {tuple(db.shape)} {db.dtype}")
    return K, R, NC
