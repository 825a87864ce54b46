"""The K students' convolutions as K dense ones, for torch.compile: torch.library custom ops.

Under vmap over students, a convolution whose input differs per student is one grouped
convolution (vmap's own rule). On the H200 (fifteenth session, `cnn`'s second layer, K = 128,
bf16, forward and both gradients) cuDNN ran that in 17.6 ms inside an eager pass, and the
compiled route's profile showed it as 128 per-group forward calls with a layout transpose on
each side of each; the same layer as 128 dense convolutions, channels-last, spread over four
streams, took 10.0 ms (257 TFLOP/s). The loop routes got that speed for this layer and lost it
on everything else, done one student at a time. Here only the convolutions are done per
student; the rest of the model stays batched under vmap, and compiled.

    dense_student_conv(x [N, C, H, W], w [Co, C, R, S], b [Co] | None, stride, padding)

is one student's ``F.conv2d``; its vmap rule calls ``dense_grouped_conv`` on all K students
([K, N, C, H, W] x [K, Co, C, R, S] -> [K, N, Co, Ho, Wo]; the op ``dense_grouped_conv_saving``
also returns the students-last copy of x it made, for the backward), whose autograd formula
calls ``dense_grouped_conv_backward``. Each runs the students round ``STREAMS`` side streams on CUDA
(forked from the current stream and joined back, so it can be captured in a CUDA graph: the
engine captures the dense routes, whose launches from Python would otherwise cost the host), with
the operands and the results stored [K, N, H, W, C] (each student's slice a contiguous
channels-last tensor, the layout cuDNN's bf16 kernels use: one copy for all students on the
way in; on CUDA cuDNN writes each forward, and each data gradient of a stride-1 layer computed
as a forward convolution, straight into the student's slice; the weight gradients and the data
gradients from convolution_backward are copied in; which way, and whether cuDNN searches for its
algorithms, is timed per shape: ``DGRAD``, ``CUDNN_BENCHMARK``, ``choices``; one of the ways is
"grouped", all students in one grouped convolution as vmap would run them, for a shape where the
students' dense convolutions are too small to fill the device: ``GROUPED``). Biases are added
once for all students. torch.compile
sees three opaque ops (their fake implementations give the shapes and strides), so inductor
still fuses everything around them.

These ops have no torch.func autograd: torch.func's ``grad`` over a custom op's generated
autograd fails ("it must override the setup_context staticmethod", torch 2.13), as the
shared-input convolution's docstring says of the first try there. The routes that use them
(the engine's ``compiled_dense`` and ``compiled_fused_dense``) take the gradient with
``torch.autograd.grad`` of a vmap'd forward instead, which composes with vmap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from .shared_conv import _out_hw
from .streams import round_streams
from .timing import time_each

_CUDNN_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STREAMS = 4  # side streams on CUDA (the fifteenth session's second-layer probe: 4 beat 1 by 1.3x)
_streams: dict = {}  # (device, how many) -> the side streams, made at first use
# How a stride-1 layer's data gradient is computed: "forward" (a forward convolution of dy with
# the flipped, channel-swapped weights, written in place), "backward" (convolution_backward, then
# a copy into place), or "auto": both timed per shape at first use, the faster kept. On the H100
# (nineteenth session, `cnn`'s second layer, K = 128) cuDNN ran "forward" with a 64x64-tile kernel
# for the layer's 32 output channels, 6.02 ms against 5.86 for its dgrad kernel: the copies went,
# the kernel time did not; and the op took 13.1 ms against 10.4 for a plain loop of F.conv2d and
# autograd. Which wins depends on the layer. "rows dgrad" (twenty-second session): fastagg's own
# kernel for all K students in one launch (fastagg.kernels.grouped_conv.conv_backward_data_rows),
# written into dx's storage, where Triton runs (ROWS_KERNELS below says where); "auto" times it too.
DGRAD = "auto"
# Whether DGRAD = "auto" also times "grouped": all K students in one grouped convolution (what
# vmap's own rule runs), the operands copied into and out of its [N, K*C, H, W] channels-last
# layout, for the forward and for both gradients. For `cnn`'s second layer the dense way won by
# far (H100, twentieth session: 10.6 ms against 18.7 forward and backward); for ResNet-18's small
# late layers (32 students' 4x4 pixels each) nothing says which wins, so each shape times both.
GROUPED = True
# cuDNN's algorithm search (benchmark mode) for the ops' convolutions on CUDA: True, False, or
# "auto" (both timed per shape at first use). Its heuristics gave this layer 64x64 tiles for the
# gradients (143-149 TFLOP/s) where its forward ran at 270.
CUDNN_BENCHMARK = "auto"
# fastagg's own kernels for the dense ops (fastagg.kernels.grouped_conv, "rows of taps": all K
# students in one launch, a program reading each pixel's (s, c) pairs along a row of taps as one
# contiguous run): the forward ("rows"), the stride-1 data gradient ("rows dgrad", written into
# dx's storage) and the weight gradient (" + rows wgrad", a program per row of taps reading dy's
# tile once for the row), each after cuDNN's ways in the lists timed. "auto" times them beside
# cuDNN's ways per shape on CUDA (with Triton),
# True runs only them (anywhere Triton runs: the interpreter in the tests), False never. On the
# H100 (twentieth session) cuDNN's weight gradients of `cnn`'s second layer took 6.1 ms a pass of
# 128 students (141 TFLOP/s), its data gradients 5.3 (162), each followed by a copy per student.
ROWS_KERNELS = "auto"
ROWS_WGRAD = " + rows wgrad"
choices: dict = {}  # (op, shapes, dtype, stride, padding, ...) -> {variant: ms, ..., "chosen": variant}
# "forward x", "backward x", "backward dy" -> [calls, calls that copied it into the students-last
# layout]: a diagnosis for the bench JSON (each copy of `cnn`'s second-layer input moves 1.1 GB a
# pass of 128 students; the H100 profile showed 7 copy kernels a pass besides the weights')
relayouts: dict = {}


def _side_streams(device):
    if device.type != "cuda" or STREAMS < 2:
        return []
    key = (device, STREAMS)  # keyed by the count too: ``streams(n)`` changes it after a first use
    if key not in _streams:
        _streams[key] = [torch.cuda.Stream(device) for _ in range(STREAMS)]
    return _streams[key]


def _key(x, w, stride, padding):
    return tuple(x.shape), tuple(w.shape), x.dtype, tuple(stride), tuple(padding), x.device, STREAMS


def _variants(device, can_forward, rows=False, drows=False):
    """The (way, cuDNN search) pairs to choose from. The way: per student, the data gradient by
    "forward" (only where the forward form applies) or "backward", or "grouped" (GROUPED; for the
    forward op "backward" means per student); with ``drows`` (a stride-1 backward where the rows
    kernels can run: _rows_here) also "rows dgrad", all students' data gradients by the rows
    kernel; with ``rows`` also each of those ways with the weight gradient by the rows kernel
    (" + rows wgrad"). The kernels' ways come after cuDNN's, so that a choice made inside a
    capture (which takes the first) never autotunes a kernel there. The search only where cuDNN
    runs, and not for a way that runs no cuDNN convolution."""
    if DGRAD == "grouped":
        dgrads = ["grouped"]
    else:
        if DGRAD == "auto":
            dgrads = (["forward", "backward"] if can_forward else ["backward"]) + (["rows dgrad"] if drows else [])
        elif DGRAD == "rows dgrad":
            dgrads = ["rows dgrad"] if drows else ["backward"]
        else:
            dgrads = [DGRAD] if can_forward else ["backward"]
        if rows and ROWS_KERNELS is True:
            dgrads = [d + ROWS_WGRAD for d in dgrads]
        elif rows:
            dgrads += [d + ROWS_WGRAD for d in dgrads]
        dgrads += ["grouped"] if GROUPED and DGRAD == "auto" and ROWS_KERNELS is not True else []
    cudnn_here = device.type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    searches = ([False, True] if CUDNN_BENCHMARK == "auto" else [bool(CUDNN_BENCHMARK)]) if cudnn_here else [None]
    return [(d, b) for d in dgrads for b in (searches if d != "rows dgrad" + ROWS_WGRAD else [None])]


def _name(variant):
    dgrad, search = variant
    return dgrad + ("" if search is None else ", cudnn search" if search else ", cudnn heuristics")


def _rows_here(x, dtype):
    """Whether the rows kernels can run for an input on x's device in ``dtype``: ROWS_KERNELS not
    False, Triton importable, and CUDA (or ROWS_KERNELS True: under the interpreter on a CPU)."""
    if ROWS_KERNELS is False or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not _triton_here():
        return False
    return x.is_cuda or ROWS_KERNELS is True


@functools.lru_cache(maxsize=None)
def _triton_here():
    """Whether Triton is importable: looked up once (30 us a lookup, and each dense op asks)."""
    return importlib.util.find_spec("triton") is not None


def _grouped(t):
    """[K, N, C, H, W] (any strides) copied into the layout of one grouped convolution's operand:
    [N, K*C, H, W] stored channels-last ([N, H, W, K, C]), channel k*C + c student k's channel c."""
    K, N, C, H, W = t.shape
    g = t.new_empty(N, H, W, K, C)
    g.copy_(t.permute(1, 3, 4, 0, 2))
    return g.view(N, H, W, K * C).permute(0, 3, 1, 2)


def _grouped_weight(ws):
    """The students' weights [K, Co, C, R, S], each channels-last (_students_last), as one grouped
    convolution's [K*Co, C, R, S] weight: a view."""
    K, CO, C, R, S = ws.shape
    return ws.permute(0, 1, 3, 4, 2).reshape(K * CO, R, S, C).permute(0, 3, 1, 2)


def _choose(key, variants, run, device, reps=2):
    """The variant to run for this shape: the only one, the one timed fastest before, or, at the
    first call, each timed now (fastagg.ops.timing.time_each: once to warm up, cuDNN's search
    running then, then the median of ``reps``; on CUDA the replays of each variant captured as a
    CUDA graph, timed with events on the current stream, which ``run`` joins back to; "timed" in
    the record says how).
    While a CUDA graph is being captured nothing can be timed: the first variant runs, and is
    not recorded (the engine warms a route up before it captures it, so it has chosen by then)."""
    if len(variants) == 1:
        return variants[0]
    got = choices.get(key)
    if got is not None:
        return got["variant"]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return variants[0]
    how = {}
    timed = time_each(variants, run, device, reps, how=how, name=_name)
    best = min(timed, key=timed.get)
    choices[key] = {"ms": {_name(v): ms for v, ms in timed.items()}, "chosen": _name(best), "variant": best, **how}
    return best


@contextlib.contextmanager
def _cudnn_search(on):
    """cuDNN's benchmark flag set to ``on`` within the block (``None``: left as it is)."""
    if on is None:
        yield
        return
    c = torch.backends.cudnn
    with c.flags(enabled=c.enabled, benchmark=bool(on), deterministic=c.deterministic, allow_tf32=c.allow_tf32):
        yield


def _students_last(t, what=None):
    """[K, N, C, H, W] as a view of a [K, N, H, W, C] tensor (no copy when it is one already):
    each t[k] a contiguous channels-last tensor (a weight [K, Co, C, R, S] likewise). ``what``
    names an activation in ``relayouts``: how often it came in another layout and was copied."""
    out = t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if what is not None:
        seen = relayouts.setdefault(what, [0, 0])
        seen[0] += 1
        seen[1] += out.data_ptr() != t.data_ptr() and t.numel() > 0
    return out


def _empty_students_last(K, N, C, H, W, like):
    return like.new_empty(K, N, H, W, C).permute(0, 1, 4, 2, 3)


def _each_student(K, device, body):
    """``body(k)`` for k < K, round the side streams on CUDA (fastagg.ops.streams)."""
    round_streams(K, _side_streams(device), body, device)


def _is_students_last(t):
    return t.permute(0, 1, 3, 4, 2).is_contiguous()  # exactly when _students_last(t) makes no copy


def dense_grouped_conv(x, w, b, stride, padding):
    """K students' convolutions, one dense ``F.conv2d`` each: [K, N, C, H, W] x [K, Co, C, R, S]
    (+ [K, Co]) -> [K, N, Co, Ho, Wo], stored [K, N, Ho, Wo, Co]."""
    return dense_grouped_conv_saving(x, w, b, list(stride), list(padding))[0]


@torch.library.custom_op("fastagg::dense_grouped_conv_saving", mutates_args=())
def dense_grouped_conv_saving(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                              padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``dense_grouped_conv``'s output, x copied into the students-last layout for the backward
    where it came in another one, else an empty tensor): the backward then reads that copy
    instead of making its own (an op's output may not alias its input, hence the empty one)."""
    K, N = x.shape[:2]
    CO, _, R, S = w.shape[1:]
    HO, WO = _out_hw(x, R, S, stride, padding)
    xs = _students_last(x, "forward x")
    ws = _students_last(w)  # each student's [Co, C, R, S] channels-last
    out = _empty_students_last(K, N, CO, HO, WO, x)

    variants = _variants(x.device, False)
    if _rows_here(x, x.dtype):  # all students by the rows kernel, written into out
        from fastagg.kernels.grouped_conv import ROWS_MAX_RUN, conv_forward_rows, rows_layout_ok
        if rows_layout_ok(xs) and S * x.shape[2] <= ROWS_MAX_RUN:
            variants = [("rows", None)] if ROWS_KERNELS is True else variants + [("rows", None)]

    def run(variant):
        if variant[0] == "rows":
            conv_forward_rows(xs, w, stride, padding, out=out)
            return
        with _cudnn_search(variant[1]):
            if variant[0] == "grouped":  # one grouped convolution, its output copied into place
                y = F.conv2d(_grouped(x), _grouped_weight(ws), None, stride, padding, 1, K)
                out.copy_(y.view(N, K, CO, HO, WO).transpose(0, 1))
            else:
                _each_student(K, x.device, lambda k: _conv_into(out[k], xs[k], ws[k], stride, padding))

    run(_choose(("forward", *_key(x, w, stride, padding)), variants, run, x.device))
    if b is not None:  # one add for all K (F.conv2d adds a bias by a kernel of its own: K of them)
        out.add_(b.view(K, 1, CO, 1, 1))
    return out, (x.new_empty(0) if _is_students_last(x) else xs)


def _conv_into(out, x, w, stride, padding):
    """``out <- F.conv2d(x, w)`` (no bias): on CUDA cuDNN writes into ``out`` itself (its out= form,
    under the cudnn flags F.conv2d would use), elsewhere a copy. (The H100 profile of the
    eighteenth session: a copy kernel per student after each dense forward, 1.9 ms of a
    compiled_fused_dense pass's 38.8 ms of kernels for `cnn`, K = 128.)"""
    cudnn = torch.backends.cudnn
    # cuDNN describes ``out`` in the layout it picks from x and w (channels-last when either reads
    # as such), not by out's strides: so only where x is channels-last beyond doubt (more than one
    # channel and one pixel) and out is channels-last too (a slice of _empty_students_last is)
    in_place = (x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and x.is_contiguous(memory_format=torch.channels_last)
                and out.is_contiguous(memory_format=torch.channels_last))
    if out.is_cuda and in_place and x.dtype in _CUDNN_OUT_DTYPES and cudnn.is_available() and cudnn.enabled:
        torch.ops.aten.cudnn_convolution.out(x, w, list(padding), list(stride), [1, 1], 1, cudnn.benchmark,
                                             cudnn.deterministic, cudnn.allow_tf32, out=out)
    else:
        out.copy_(F.conv2d(x, w, None, stride, padding))


@dense_grouped_conv_saving.register_fake
def _(x, w, b, stride, padding):
    CO, _, R, S = w.shape[1:]
    return (_empty_students_last(*x.shape[:2], CO, *_out_hw(x, R, S, stride, padding), x),
            x.new_empty(0) if _is_students_last(x) else _empty_students_last(*x.shape, x))


@torch.library.custom_op("fastagg::dense_grouped_conv_backward", mutates_args=())
def dense_grouped_conv_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, stride: list[int],
                                padding: list[int], need_x: bool, need_w: bool,
                                need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [K, N, C, H, W] stored [K, N, H, W, C], dw [K, Co, C, R, S] stored [K, Co, R, S, C] in
    x's dtype, db [K, Co] summed in fp32); a gradient not needed comes back empty."""
    K = x.shape[0]
    R, S = w.shape[-2:]
    xs, dys = _students_last(x, "backward x"), _students_last(dy, "backward dy")
    ws = _students_last(w)
    dx = _empty_students_last(*x.shape, x) if need_x else x.new_empty(0)
    # dw stored as each student's weight is read ([K, Co, R, S, C]: cuDNN's channels-last gradients
    # of the channels-last ws copy in as plain memcpys, and the rows kernel's stores run along (s, c))
    dw = _empty_students_last(*w.shape, w) if need_w else w.new_empty(0)
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    db = dy.sum(dim=(1, 3, 4), dtype=acc) if need_b else dy.new_empty(0, dtype=acc)
    # With stride 1 the data gradient can be a forward convolution of dy with each student's weight
    # flipped and its channels swapped (padding R-1-P), which cuDNN's forward kernels write into
    # dx[k] itself (_conv_into), or convolution_backward's, copied in: DGRAD (above) says which.
    # The eighteenth session's H100 profile had the dgrad kernels at 5.9 ms against the layer's
    # forward at 3.3; the nineteenth's had the forward form at 6.0 (64x64 tiles for 32 channels).
    can_forward = need_x and list(stride) == [1, 1] and padding[0] <= R - 1 and padding[1] <= S - 1
    if can_forward:
        wt = _students_last(w.flip(3, 4).transpose(1, 2))  # [K, C, Co, R, S]
        pad_t = [R - 1 - padding[0], S - 1 - padding[1]]

    rows = drows = False
    if (need_w or need_x) and _rows_here(x, x.dtype):
        from fastagg.kernels.grouped_conv import (ROWS_MAX_RUN, conv_backward_data_rows, conv_backward_weight_rows,
                                                  rows_layout_ok)
        rows = need_w and rows_layout_ok(xs) and rows_layout_ok(dys) and S * x.shape[2] <= ROWS_MAX_RUN
        drows = (need_x and list(stride) == [1, 1] and rows_layout_ok(dys)  # the kernel's rows: stride 1
                 and S * w.shape[1] <= ROWS_MAX_RUN)

    def run(variant):
        if variant[0] == "grouped":
            with _cudnn_search(variant[1]):
                _grouped_backward(x, ws, dy, stride, padding, need_x, need_w, dx, dw)
            return
        by_rows, dgrad = variant[0].endswith(ROWS_WGRAD), variant[0].removesuffix(ROWS_WGRAD)
        as_forward = dgrad == "forward"
        mask = [need_x and dgrad == "backward", need_w and not by_rows, False]

        def one(k):
            if as_forward:
                _conv_into(dx[k], dys[k], wt[k], [1, 1], pad_t)
            if not (mask[0] or mask[1]):
                return
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dys[k], xs[k], ws[k], None, stride, padding, [1, 1], False, [0, 0], 1, mask)
            if mask[0]:
                dx[k].copy_(gx)
            if mask[1]:
                dw[k].copy_(gw)

        if as_forward or mask[0] or mask[1]:
            with _cudnn_search(variant[1]):
                _each_student(K, x.device, one)
        if dgrad == "rows dgrad":  # all K students' data gradients in one launch, into dx
            conv_backward_data_rows(dys, w, x.shape, padding, out=dx)
        if by_rows:  # and their weight gradients
            conv_backward_weight_rows(dys, xs, w.shape, stride, padding, out=dw)

    if need_x or need_w:
        key = ("backward", *_key(x, w, stride, padding), need_x, need_w)
        run(_choose(key, _variants(x.device, can_forward, rows, drows), run, x.device))
    return dx, dw, db


def _grouped_backward(x, ws, dy, stride, padding, need_x, need_w, dx, dw):
    """The "grouped" way of dense_grouped_conv_backward: one convolution_backward with K groups over
    the operands copied into its layout, the gradients copied into dx and dw."""
    K, N, C, H, W = x.shape
    CO = ws.shape[1]
    gx, gw, _ = torch.ops.aten.convolution_backward(
        _grouped(dy), _grouped(x), _grouped_weight(ws), None, stride, padding, [1, 1], False, [0, 0], K,
        [need_x, need_w, False])
    if need_x:
        dx.copy_(gx.view(N, K, C, H, W).transpose(0, 1))
    if need_w:
        dw.copy_(gw.view(K, CO, *gw.shape[1:]))


@dense_grouped_conv_backward.register_fake
def _(x, w, dy, stride, padding, need_x, need_w, need_b):
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return (_empty_students_last(*x.shape, x) if need_x else x.new_empty(0),
            _empty_students_last(*w.shape, w) if need_w else w.new_empty(0),
            dy.new_empty(w.shape[:2], dtype=acc) if need_b else dy.new_empty(0, dtype=acc))


def _setup(ctx, inputs, output):
    x, w, b, stride, padding = inputs
    xs = output[1]  # the forward's students-last copy of x, if it made one
    ctx.mark_non_differentiable(xs)
    ctx.set_materialize_grads(False)  # no zeros for xs's gradient
    ctx.save_for_backward(xs if xs.numel() else x, w)
    ctx.stride, ctx.padding, ctx.bias_dtype = stride, padding, None if b is None else b.dtype


def _backward(ctx, dy, _dxs=None):
    if dy is None:  # the output unused
        return None, None, None, None, None
    x, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, dw, db = dense_grouped_conv_backward(x, w, dy.to(x.dtype), ctx.stride, ctx.padding, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None, None, None)


dense_grouped_conv_saving.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("fastagg::dense_student_conv", mutates_args=())
def dense_student_conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: list[int],
                       padding: list[int]) -> torch.Tensor:
    """One student's convolution (``F.conv2d``); under vmap over students, ``dense_grouped_conv``."""
    return F.conv2d(x, w, b, stride, padding)


@dense_student_conv.register_fake
def _(x, w, b, stride, padding):
    return x.new_empty(x.shape[0], w.shape[0], *_out_hw(x, w.shape[2], w.shape[3], stride, padding))


def _student_backward(ctx, dy):
    x, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, dw, db = dense_grouped_conv_backward(x[None], w[None], dy[None].to(x.dtype), ctx.stride, ctx.padding,
                                             need_x, need_w, need_b)
    return (dx[0] if need_x else None, dw[0] if need_w else None, db[0].to(ctx.bias_dtype) if need_b else None,
            None, None)


dense_student_conv.register_autograd(_student_backward, setup_context=_setup)


def _student_vmap(info, in_dims, x, w, b, stride, padding):
    K = info.batch_size

    def first(t, d):
        if t is None:
            return None
        return t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(K, *t.shape)

    return dense_grouped_conv(first(x, in_dims[0]), first(w, in_dims[1]), first(b, in_dims[2]), stride, padding), 0


dense_student_conv.register_vmap(_student_vmap)


def dense_conv2d(x, w, b, stride, padding):
    """A student's convolution through the ops above (call it under vmap over students, with
    ``torch.autograd`` for gradients: see the module docstring). The bias is added outside the
    op, where inductor fuses the add (and its gradient's sum) with what is around it."""
    y = dense_student_conv(x, w, None, list(stride), list(padding))
    return y if b is None else y + b.view(-1, 1, 1)


@contextlib.contextmanager
def streams(n):
    """Within the block, the ops use ``n`` side streams (tests)."""
    global STREAMS
    old, STREAMS = STREAMS, n
    try:
        yield
    finally:
        STREAMS = old
