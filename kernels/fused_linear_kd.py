"""Chunked fused linear + KD for large vocabularies (C = 32k-150k).

From each student's last hidden states h_k [N, H] and output weights W_k [C, H], and the
teacher's hidden states g [N, H] and weight V [C, H], compute the per-client KD loss and the
gradients with respect to h_k and W_k without ever allocating the [K*N, C] logits. Rows are
processed in chunks: z = h_chunk W_k^T and t = g_chunk V^T (cuBLAS), then the fused KD kernel
turns z into its gradient in place, then dh = dz W_k and dW_k += dz^T h_chunk. Peak extra
memory is two [chunk, C] buffers (the technique Liger-Kernel uses for its distillation losses).
"""

from __future__ import annotations

import torch

from .kd_loss import launch_kd


def _chunk_rows(C, elem_bytes, budget_bytes):
    return max(1, int(budget_bytes // (2 * C * elem_bytes)))


def fused_linear_kd(hidden, weight, teacher_hidden, teacher_weight, temperature, chunk_rows=None,
                    budget_bytes=256 << 20):
    """Same contract as fastagg.ops.fused_linear_kd_reference: (loss [K], dh [K, N, H], dW [K, C, H])."""
    K, N, H = hidden.shape
    C = weight.shape[1]
    if weight.shape != (K, C, H) or teacher_hidden.shape != (N, H) or teacher_weight.shape != (C, H):
        raise ValueError(f"shapes do not agree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"teacher_hidden {tuple(teacher_hidden.shape)}, teacher_weight {tuple(teacher_weight.shape)}")
    T = float(temperature)
    chunk = chunk_rows or _chunk_rows(C, hidden.element_size(), budget_bytes)
    loss = torch.zeros(K, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden)
    dW = torch.zeros(K, C, H, dtype=torch.float32, device=hidden.device)
    for k in range(K):
        Wk = weight[k]
        for r0 in range(0, N, chunk):
            r1 = min(N, r0 + chunk)
            h = hidden[k, r0:r1]
            z = h @ Wk.t()  # [rows, C]: the only logits ever held, a chunk at a time
            t = teacher_hidden[r0:r1] @ teacher_weight.t()
            row_loss = launch_kd(z, t, T, T / N, z, True)  # z now holds d loss_k / d z
            loss[k] += row_loss.sum()
            dh[k, r0:r1] = z @ Wk
            dW[k].add_(z.t() @ h)  # product in the input dtype (fp32 accumulate in cuBLAS), summed in fp32
            del z, t
    return loss * (T * T / N), dh, dW.to(weight.dtype)

