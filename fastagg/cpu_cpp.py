"""The C++ CPU backend (csrc/, one file per op, built as fastagg._cpu): same contracts as the
references in fastagg.ops. Tensors are passed as raw pointers, so any torch version works."""

from __future__ import annotations

import numpy as np
import torch

from ._cpu_common import DTYPE_CODE, STAGE_CODE, check_head_grad, check_head_stats, check_kd_args, merge_groups
from .ops.stage import check_stage_args

ABI = 3  # the calling convention this module speaks; csrc/bindings.cpp sets the same

try:
    from . import _cpu
except ImportError as exc:  # not built: no compiler at install, or FASTAGG_NO_CPP=1
    _cpu = None
    _why = f"the C++ extension fastagg._cpu was not built ({exc})"
else:
    if getattr(_cpu, "abi", 1) != ABI:  # built from older sources: its arguments mean other things
        _why = (f"the C++ extension fastagg._cpu is a stale build (calling convention {getattr(_cpu, 'abi', 1)}, "
                f"this fastagg needs {ABI}): rebuild it with `pip install -e .`")
        _cpu = None


def available():
    if _cpu is None:
        return False, _why
    return True, f"built, OpenMP {'on' if _cpu.openmp else 'off'} ({_cpu.num_threads()} threads)"


def fused_merge(theta, c0, groups, out=None):
    groups = merge_groups(theta, groups, out)
    if out is None:
        out = torch.empty_like(theta)
    _cpu.fused_merge(theta.data_ptr(), out.data_ptr(), theta.numel(), float(c0),
                     [(rows.data_ptr(), DTYPE_CODE[rows.dtype], rows.stride(0), coefs, idx)
                      for rows, coefs, idx in groups])
    return out


def kd_loss_grad(logits, teacher_probs, temperature):
    logits, teacher_probs, K, N = check_kd_args(logits, teacher_probs)
    M, C = logits.shape
    T = float(temperature)
    grad = torch.empty_like(logits)
    row_loss = torch.empty(M, dtype=torch.float32)
    _cpu.kd_loss_grad(logits.data_ptr(), DTYPE_CODE[logits.dtype], M, C, logits.stride(0), teacher_probs.data_ptr(),
                      N, teacher_probs.stride(0), grad.data_ptr(), grad.stride(0), row_loss.data_ptr(), T, T / N)
    return row_loss.view(K, N).sum(1) * (T * T / N), grad


def _head_args(z, p, bias):
    """The chunk's pointer, dtype, sizes and strides as the C++ kernels take them; the bias is
    always given (zeros of student stride 0 for a layer without one, so that no loop branches)."""
    K, R, NC = z.shape
    if bias is None:
        bias, bs_k = torch.zeros(NC, dtype=torch.float32), 0
    else:
        bs_k = bias.stride(0)
    return (DTYPE_CODE[z.dtype], K, R, NC, z.stride(0), z.stride(1), p.data_ptr(), p.stride(0), bias.data_ptr(),
            bs_k), bias


def head_stats(z, p, temperature, m, s, pz, bias=None):
    """fastagg.ops.vocab_head's first sweep over a chunk z [K, R, c] (fp32 / bf16 / fp16), with
    the bias's chunk [K, c] (fp32) added: m, s (fp32 [K, R]) and pz (float64 [K, R]), contiguous,
    take the chunk's max, sum of exp(z / T - m) and sum p z / T."""
    check_head_stats(z, p, m, s, pz, bias)
    args, keep = _head_args(z, p, bias)
    _cpu.head_stats(z.data_ptr(), *args, m.data_ptr(), s.data_ptr(), pz.data_ptr(), float(temperature))
    del keep


def head_grad(z, p, temperature, lse, scale, db=None, bias=None):
    """The second sweep: z <- scale * (softmax((z + bias) / T) - p) from each row's log-sum-exp
    lse (fp32 [K, R], contiguous); db (fp32 [K, c], contiguous along c) <- its sums over the rows."""
    check_head_grad(z, p, lse, db, bias)
    args, keep = _head_args(z, p, bias)
    _cpu.head_grad(z.data_ptr(), *args, lse.data_ptr(), float(scale), 0 if db is None else db.data_ptr(),
                   0 if db is None else db.stride(0), float(temperature))
    del keep


def stage_row(src, dst, src_dtype=None, threads=1):
    dtype = check_stage_args(src, dst, src_dtype)
    ptr = src.ctypes.data if isinstance(src, np.ndarray) else src.data_ptr()
    return _cpu.stage_row(ptr, STAGE_CODE[dtype], dst.data_ptr(), STAGE_CODE[dst.dtype], dst.numel(), int(threads))


def max_threads():
    return _cpu.num_threads() if _cpu is not None else 1
