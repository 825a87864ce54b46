"""Reference for the chunked fused linear + KD op (large vocabularies).

    student hidden h: [K, N, H], student output weights W: [K, C, H] (one per client)
    teacher hidden g: [N, H], teacher output weight V: [C, H]
    z_k = h_k W_k^T,  t = g V^T,  p_T = softmax(t / T),  q_k = softmax(z_k / T)
    loss_k = T^2 / N * sum_n KL(p_T[n] || q_k[n])
    returns loss [K], d loss_k / d h_k [K, N, H], d loss_k / d W_k [K, C, H]

This reference materialises the [K*N, C] logits; fastagg.kernels.fused_linear_kd never does.
"""

from __future__ import annotations

import torch


def fused_linear_kd_reference(hidden, weight, teacher_hidden, teacher_weight, temperature):
    T = float(temperature)
    h = hidden.detach().float().requires_grad_(True)
    W = weight.detach().float().requires_grad_(True)
    t = teacher_hidden.float() @ teacher_weight.float().t()
    p = torch.softmax(t / T, dim=-1)
    z = torch.einsum("knh,kch->knc", h, W)
    logq = torch.log_softmax(z / T, dim=-1)
    N = hidden.shape[1]
    loss = (torch.xlogy(p, p) - p * logq).sum(dim=(1, 2)) * (T * T / N)
    gh, gW = torch.autograd.grad(loss.sum(), (h, W))
    return loss.detach(), gh, gW
