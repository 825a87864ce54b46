"""Fused KD loss + gradient over the stacked student logits of K clients.

    student logits z: [K*N, C] (rows k*N .. k*N+N-1 belong to client k), any float dtype
    teacher probabilities p_T: [N, C] float32, shared by all K clients (cached per version)
    q = softmax(z / T)
    loss_k = T^2 / N * sum_{rows of k} sum_c p_T (log p_T - log q)       -> [K] float32
    grad   = T * (q - p_T) / N   (d loss_k / d z)                          -> [K*N, C], dtype of z

``kd_loss`` is the differentiable form (a torch.library custom op with a registered autograd
formula), so it composes with torch.func.vjp over a vmap'd student forward and torch.compile.
"""

from __future__ import annotations

import torch

from .. import backends


def check_shapes(logits, teacher_probs):
    """(K, N, C) for student logits [K*N, C] stacked over teacher rows [N, C]; every backend
    checks its arguments here."""
    N, C = teacher_probs.shape
    if logits.dim() != 2 or logits.shape[1] != C or logits.shape[0] % N:
        raise ValueError(f"student logits {tuple(logits.shape)} do not stack teacher rows {tuple(teacher_probs.shape)}")
    return logits.shape[0] // N, N, C


def kd_loss_grad_reference(logits, teacher_probs, temperature):
    K, N, C = check_shapes(logits, teacher_probs)
    T = float(temperature)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc).view(K, N, C) / T
    logq = torch.log_softmax(z, dim=-1)
    p = teacher_probs.to(acc).unsqueeze(0)
    loss = (torch.xlogy(p, p) - p * logq).sum(dim=(1, 2)) * (T * T / N)
    grad = (logq.exp() - p) * (T / N)
    return loss.to(acc), grad.reshape(K * N, C).to(logits.dtype)


def kd_loss_grad(logits, teacher_probs, temperature, backend="torch"):
    """Dispatch to ``backend``: returns (loss [K], grad [K*N, C])."""
    impl = backends.get("kd_loss_grad", backend, logits.device)
    return impl(logits, teacher_probs, float(temperature))


@torch.library.custom_op("fastagg::kd_loss", mutates_args=())
def _kd_loss_op(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = kd_loss_grad(logits, teacher_probs, temperature, backend)
    return loss, grad


@_kd_loss_op.register_fake
def _(logits, teacher_probs, temperature, backend):
    K = logits.shape[0] // teacher_probs.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(K, dtype=acc), torch.empty_like(logits)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.N = inputs[1].shape[0]


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    K = grad_loss.shape[0]
    g = grad.view(K, ctx.N, -1) * grad_loss.view(K, 1, 1).to(grad.dtype)
    return g.view_as(grad), None, None, None


_kd_loss_op.register_autograd(_backward, setup_context=_setup)


def kd_loss(logits, teacher_probs, temperature, backend="torch"):
    """Per-client KD loss [K], differentiable with respect to ``logits``."""
    loss, _ = _kd_loss_op(logits, teacher_probs, float(temperature), backend)
    return loss
