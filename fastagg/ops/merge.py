"""Fused correct-and-merge: one pass over the parameters.

    out[p] = c0 * theta[p] + sum_g sum_r coefs_g[r] * rows_g[index_g[r], p]

theta: [P] float32 (float64 allowed on the torch backend); each group's rows: [R_g, P] in
float32, bfloat16 or float16 (contiguous rows); coefs_g: [n_g]; index_g: [n_g] int64 row
numbers into rows_g (repeats allowed), or None for rows 0..n_g-1 (n_g <= R_g). Accumulation is
float32 (float64 when theta is float64). ``out`` may be ``theta`` itself (in-place merge). The
triton and numba kernels take at most three groups (the aggregator's deltas, base versions and
KD rows), the cpp and torch ones any number.

The aggregator computes every coefficient on the host (FedAsync prefix products, FedBuff
weights and normalisation, eta_kd * lambda_i), so the corrected deltas are never written out:
a group holds client deltas, another the KD correction rows, another the base versions.
"""

from __future__ import annotations

import torch

from .. import backends


def to_device(values, dtype, device):
    """A host list (or tensor) as a tensor on ``device`` without making the host wait: on CUDA
    through pinned memory and a non-blocking copy (a pageable copy would wait for all the work
    queued before it, which would serialise ingest and merge)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype)
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def fused_merge_reference(theta, c0, groups, out=None):
    acc_dtype = torch.float64 if theta.dtype == torch.float64 else torch.float32
    acc = theta.to(acc_dtype) * float(c0)
    for rows, coefs, index in groups:
        if rows is None or len(coefs) == 0:
            continue
        sel = rows[:len(coefs)] if index is None else rows.index_select(0, to_device(index, torch.int64, rows.device))
        acc += to_device(coefs, torch.float64, theta.device).to(acc_dtype) @ sel.to(acc_dtype)
    if out is None:
        return acc.to(theta.dtype)
    out.copy_(acc)
    return out


def fused_merge(theta, c0, groups, out=None, backend="torch"):
    """Dispatch to ``backend``; see the module docstring for the contract."""
    groups = [g for g in groups if g[0] is not None and len(g[1]) > 0]
    for rows, coefs, index in groups:
        if rows.dim() != 2 or rows.shape[1] != theta.numel():
            raise ValueError(f"merge rows must be [R, {theta.numel()}], got {tuple(rows.shape)}")
        n = len(coefs) if index is None else len(index)
        if index is None and n > rows.shape[0]:
            raise ValueError(f"{n} coefficients for {rows.shape[0]} rows")
        if index is not None and len(index) != len(coefs):
            raise ValueError("index and coefs differ in length")
    impl = backends.get("fused_merge", backend, theta.device)
    return impl(theta, c0, groups, out)
