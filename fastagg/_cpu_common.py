"""Argument checks shared by the CPU backends (C++ and numba): both take fp32 parameters,
contiguous fp32 / bf16 / fp16 rows (stage_row: fp64 too), and return what the references in
fastagg.ops return."""

from __future__ import annotations

import torch

from .ops.kd_loss import check_shapes

DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
STAGE_CODE = {**DTYPE_CODE, torch.float64: 3}  # stage_row also reads and writes fp64


def merge_groups(theta, groups):
    """-> [(rows, [float coefs], [int row numbers])] after checking dtypes and layout."""
    if theta.dtype != torch.float32 or theta.device.type != "cpu" or not theta.is_contiguous():
        raise TypeError(f"CPU kernels take contiguous float32 CPU parameters, got {theta.dtype} on {theta.device}")
    out = []
    for rows, coefs, index in groups:
        if rows.dtype not in DTYPE_CODE:
            raise TypeError(f"rows must be fp32, bf16 or fp16, got {rows.dtype}")
        if rows.device.type != "cpu" or rows.stride(1) != 1:
            raise ValueError("rows must be CPU tensors, contiguous along parameters")
        coefs = coefs.tolist() if isinstance(coefs, torch.Tensor) else [float(c) for c in coefs]
        idx = list(range(len(coefs))) if index is None else [int(i) for i in index]
        if idx and (min(idx) < 0 or max(idx) >= rows.shape[0]):
            raise IndexError(f"row index out of range for {rows.shape[0]} rows")
        out.append((rows, coefs, idx))
    return out


def check_kd_args(logits, teacher_probs):
    K, N, _ = check_shapes(logits, teacher_probs)
    if logits.dtype not in DTYPE_CODE:
        raise TypeError(f"CPU kd kernels take fp32 / bf16 / fp16 logits, got {logits.dtype}")
    return logits.contiguous(), teacher_probs.float().contiguous(), K, N
