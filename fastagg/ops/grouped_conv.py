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
caller can check that the kernels really ran. Under autocast every route, ``"native"``
included, casts a vmap'd convolution's operands itself: autocast does not reach it under vmap.

``fuse_conv_relu_pool(model)`` (torch.fx) makes a copy of the model whose conv -> relu -> 2x2
max-pool chains call ``conv_relu_pool``: on the ``"*_fused"`` routes one grouped op per chain
(``grouped_conv_relu_pool``: the kernels pool in the convolution's epilogue), the three ops as
before everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
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
        return (*_grouped_grads(ctx, x, w, dy.to(ctx.dtype), ctx.channels_last), None, None, None, None)


def _plain(t):
    """A saved tensor as the kernels can read it. Under a torch.func grad transform, a tensor
    saved in forward comes back to backward wrapped for that (finished) level, and a wrapper has
    no storage to hand a kernel; its value is the tensor inside (same shape: a grad wrapper, not
    a vmap one)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t) and not f.is_batchedtensor(t):
        t = f.get_unwrapped(t)
    return t


def _grouped_grads(ctx, x, w, dy, channels_last=False):
    """(dx, dw, db) of the grouped convolution through the kernels, for the inputs that need them."""
    kern = _kernels()
    x, w = _plain(x), _plain(w)
    xc, wc = x.to(ctx.dtype), w.to(ctx.dtype)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = kern.conv_backward_data(dy, wc, xc.shape, ctx.stride, ctx.padding, channels_last).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = kern.conv_backward_weight(dy, xc, wc.shape, ctx.stride, ctx.padding).to(w.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        db = dy.sum(dim=(1, 3, 4), dtype=_acc(dy.dtype)).to(ctx.bias_dtype)
    return dx, dw, db


def grouped_conv2d_triton(x, w, b, stride, padding, dtype=None, channels_last=False):
    return _TritonGroupedConv.apply(x, w, b, tuple(stride), tuple(padding), dtype or x.dtype, channels_last)


def grouped_conv2d(x, w, b, stride, padding, dtype=None, backend="triton", channels_last=False):
    """Differentiable grouped convolution of K students (see the module docstring).
    ``channels_last`` (triton): outputs and data gradients stored [K, N, H, W, C]."""
    stride, padding = _checked("grouped_conv2d", x, w, stride, padding, backend)
    if backend == "torch":
        return grouped_conv2d_reference(x, w, b, stride, padding, dtype)
    return grouped_conv2d_triton(x, w, b, stride, padding, dtype, channels_last)


def _checked(op, x, w, stride, padding, backend):
    """(stride, padding) as pairs, once the shapes match and the backend is one this op has here."""
    if x.dim() != 5 or w.dim() != 5 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"{op}: input {tuple(x.shape)} [K, N, C, H, W] and weight "
                         f"{tuple(w.shape)} [K, Co, C, R, S] do not match")
    ok, why = ((True, "") if backend == "torch" else _triton_status() if backend == "triton"
               else (False, "not a backend of this op"))
    if not ok:
        raise backends.BackendUnavailable(f"{op} has torch and triton backends; {backend!r}: {why}")
    return nn.modules.utils._pair(stride), nn.modules.utils._pair(padding)


@functools.lru_cache(maxsize=None)
def _triton_status():
    return backends.available()["triton"]


# route -> (backend, channels-last outputs). The "_fused" routes also run each
# conv -> relu -> 2x2 max-pool chain of the model as one op (see fuse_conv_relu_pool).
# "gemm": vmap's cuDNN convolutions, except a layer whose input every student shares (the first,
# on the proxy batch), which runs as cuBLAS products (fastagg.ops.shared_conv). "gemm_fused": the
# same, and a chain on that shared input runs as one op through fastagg.kernels.shared_conv.
ROUTES = {"native": (None, False), "torch": ("torch", False), "triton": ("triton", False),
          "triton_cl": ("triton", True), "torch_fused": ("torch", False), "triton_fused": ("triton", False),
          "gemm": (None, False), "gemm_fused": (None, False), "dense": ("dense", False)}
SHARED_CONV_ROUTES = ("gemm", "gemm_fused")  # routes whose plain shared-input layer runs as products
# "dense": a layer whose input differs per student runs as K dense convolutions through the
# torch.library ops of fastagg.ops.dense_conv (for torch.compile; gradients by torch.autograd of
# the vmap'd forward, not torch.func's grad: see there); the shared-input layer as native.


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
        return (*_student_grads(ctx, x, w, dy.to(ctx.dtype)), None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, dtype, route, counter):
        x, w, b = _students_first(info.batch_size, in_dims, x, w, b, dtype)
        counter.calls += 1
        backend, channels_last = ROUTES[route]
        # One student of one proxy input: NCHW. torch 2.13's vmap'd eval-mode batch norm returns a
        # wrong input gradient for a channels-last [1, 1, C, H, W] input (off by O(1); forward and
        # the other shapes right), so a BatchNorm after this layer would corrupt the KD gradient.
        channels_last = channels_last and (x.shape[0] > 1 or x.shape[1] > 1)
        return grouped_conv2d(x, w, b, stride, padding, dtype, backend, channels_last), 0


def _student_grads(ctx, x, w, dy):
    """(dx, dw, db) of one student's convolution in plain PyTorch, for the inputs that need them."""
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.nn.grad.conv2d_input(x.shape, w.to(ctx.dtype), dy, ctx.stride, ctx.padding).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = torch.nn.grad.conv2d_weight(x.to(ctx.dtype), w.shape, dy, ctx.stride, ctx.padding).to(w.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        db = dy.sum(dim=(0, 2, 3), dtype=_acc(dy.dtype)).to(ctx.bias_dtype)
    return dx, dw, db


def _students_first(K, in_dims, x, w, b, dtype):
    """x, w, b with the students' dimension first; an input shared by all students (the proxy
    batch) is cast once and viewed K times (stride 0)."""
    def batched(t, d, cast):
        if t is None:
            return None
        if d is not None:
            return t.movedim(d, 0)
        return (t.to(dtype) if cast else t).unsqueeze(0).expand(K, *t.shape)

    return batched(x, in_dims[0], True), batched(w, in_dims[1], True), batched(b, in_dims[2], False)


class RouteCounter:
    """Routed calls (an object, not a list: functorch flattens containers it is handed)."""

    def __init__(self):
        self.calls = 0


def _routable(m):
    return (type(m)._conv_forward is nn.Conv2d._conv_forward and m.groups == 1 and m.dilation == (1, 1)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def cast_operands(dtype, x, w, b):
    """A convolution's operands in ``dtype`` (no copies where they are in it already)."""
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _routed_forward(module, route, counter, x, weight, bias):
    batched = torch._C._functorch.is_batchedtensor
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    # Only a convolution whose input differs per student is grouped. One whose input is shared
    # by all of them (the first layer, on the proxy batch) is a single ordinary convolution with
    # K * Co output channels under vmap's own rule; it stays there, and so does every layer on
    # the native route. Autocast does not reach a convolution under vmap (it runs in fp32 even
    # inside torch.autocast), so the operands are cast here.
    if route in SHARED_CONV_ROUTES and x.dim() == 4 and batched(weight) and not batched(x):
        from .shared_conv import shared_conv2d
        x, weight, bias = cast_operands(dtype, x, weight, bias)
        counter.calls += 1
        return shared_conv2d(x, weight, bias, list(module.stride), list(module.padding))
    if route == "dense" and x.dim() == 4 and batched(weight) and batched(x):
        from .dense_conv import dense_conv2d
        x, weight, bias = cast_operands(dtype, x, weight, bias)
        counter.calls += 1
        return dense_conv2d(x, weight, bias, module.stride, module.padding)
    if (ROUTES[route][0] is None or x.dim() != 4 or not batched(weight) or not batched(x)
            or x.dtype == torch.float64):
        if batched(weight) and x.dtype != torch.float64 and dtype != weight.dtype:
            x, weight, bias = cast_operands(dtype, x, weight, bias)
        return nn.Conv2d._conv_forward(module, x, weight, bias)
    return _StudentConv.apply(x, weight, bias, module.stride, module.padding, dtype, route, counter)


def routable_convs(model):
    """The layers of ``model`` that ``route_convs`` reroutes."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and _routable(m)]


@contextlib.contextmanager
def route_convs(model, route="triton"):
    """Within the block, ``model``'s plain Conv2d layers run as grouped ops under vmap, by
    ``route`` (a key of ROUTES), and so do the fused chains of a model made by
    ``fuse_conv_relu_pool``. Yields a ``RouteCounter`` whose ``calls`` counts them."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {tuple(ROUTES)}, got {route!r}")
    counter = RouteCounter()
    patched = routable_convs(model)
    for m in patched:
        m._conv_forward = lambda x, w, b, m=m: _routed_forward(m, route, counter, x, w, b)
    # what else a routed (cast) convolution's bf16 output meets under vmap on a CPU: a convolution
    # not rerouted (grouped, dilated) and an eval-mode batch norm, which vmap there refuses in
    # mixed dtypes (eager autocast accepts both)
    others = [m for m in model.modules() if isinstance(m, nn.Conv2d) and not _routable(m)
              and type(m)._conv_forward is nn.Conv2d._conv_forward]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and "forward" not in vars(m)]
    for m in others:  # as native runs an unrouted layer: its operands cast to the autocast dtype
        m._conv_forward = lambda x, w, b, m=m: _routed_forward(m, "native", counter, x, w, b)
    for m in norms:
        m.forward = lambda x, m=m: _norm_forward(m, x)
    token = _ACTIVE.set((route, counter))
    try:
        yield counter
    finally:
        _ACTIVE.reset(token)
        for m in patched + others:
            del m._conv_forward
        for m in norms:
            del m.forward


def _norm_forward(module, x):
    """A batch norm of a 16-bit activation on a CPU, in fp32 and back (what eager CPU batch norm
    does inside; vmap's rule there refuses a bf16 input with fp32 statistics)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and module.running_mean is not None \
            and module.running_mean.dtype != x.dtype:
        return type(module).forward(module, x.float()).to(x.dtype)
    return type(module).forward(module, x)


# -- conv -> relu -> 2x2 max-pool as one op ----------------------------------------------------
# The pooled output and the int8 code of each window's positive max are all that the chain
# writes (the kernel's epilogue does relu and pooling), and all that its backward reads to
# rebuild the gradient at the convolution's output: for a CIFAR CNN's first layer that is a
# fifth of the bytes of conv, relu and pool run one after the other.

_ACTIVE = contextvars.ContextVar("fastagg_conv_route", default=None)


def _pool_codes(y, idx, WO):
    """max_pool2d's flat indices as window positions (0..3, row-major), -1 where y <= 0."""
    q = (idx // WO % 2) * 2 + idx % WO % 2
    return torch.where(y > 0, q, -1).to(torch.int8)


def conv_relu_pool_reference(x, w, b, stride, padding, dtype=None):
    """(y, code) in plain PyTorch with the kernel's numerics: operands rounded to ``dtype``, the
    convolution, relu and pooling in the accumulation dtype (fp32; float64 stays float64), y
    rounded to ``dtype`` at the end (differentiable in y; code as the kernel writes it). Pooling
    before rounding matters in bf16: rounding first makes ties and moves windows' maxima."""
    dtype = dtype or x.dtype
    acc = _acc(dtype)
    with torch.autocast(x.device.type, enabled=False):  # the accumulation dtype, also under autocast
        z = grouped_conv2d_reference(x.to(dtype).to(acc), w.to(dtype).to(acc), None if b is None else b.to(acc),
                                     stride, padding)
    K, N, CO, HO, WO = z.shape
    y, idx = F.max_pool2d(F.relu(z.reshape(K * N, CO, HO, WO)), 2, return_indices=True)
    y, idx = y.view(K, N, CO, HO // 2, WO // 2), idx.view(K, N, CO, HO // 2, WO // 2)
    return y.to(dtype), _pool_codes(y, idx, WO)


def unpool_relu_reference(dp, code, HO, WO):
    """The gradient at the convolution's output [..., HO, WO]: dp at each window's positive max."""
    hit = code.unsqueeze(-1) == torch.arange(4, device=code.device)  # [..., HO/2, WO/2, 4]
    g = (dp.unsqueeze(-1) * hit).view(*dp.shape, 2, 2).movedim(-2, -3)  # [..., HO/2, 2, WO/2, 2]
    return g.reshape(*dp.shape[:-2], HO, WO)


def _save_chain(ctx, x, w, b, stride, padding, dtype, y, code):
    """What a fused chain's backward needs: the convolution's operands, the window codes, and the
    size of the convolution's output (twice the pooled one)."""
    ctx.mark_non_differentiable(code)
    ctx.save_for_backward(x, w, code)
    ctx.stride, ctx.padding, ctx.dtype = stride, padding, dtype
    ctx.bias_dtype = None if b is None else b.dtype
    ctx.conv_hw = (2 * y.shape[-2], 2 * y.shape[-1])


class _TritonConvReluPool(torch.autograd.Function):
    """The K students' fused chain through the kernels: forward with the epilogue, backward as
    the gradient rebuilt at the convolution's output (one pass) and the convolution's kernels."""

    @staticmethod
    def forward(x, w, b, stride, padding, dtype):
        return _kernels().conv_relu_pool_forward(x.to(dtype), w.to(dtype), b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_chain(ctx, *inputs, *output)

    @staticmethod
    def backward(ctx, dy, _dcode):
        x, w, code = (_plain(t) for t in ctx.saved_tensors)
        dz = _kernels().unpool_relu(dy.to(ctx.dtype), code, *ctx.conv_hw)
        return (*_grouped_grads(ctx, x, w, dz), None, None, None)


def grouped_conv_relu_pool(x, w, b, stride, padding, dtype=None, backend="triton"):
    """(max_pool2d(relu(conv2d(x[k], w[k], b[k])), 2) [K, N, Co, Ho/2, Wo/2], int8 codes)."""
    stride, padding = _checked("grouped_conv_relu_pool", x, w, stride, padding, backend)
    if backend == "torch":
        return conv_relu_pool_reference(x, w, b, stride, padding, dtype)
    return _TritonConvReluPool.apply(x, w, b, tuple(stride), tuple(padding), dtype or x.dtype)


class _StudentConvReluPool(torch.autograd.Function):
    """One student's conv -> relu -> 2x2 max-pool; under vmap over students, one grouped op."""

    @staticmethod
    def forward(x, w, b, stride, padding, dtype, route, counter):
        z = F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), stride, padding)
        y, idx = F.max_pool2d(F.relu(z), 2, return_indices=True)
        return y, _pool_codes(y, idx, z.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_chain(ctx, *inputs[:6], *output)

    @staticmethod
    def backward(ctx, dy, _dcode):  # one student outside vmap: plain PyTorch gradients
        x, w, code = ctx.saved_tensors
        dz = unpool_relu_reference(dy.to(ctx.dtype), code, *ctx.conv_hw)
        return (*_student_grads(ctx, x, w, dz), None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, w, b, stride, padding, dtype, route, counter):
        counter.calls += 1
        backend = ROUTES[route][0] or "triton"  # gemm_fused: the kernels for the shared chain only
        if in_dims[0] is None:  # the input all students share: one dense op over their stacked weights
            K = info.batch_size
            w = w.movedim(in_dims[1], 0)
            CO = w.shape[1]
            b = None if b is None else (b.movedim(in_dims[2], 0) if in_dims[2] is not None
                                        else b.expand(K, *b.shape)).reshape(K * CO)
            y, code = shared_conv_relu_pool(x, w.reshape(K * CO, *w.shape[2:]), b, stride, padding, dtype, backend)
            return (y.view(y.shape[0], K, CO, *y.shape[2:]), code.view(y.shape[0], K, CO, *y.shape[2:])), (1, 1)
        x, w, b = _students_first(info.batch_size, in_dims, x, w, b, dtype)
        return grouped_conv_relu_pool(x, w, b, stride, padding, dtype, backend), (0, 0)


# -- the chain on an input every student shares (the first layer, on the proxy batch) ----------
# Under vmap it is one dense convolution with K * Co output channels over few input channels,
# whose output is far larger than anything it reads: fastagg.kernels.shared_conv runs it without
# writing that output (forward pooled in the epilogue; weight gradient built from the pooled
# gradient and the codes as the tile loads them).

def shared_conv_relu_pool_reference(x, w, b, stride, padding, dtype=None):
    """(y [N, KCo, Ho/2, Wo/2], code) for x [N, C, H, W] and stacked weights w [KCo, C, R, S] in
    plain PyTorch with the kernels' numerics (conv_relu_pool_reference of one group)."""
    y, code = conv_relu_pool_reference(x.unsqueeze(0), w.unsqueeze(0), None if b is None else b.unsqueeze(0),
                                       stride, padding, dtype)
    return y[0], code[0]


class _SharedConvReluPool(torch.autograd.Function):
    """The chain over the shared input with the students' weights stacked: forward and weight
    gradient through fastagg.kernels.shared_conv (``backend="triton"``) or plain PyTorch
    (``"torch"``); an input gradient, never needed for the proxy batch, in plain PyTorch."""

    @staticmethod
    def forward(x, w, b, stride, padding, dtype, backend):
        if backend == "torch":
            return shared_conv_relu_pool_reference(x, w, b, stride, padding, dtype)
        kern = importlib.import_module("fastagg.kernels.shared_conv")
        return kern.shared_conv_relu_pool_forward(x.to(dtype), w.to(dtype), b, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_chain(ctx, *inputs[:6], *output)
        ctx.backend = inputs[6]

    @staticmethod
    def backward(ctx, dy, _dcode):
        x, w, code = (_plain(t) for t in ctx.saved_tensors)
        dy = dy.to(ctx.dtype)
        if ctx.backend == "torch":
            dz = unpool_relu_reference(dy, code, *ctx.conv_hw)
            return (*_student_grads(ctx, x, w, dz), None, None, None, None)
        kern = importlib.import_module("fastagg.kernels.shared_conv")
        need_b = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        dw = db = dx = None
        if ctx.needs_input_grad[1] or need_b:
            dw, db = kern.shared_conv_relu_pool_wgrad(x.to(ctx.dtype), dy, code, w.shape, ctx.stride, ctx.padding,
                                                      bias=need_b)
            dw, db = dw.to(w.dtype), None if db is None else db.to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            dz = unpool_relu_reference(dy, code, *ctx.conv_hw)
            dx = torch.nn.grad.conv2d_input(x.shape, w.to(ctx.dtype), dz, ctx.stride, ctx.padding).to(x.dtype)
        return dx, dw if ctx.needs_input_grad[1] else None, db, None, None, None, None


def shared_conv_relu_pool(x, w, b, stride, padding, dtype=None, backend="triton"):
    """(max_pool2d(relu(conv2d(x, w, b)), 2) [N, KCo, Ho/2, Wo/2], int8 codes) for the shared input
    x [N, C, H, W] and the students' stacked weights w [KCo, C, R, S], b [KCo] or None."""
    _checked("shared_conv_relu_pool", x.unsqueeze(0), w.unsqueeze(0), stride, padding, backend)
    return _SharedConvReluPool.apply(x, w, b, tuple(stride), tuple(padding), dtype or x.dtype, backend)


def conv_relu_pool(x, weight, bias, stride, padding):
    """What ``fuse_conv_relu_pool`` puts in place of a conv -> relu -> 2x2 max-pool chain: under
    vmap over students inside ``route_convs``, one grouped op (the students' convolutions with
    relu and pooling in the kernel's epilogue on the triton routes; on an input all students
    share, the dense op above, also on ``"gemm_fused"``); anywhere else, and for float64 or an
    odd-sized convolution output, the three ops as they were."""
    active = _ACTIVE.get()
    HO = (x.shape[-2] + 2 * padding[0] - weight.shape[-2]) // stride[0] + 1
    WO = (x.shape[-1] + 2 * padding[1] - weight.shape[-1]) // stride[1] + 1
    batched = torch._C._functorch.is_batchedtensor
    kernels = active is not None and (ROUTES[active[0]][0] not in (None, "dense")
                                      or (active[0] == "gemm_fused" and not batched(x)))
    if (not kernels or x.dim() != 4 or not batched(weight) or x.dtype == torch.float64 or HO % 2 or WO % 2):
        if active is not None and batched(weight) and x.dtype != torch.float64:  # as native: operands cast
            dev = x.device.type
            if torch.is_autocast_enabled(dev):
                x, weight, bias = cast_operands(torch.get_autocast_dtype(dev), x, weight, bias)
        return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, stride, padding)), 2)
    route, counter = active
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _StudentConvReluPool.apply(x, weight, bias, stride, padding, dtype, route, counter)[0]


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node, modules):
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


def _is_pool2(node, modules):
    """A 2x2 max-pool with stride 2, no padding, dilation or ceil mode, returning values only."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is not nn.MaxPool2d:
            return False
        kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                  ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    elif node.op == "call_function" and node.target is F.max_pool2d:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        kw = dict(zip(names, node.args[1:]), **node.kwargs)
    else:
        return False
    pair = nn.modules.utils._pair
    return (pair(kw.get("kernel_size")) == (2, 2) and kw.get("stride") in (None, 2, (2, 2), [])
            and pair(kw.get("padding", 0)) == (0, 0) and pair(kw.get("dilation", 1)) == (1, 1)
            and not kw.get("ceil_mode", False) and not kw.get("return_indices", False))


def conv_relu_pool_chains(model):
    """(a torch.fx trace of ``model``, [(conv node, relu node, pool node, the Conv2d), ...] for each
    plain Conv2d -> relu -> 2x2 max-pool chain in it, each link the only user of the one before);
    (None, []) if the model cannot be traced."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no chains, not an error
        return None, []
    modules = dict(gm.named_modules())
    chains = []
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(conv, nn.Conv2d) and _routable(conv)):
            continue
        relu = _only_user(node)
        pool = _only_user(relu) if relu is not None and _is_relu(relu, modules) else None
        if pool is not None and _is_pool2(pool, modules):
            chains.append((node, relu, pool, conv))
    return gm, chains


def fuse_conv_relu_pool(model):
    """(a torch.fx copy of ``model`` in which every plain Conv2d -> relu -> 2x2 max-pool chain
    calls ``conv_relu_pool``, how many chains it fused); (None, 0) if the model cannot be traced.
    The copy shares the model's modules and parameter names, so ``functional_call`` works on it
    with the same parameters; outside ``route_convs`` it computes exactly what the model does."""
    gm, chains = conv_relu_pool_chains(model)
    if gm is None:
        return None, 0
    for node, relu, pool, conv in chains:
        with gm.graph.inserting_before(pool):
            w = gm.graph.get_attr(f"{node.target}.weight")
            b = gm.graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None
            chain = gm.graph.call_function(conv_relu_pool, (node.args[0], w, b, conv.stride, conv.padding))
        pool.replace_all_uses_with(chain)
        for n in (pool, relu, node):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm, len(chains)
