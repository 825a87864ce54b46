"""The K students' convolutions as one grouped op, so that a vmap over students can use
fastagg's Triton implicit-GEMM kernels (fastagg.kernels.grouped_conv) instead of the grouped
convolution that vmap's own batching rule hands to cuDNN.

    grouped_conv2d(x [K, N, C, H, W], w [K, Co, C, R, S], b [K, Co] | None) -> [K, N, Co, Ho, Wo]

``backend="torch"`` is the reference (``F.conv2d`` with ``groups=K``, what vmap does itself);
``backend="triton"`` runs the three kernels (forward, data gradient, weight gradient), with
operands cast to ``dtype`` (bf16 under autocast), fp32 accumulation, and the weight and bias
gradients returned in fp32.

``route_convs(model, route)`` makes the model's plain ``nn.Conv2d`` layers call this op while
they run under ``torch.func.vmap`` (an ``autograd.Function`` with its own vmap rule). Routes:
``"torch"`` (the reference), ``"triton"`` (the kernels, NCHW outputs), ``"triton_cl"`` (the
kernels writing outputs and data gradients channels-last, so that the next layer's loads run
along contiguous channels). Outside vmap, for float64, for layers the kernels do not cover
(groups, dilation, padding modes, string padding) and for a layer whose input all students
share (vmap's rule makes that one ordinary convolution with K * Co output channels, not a
grouped one), they run as before. The yielded counter says how many calls were routed, so a
caller can check that the kernels really ran.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends


def grouped_conv2d_reference(x, w, b, stride, padding, dtype=None):
    """Differentiable plain PyTorch: one ``F.conv2d`` with ``groups=K``."""
    K, N, C, H, W = x.shape
    _, CO, _, R, S = w.shape
    dtype = dtype or x.dtype
    xg = x.to(dtype).movedim(0, 1).reshape(N, K * C, H, W)
    y = F.conv2d(xg, w.to(dtype).reshape(K * CO, C, R, S), None if b is None else b.to(dtype).reshape(K * CO),
                 stride, padding, groups=K)
    return y.view(N, K, CO, *y.shape[-2:]).movedim(1, 0)


def _acc(dtype):
    """Accumulation dtype of a reduction: float64 stays float64, everything else sums in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    return importlib.import_module("fastagg.kernels.grouped_conv")


class _TritonGroupedConv(torch.autograd.Function):
    """Forward and backward through the Triton kernels. The operands are cast to ``dtype`` in
    forward and again in backward (a no-op for activations, which autocast already made bf16;
    the weights are small)."""

    @staticmethod
    def forward(x, w, b, stride, padding, dtype, channels_last):
        return _kernels().conv_forward(x.to(dtype), w.to(dtype), b, stride, padding, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, dtype, channels_last = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.dtype, ctx.channels_last = stride, padding, dtype, channels_last
        ctx.bias_dtype = None if b is None else b.dtype

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        kern = _kernels()
        xc, wc, dy = x.to(ctx.dtype), w.to(ctx.dtype), dy.to(ctx.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = kern.conv_backward_data(dy, wc, xc.shape, ctx.stride, ctx.padding, ctx.channels_last).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = kern.conv_backward_weight(dy, xc, wc.shape, ctx.stride, ctx.padding).to(w.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(1, 3, 4), dtype=_acc(dy.dtype)).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def grouped_conv2d_triton(x, w, b, stride, padding, dtype=None, channels_last=False):
    return _TritonGroupedConv.apply(x, w, b, tuple(stride), tuple(padding), dtype or x.dtype, channels_last)


def grouped_conv2d(x, w, b, stride, padding, dtype=None, backend="triton", channels_last=False):
    """Differentiable grouped convolution of K students (see the module docstring).
    ``channels_last`` (triton): outputs and data gradients stored [K, N, H, W, C]."""
    if x.dim() != 5 or w.dim() != 5 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"grouped_conv2d: input {tuple(x.shape)} [K, N, C, H, W] and weight "
                         f"{tuple(w.shape)} [K, Co, C, R, S] do not match")
    stride, padding = nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)
    if backend == "torch":
        return grouped_conv2d_reference(x, w, b, stride, padding, dtype)
    ok, why = _triton_status() if backend == "triton" else (False, "not a backend of this op")
    if not ok:
        raise backends.BackendUnavailable(f"grouped_conv2d has torch and triton backends; {backend!r}: {why}")
    return grouped_conv2d_triton(x, w, b, stride, padding, dtype, channels_last)


@functools.lru_cache(maxsize=None)
def _triton_status():
    return backends.available()["triton"]


# route -> (backend, channels-last outputs)
ROUTES = {"torch": ("torch", False), "triton": ("triton", False), "triton_cl": ("triton", True)}


class _StudentConv(torch.autograd.Function):
    """One student's ``F.conv2d``; under vmap over students, all of them as one grouped op."""

    @staticmethod
    def forward(x, w, b, stride, padding, dtype, route, counter):
        return F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, dtype, _, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.dtype = stride, padding, dtype
        ctx.bias_dtype = None if b is None else b.dtype

    @staticmethod
    def backward(ctx, dy):  # one student outside vmap: plain PyTorch gradients
        x, w = ctx.saved_tensors
        dy = dy.to(ctx.dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, w.to(ctx.dtype), dy, ctx.stride, ctx.padding).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.nn.grad.conv2d_weight(x.to(ctx.dtype), w.shape, dy, ctx.stride, ctx.padding).to(w.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=(0, 2, 3), dtype=_acc(dy.dtype)).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, dtype, route, counter):
        K = info.batch_size

        def batched(t, d, cast):
            if t is None:
                return None
            if d is not None:
                return t.movedim(d, 0)
            # shared by all students (the proxy batch): cast once, then a stride-0 view
            return (t.to(dtype) if cast else t).unsqueeze(0).expand(K, *t.shape)

        x, w, b = batched(x, in_dims[0], True), batched(w, in_dims[1], True), batched(b, in_dims[2], False)
        counter.calls += 1
        backend, channels_last = ROUTES[route]
        return grouped_conv2d(x, w, b, stride, padding, dtype, backend, channels_last), 0


class RouteCounter:
    """Routed calls (an object, not a list: functorch flattens containers it is handed)."""

    def __init__(self):
        self.calls = 0


def _routable(m):
    return (type(m)._conv_forward is nn.Conv2d._conv_forward and m.groups == 1 and m.dilation == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _routed_forward(module, route, counter, x, weight, bias):
    batched = torch._C._functorch.is_batchedtensor
    # Only a convolution whose input differs per student is grouped. One whose input is shared
    # by all of them (the first layer, on the proxy batch) is a single ordinary convolution with
    # K * Co output channels under vmap's own rule; it stays there.
    if x.dim() != 4 or not batched(weight) or not batched(x) or x.dtype == torch.float64:
        return nn.Conv2d._conv_forward(module, x, weight, bias)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _StudentConv.apply(x, weight, bias, module.stride, module.padding, dtype, route, counter)


def routable_convs(model):
    """The layers of ``model`` that ``route_convs`` reroutes."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and _routable(m)]


@contextlib.contextmanager
def route_convs(model, route="triton"):
    """Within the block, ``model``'s plain Conv2d layers run as grouped ops under vmap, by
    ``route`` (a key of ROUTES). Yields a ``RouteCounter`` whose ``calls`` counts them."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {tuple(ROUTES)}, got {route!r}")
    counter = RouteCounter()
    patched = routable_convs(model)
    for m in patched:
        m._conv_forward = lambda x, w, b, m=m: _routed_forward(m, route, counter, x, w, b)
    try:
        yield counter
    finally:
        for m in patched:
            del m._conv_forward
