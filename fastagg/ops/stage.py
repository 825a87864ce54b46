"""Staging of a host update into its buffer row, with the sum of squares the norm check needs.

    stage_row(src, dst) -> float:   dst <- src converted to dst's dtype;
                                    returns sum_i dst[i]^2 over the stored values

src: a contiguous CPU tensor of fp32, bf16, fp16 or fp64, or a flat numpy array of them (a
bfloat16 one as its uint16 bits, with ``src_dtype=torch.bfloat16``; read-only arrays too: a
payload's bytes, fastagg.wire.PayloadView.array); dst: a contiguous CPU tensor (a buffer row,
pinned or not) of fp32, bf16, fp16 or fp64 with as many elements. Conversions round to nearest even, as ``Tensor.copy_`` does. The sum is non-finite
when a stored value is NaN or Inf; a finite row whose squares overflow the accumulator (double,
in the reference and the kernels alike) also gives a non-finite sum, which the aggregator
tells apart with ``isfinite``.

The CPU backends do it in one pass (one read of the update, one write of the row), with the
GIL released: a copy followed by a norm reads the row twice, and torch has no fast norm of a
16-bit row on a CPU. The aggregator stages every host update through here, outside its lock,
so that several submitting threads stage at once (fastagg.aggregator).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import backends

STAGED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what the kernels read and write
_PIECE = 1 << 18  # CPU rows are widened in cache-sized pieces (see widened)


_FROM_NUMPY = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
               np.dtype(np.float16): torch.float16}


def check_stage_args(src, dst, src_dtype=None):
    """The source's torch dtype, after checking both sides."""
    if isinstance(src, np.ndarray):
        dtype = src_dtype or _FROM_NUMPY.get(src.dtype)
        if dtype is None or (dtype == torch.bfloat16) != (src.dtype == np.uint16) or src.ndim != 1:
            raise TypeError(f"stage_row takes a flat numpy array of float64/32/16 (bfloat16 as uint16 bits with "
                            f"src_dtype=torch.bfloat16), got {src.dtype} {src.shape} with src_dtype={src_dtype}")
        numel, contiguous = src.size, src.flags.c_contiguous
    else:
        if src.device.type != "cpu" or not src.is_floating_point():
            raise TypeError(f"stage_row takes a floating CPU tensor, got {src.dtype} on {src.device}")
        dtype, numel, contiguous = src.dtype, src.numel(), src.is_contiguous()
    if dst.device.type != "cpu" or not dst.is_floating_point():
        raise TypeError(f"stage_row writes a floating CPU row, got {dst.dtype} on {dst.device}")
    if numel != dst.numel():
        raise ValueError(f"stage_row: {numel} elements into a row of {dst.numel()}")
    if not (contiguous and dst.is_contiguous()):
        raise ValueError("stage_row takes contiguous memory")
    return dtype


def widened(src, dtype=torch.float32):
    """(offset, piece) over a contiguous CPU tensor, each piece converted to the wider ``dtype``
    (a 16-bit row to fp32 for the aggregator's adds, any row to fp64 for sum_squares) in one
    reused cache-sized buffer: on a CPU a whole-row conversion page-faults a fresh tensor and a
    mixed-dtype add_ runs at 1/6 the speed of an fp32 one; pieces run at copy speed."""
    flat = src.reshape(-1)
    buf = torch.empty(min(flat.numel(), _PIECE), dtype=dtype)
    for i in range(0, flat.numel(), _PIECE):
        piece = buf[:min(_PIECE, flat.numel() - i)]
        piece.copy_(flat[i:i + _PIECE])
        yield i, piece


def sum_squares(row) -> float:
    """sum(row ** 2) of a flat CPU row as a Python float, accumulated in fp64 as the kernels do
    (an fp32 ``dot`` over the 11M values of a ResNet-18 is off by ~1e-4, which the relative
    step's length ρ·λ·|Δ| would carry). Rows other than fp64 are summed in widened pieces (a
    bf16 ``dot`` also rounds its result to bf16 and runs at 1/40 the speed)."""
    if row.dtype == torch.float64:
        return float(row.dot(row))
    return sum(float(piece.dot(piece)) for _, piece in widened(row, torch.float64))


def stage_row_reference(src, dst, src_dtype=None, threads=1):  # threads: torch's own
    dtype = check_stage_args(src, dst, src_dtype)
    if isinstance(src, np.ndarray):  # torch takes no read-only array: copy one
        src = torch.from_numpy(src if src.flags.writeable else src.copy()).view(dtype)
    dst.copy_(src.view(dst.shape))
    return sum_squares(dst.view(-1))


def stage_row(src, dst, backend="torch", src_dtype=None, threads=1):
    """Dispatch to a CPU ``backend`` (torch, cpp or numba); see the module docstring.
    ``threads``: OpenMP threads for the cpp kernel (the others run on the calling thread)."""
    return backends.get("stage_row", backend, "cpu")(src, dst, src_dtype, threads)
