"""A convolution whose input every student shares (the first layer, on the proxy batch), as
cuBLAS products.

Under vmap over K students such a layer is one dense convolution with K * Co output channels
over few input channels (3 for images); on the H100 cuDNN ran the `cnn`'s first layer at ~11
TFLOP/s with its relu and pool (bench/NOTES-gpu.md). Here the shared input is unfolded once,
cols [N, C*R*S, Ho*Wo], and each image's output is one product of the students' stacked weights
[K*Co, C*R*S] with its columns (``torch.bmm``; the output lands in the layout vmap's own rule
gives, [N, K*Co, Ho, Wo], so the layers after it see what they saw before); the weight gradient
is sum_n dy[n] cols[n]^T. An ``autograd.Function`` with its own vmap rule (as the grouped
convolutions of fastagg.ops.grouped_conv): one student's convolution outside vmap, all K students'
as the products above inside it. (torch.library custom ops were tried first: their generated
autograd cannot run under torch.func's grad transform when called from a vmap rule.)

    shared_conv2d(x [N, C, H, W], w [Co, C, R, S], b [Co] | None, stride, padding) -> [N, Co, Ho, Wo]

The engine's ``"gemm"`` route calls it for a vmap'd ``nn.Conv2d`` whose input is not batched
(fastagg.ops.grouped_conv.route_convs); whether it beats cuDNN is for the route timer to say,
per pass size (not yet run on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _out_hw(x, R, S, stride, padding):
    H, W = x.shape[-2:]
    return (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1


def _gemm_forward(x, w, b, stride, padding):
    """[N, C, H, W] x [Co, C, R, S] -> [N, Co, HO, WO], one product per image (Co may be K * Co)."""
    N = x.shape[0]
    CO, _, R, S = w.shape
    HO, WO = _out_hw(x, R, S, stride, padding)
    cols = F.unfold(x, (R, S), padding=padding, stride=stride)  # [N, C*R*S, HO*WO]
    y = torch.bmm(w.reshape(CO, -1).expand(N, -1, -1), cols).view(N, CO, HO, WO)
    if b is not None:
        y += b.view(1, CO, 1, 1)
    return y


def _gemm_wgrad(x, dy, w_shape, stride, padding):
    """dw [Co, C, R, S] = sum over images of dy[n] [Co, HO*WO] x cols[n]^T, summed in fp32."""
    N, CO = dy.shape[:2]
    cols = F.unfold(x, tuple(w_shape[2:]), padding=padding, stride=stride)
    dw = torch.bmm(dy.reshape(N, CO, -1), cols.transpose(1, 2))
    acc = torch.float64 if dw.dtype == torch.float64 else torch.float32
    return dw.sum(0, dtype=acc).to(dy.dtype).view(w_shape)


def _grads(ctx, x, w, dy):
    """(dx, dw, db) of the convolution, for the inputs that need them."""
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.nn.grad.conv2d_input(x.shape, w, dy, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        dw = _gemm_wgrad(x, dy, w.shape, ctx.stride, ctx.padding)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        db = dy.sum(dim=(0, 2, 3), dtype=acc).to(dy.dtype)
    return dx, dw, db


class _SharedGemmConv(torch.autograd.Function):
    """The K students' convolution of one shared input, their weights stacked [K*Co, C, R, S]."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        return _gemm_forward(x, w, b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, b is not None

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return (*_grads(ctx, x, w, dy), None, None)


class _StudentSharedConv(_SharedGemmConv):
    """One student's convolution; under vmap over students with an input they all share, the
    products above for all K at once (an input that differs per student: vmap's grouped rule).
    Its context and gradients are those of _SharedGemmConv (the same convolution)."""

    @staticmethod
    def forward(x, w, b, stride, padding):
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding):
        K = info.batch_size
        x_dim, w_dim, b_dim = in_dims[:3]

        def first(t, d):
            return None if t is None else t.movedim(d, 0) if d is not None else t.expand(K, *t.shape)

        if x_dim is not None:  # not shared after all: plain grouped convolution, correct, not this op's point
            from .grouped_conv import grouped_conv2d_reference
            return grouped_conv2d_reference(first(x, x_dim), first(w, w_dim), first(b, b_dim), stride, padding), 0
        w = first(w, w_dim)
        CO = w.shape[1]
        b = None if b is None else first(b, b_dim).reshape(K * CO)
        y = _SharedGemmConv.apply(x, w.reshape(K * CO, *w.shape[2:]), b, stride, padding)  # [N, K*Co, HO, WO]
        return y.view(y.shape[0], K, CO, *y.shape[2:]), 1


def shared_conv2d(x, w, b, stride, padding):
    """``F.conv2d(x, w, b, stride, padding)`` for one student; under vmap with ``x`` shared by
    the students, all of them as cuBLAS products (see the module docstring)."""
    return _StudentSharedConv.apply(x, w, b, tuple(stride), tuple(padding))


# -- the same product in plain ops, for torch.compile -------------------------------------------
# Dynamo traces a vmap'd body with unbatched tensors, so neither the runtime check for a shared
# input nor an autograd.Function's own vmap rule survives it. What does: plain ops whose vmap
# lowering is already a good product. Per student y = cols^T w^T, with cols^T [N*HO*WO, C*R*S]
# shared, lowers under vmap to one batched product whose shared operand is broadcast (stride 0,
# no copy), the output per student channels-last; the weight gradient lowers to dy^T cols^T, one
# product per student. (Written as w @ cols instead, vmap copies cols K times: checked with
# make_fx.) A layer gets this form only where it is known to read the model's input (the proxy
# batch, never batched: shared_input_convs); on a batched input it would still be right, slower.

def conv2d_as_product(x, w, b, stride, padding):
    """``F.conv2d(x, w, b, stride, padding)`` for [N, C, H, W] x [Co, C, R, S] as unfold and one
    matrix product, output [N, Co, HO, WO] stored channels-last."""
    N = x.shape[0]
    CO, _, R, S = w.shape
    HO, WO = _out_hw(x, R, S, stride, padding)
    cols_t = F.unfold(x, (R, S), padding=padding, stride=stride).transpose(1, 2).reshape(N * HO * WO, -1)
    y = cols_t @ w.reshape(CO, -1).t()
    if b is not None:
        y = y + b
    return y.view(N, HO, WO, CO).permute(0, 3, 1, 2)


def shared_input_convs(model, x):
    """The ``nn.Conv2d`` modules of ``model`` that receive ``x`` itself (the first layer(s) on the
    input), found by one forward with hooks (in eval mode: no running statistics move)."""
    found, hooks, training = [], [], model.training
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp: found.append(mod) if inp[0] is x else None))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return found
