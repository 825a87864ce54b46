"""Grouped convolution of K students (fastagg.kernels.grouped_conv, fastagg.ops.grouped_conv)
against float64 PyTorch, and the engine's conv routes against vmap's own rule."""

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vjp, vmap

import fastagg
from fastagg.backends import BackendUnavailable
from fastagg.ops.grouped_conv import grouped_conv2d, grouped_conv2d_reference, route_convs

pytest.importorskip("triton")
from fastagg.kernels import grouped_conv as gck  # noqa: E402

from conftest import cnn, mlp, need_backend  # noqa: E402

# (K, N, C, Co, H, W, (R, S), stride, padding): channel counts above one block (16) and not a
# multiple of it, pixel counts with tails, 1x1 / 3x3 / 5x5 / 3x1 taps, strides 1 and 2
CASES = [
    (2, 2, 3, 5, 7, 6, (3, 3), 1, 1),
    (2, 3, 17, 20, 9, 7, (3, 3), 2, 1),
    (3, 2, 4, 6, 5, 5, (1, 1), 2, 0),
    (2, 2, 5, 18, 8, 8, (5, 5), 1, 2),
    (2, 2, 6, 7, 7, 9, (3, 1), 1, (1, 0)),
    (2, 1, 3, 4, 4, 4, (3, 3), 1, 0),  # output pixels <= one block: the unsplit weight-gradient path
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 operands: compare exact products (on a GPU, tl.dot would otherwise use TF32 as cuDNN does)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shared_input", [False, True])
def test_kernels_match_float64_conv_and_its_gradients(case, shared_input, rng, device):
    K, N, C, CO, H, W, (R, S), stride, padding = case
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(1 if shared_input else K, N, C, H, W, generator=rng).to(device)
    if shared_input:  # one proxy batch for all students: a stride-0 K dimension
        x = x.expand(K, N, C, H, W)
    w = torch.randn(K, CO, C, R, S, generator=rng).to(device)
    b = torch.randn(K, CO, generator=rng).to(device)
    xd, wd, bd = (t.double().cpu().requires_grad_() for t in (x, w, b))
    ref = grouped_conv2d_reference(xd, wd, bd, stride, padding)
    dy = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref.backward(dy)

    y = gck.conv_forward(x, w, b, stride, padding)
    assert y.shape == ref.shape and y.dtype == torch.float32
    dyd = dy.float().to(device)
    dx = gck.conv_backward_data(dyd, w, x.shape, stride, padding)
    dw = gck.conv_backward_weight(dyd, x, w.shape, stride, padding)
    for got, want in ((y, ref), (dx, xd.grad), (dw, wd.grad)):
        got = got.double().cpu()
        if shared_input and want is xd.grad:
            want = want.expand_as(got)  # per-student data gradients, not their sum
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * float(want.abs().max())), \
            float((got - want).abs().max())


def _unfold_conv(x, w, b, stride, padding):
    """Float64 reference from first principles, independent of torch's convolution kernels:
    student k's output is its flattened weights times its unfolded input (F.unfold, im2col)."""
    K, N, C, H, W = x.shape
    _, CO, _, R, S = w.shape
    (sh, sw), (ph, pw) = stride, padding
    cols = F.unfold(x.reshape(K * N, C, H, W), (R, S), padding=(ph, pw), stride=(sh, sw)).view(K, N, C * R * S, -1)
    y = torch.einsum("koc,kncl->knol", w.reshape(K, CO, -1), cols)
    if b is not None:
        y = y + b[:, None, :, None]
    return y.reshape(K, N, CO, (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1)


def test_random_shapes_match_a_float64_unfold_reference(rng, device):
    """Eight shapes drawn afresh at each run (each printed when it fails): 1-33 input and 1-40
    output channels, 1x1 to 5x5 taps, strides 1-3 and paddings 0-2 per dimension, inputs of
    1-12 pixels a side; NCHW or channels-last inputs and outputs, a shared (stride-0) input or
    one per student, with or without bias. The forward, both gradients and, where the output
    has even sides, the fused conv -> relu -> 2x2 max-pool forward, against float64 im2col
    (a draw too slow for the interpreter is drawn again).
    (A 600-second soak of this kind, 857 shapes, found nothing; it did find torch's own float64
    CPU convolution refusing one of them: "slow_conv2d: grad_weight must be contiguous" for a
    1x1 input under a 1x4 kernel, hence the im2col reference.)"""
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    done = 0
    while done < 8:
        K, N = r.randint(1, 3), r.randint(1, 3)
        C, CO = r.choice([1, 2, 3, 5, 16, 17, 33]), r.choice([1, 3, 4, 16, 19, 40])
        R, S = r.randint(1, 5), r.randint(1, 5)
        stride = r.randint(1, 3), r.randint(1, 3)
        padding = r.randint(0, min(2, R - 1)), r.randint(0, min(2, S - 1))
        H, W = r.randint(max(1, R - 2 * padding[0]), 12), r.randint(max(1, S - 2 * padding[1]), 12)
        if K * N * H * W * R * S * -(-C // 16) * -(-CO // 16) > 12000:  # the interpreter's time, bounded
            continue
        shared, cl_in, cl_out, bias = (r.random() < 0.4 for _ in range(4))
        shape = dict(K=K, N=N, C=C, CO=CO, H=H, W=W, R=R, S=S, stride=stride, padding=padding, shared=shared,
                     channels_last_in=cl_in, channels_last_out=cl_out, bias=bias)
        x = torch.randn(1 if shared else K, N, H, W, C, generator=rng).permute(0, 1, 4, 2, 3) if cl_in \
            else torch.randn(1 if shared else K, N, C, H, W, generator=rng)
        x = x.expand(K, N, C, H, W).to(device)
        w = torch.randn(K, CO, C, R, S, generator=rng).to(device)
        b = torch.randn(K, CO, generator=rng).to(device) if bias else None
        xd, wd = x.double().cpu().contiguous().requires_grad_(), w.double().cpu().requires_grad_()
        bd = None if b is None else b.double().cpu()
        ref = _unfold_conv(xd, wd, bd, stride, padding)
        dy = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
        ref.backward(dy)
        dyf = dy.float()
        if cl_out:
            dyf = dyf.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        dyf = dyf.to(device)
        y = gck.conv_forward(x, w, b, stride, padding, channels_last=cl_out)
        dx = gck.conv_backward_data(dyf, w, x.shape, stride, padding, channels_last=cl_out)
        dw = gck.conv_backward_weight(dyf, x, w.shape, stride, padding)
        got = {"forward": (y, ref), "data gradient": (dx, xd.grad), "weight gradient": (dw, wd.grad)}
        if ref.shape[-1] % 2 == 0 and ref.shape[-2] % 2 == 0 and b is not None:
            pooled, _ = gck.conv_relu_pool_forward(x, w, b, stride, padding)
            got["fused forward"] = (pooled, F.max_pool2d(F.relu(ref.detach()).flatten(0, 1), 2).view_as(pooled))
        for what, (t, want) in got.items():
            assert t.shape == want.shape, f"{what}: shape {tuple(t.shape)}, want {tuple(want.shape)}; {shape}"
            err = float((t.double().cpu() - want).abs().max())
            assert err <= 1e-4 * float(want.abs().max()) + 1e-6, f"{what}: error {err:.3g}; {shape}"
        done += 1


class ConvBatchNorm(nn.Module):
    """Two convolutions, then an eval-mode BatchNorm with non-trivial running statistics."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.bn(torch.tanh(self.c2(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("K, N", [(1, 1), (1, 2), (2, 1), (3, 1)])
def test_channels_last_route_before_a_batchnorm_with_one_student_of_one_input(K, N, rng, device):
    """torch 2.13's vmap'd eval-mode batch norm returns a wrong input gradient for a
    channels-last [1, 1, C, H, W] input. A random-model soak found triton_cl's gradients 6-60% off
    for a pass of one student on a one-image proxy set with a BatchNorm after a routed
    convolution; such a pass now stores NCHW. Passes of one, against native, fp32."""
    model, proxy, _ = _net_proxy_students(ConvBatchNorm, (N, 2, 3, 3), K, rng, device)
    model.eval()
    P = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())  # the running stats too
    students = 0.1 * torch.randn(K, P, generator=rng).to(device)
    model.bn.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    model.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    _, want, _ = _engine_grads(model, proxy, students, conv="native", chunk=None)
    _, got, eng = _engine_grads(model, proxy, students, conv="triton_cl", chunk=1)
    assert eng.routes == {1: "triton_cl"} and eng.routed_convs > 0
    assert float((got - want).norm() / want.norm()) < 1e-5


class MixedConvs(nn.Module):
    """A routable convolution followed by an eval-mode BatchNorm, a grouped and a dilated
    convolution (neither rerouted) and a smooth head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(4, 3, 3, padding=2, dilation=2)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c3(torch.tanh(self.c2(self.bn(torch.tanh(self.c1(x))))))).flatten(1))


@pytest.mark.parametrize("conv", ["native", "triton", "torch"])
def test_bf16_routes_run_a_batchnorm_and_convolutions_they_do_not_reroute(conv, rng):
    """On a CPU a routed convolution's operands are cast to bf16 (autocast does not reach a
    convolution under vmap there), so its output meets the next layers in bf16. vmap's batch norm
    refused that with fp32 statistics, and a grouped or dilated convolution (not rerouted) with
    fp32 weights: the bf16 routes raised for such a model (found by a random-model soak). They
    now run, within the stated bf16 tolerance of the fp32 gradients, as the loop route does."""
    from test_correction import BF16_TOLERANCE

    model, proxy, _ = _net_proxy_students(MixedConvs, (6, 2, 5, 5), 3, rng, "cpu")
    model.eval()
    model.bn.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    model.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    P = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    students = 0.1 * torch.randn(3, P, generator=rng)
    _, want, _ = _engine_grads(model, proxy, students, conv="native", chunk=None)
    _, loop16, _ = _engine_grads(model, proxy, students, conv="loop", chunk=None, precision="bf16")
    _, got, eng = _engine_grads(model, proxy, students, conv=conv, chunk=None, precision="bf16")
    assert eng.routes == {3: conv}
    assert float((loop16 - want).norm() / want.norm()) < BF16_TOLERANCE
    assert float((got - want).norm() / want.norm()) < BF16_TOLERANCE
    assert not any("forward" in vars(m) or "_conv_forward" in vars(m) for m in model.modules())  # patches undone


def test_64_bit_offsets_within_a_student_give_the_same_results(rng, device, monkeypatch):
    """Offsets within one student run in 32 bits unless a student's tensor may pass 2^30
    elements (OFF64). Both branches against float64, the 64-bit one forced on small tensors; and
    the switch itself on tensors whose per-student extent is just under and at 2^30."""
    from types import SimpleNamespace

    def fake(shape, stride):
        return SimpleNamespace(shape=shape, stride=lambda: stride)

    assert not gck._off64(fake((3, 1, 1 << 15), (0, 0, 1 << 15)))  # extent (2^15 - 1) * 2^15 < 2^30
    assert gck._off64(fake((3, 2, 1 << 15), (0, 1 << 15, 1 << 15)))  # ... + 2^15 = 2^30
    K, N, C, CO, H, W, (R, S), stride, padding = CASES[1]
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(K, N, C, H, W, generator=rng).to(device)
    w = torch.randn(K, CO, C, R, S, generator=rng).to(device)
    b = torch.randn(K, CO, generator=rng).to(device)
    out = {}
    for off64 in (False, True):
        monkeypatch.setattr(gck, "_off64", lambda *t, v=off64: v)
        y = gck.conv_forward(x, w, b, stride, padding)
        dx = gck.conv_backward_data(torch.ones_like(y), w, x.shape, stride, padding)
        out[off64] = y, dx
    xd, wd, bd = (t.double().cpu().requires_grad_() for t in (x, w, b))
    ref = grouped_conv2d_reference(xd, wd, bd, stride, padding)
    ref.sum().backward()
    for y, dx in out.values():
        for got, want in ((y, ref), (dx, xd.grad)):
            assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("case", [CASES[1], CASES[4]])
def test_channels_last_outputs_and_inputs(case, rng, device):
    """channels_last=True: the same values, stored [K, N, H, W, C]; and the kernels read
    channels-last inputs (what the previous layer then hands over) as well as NCHW ones."""
    K, N, C, CO, H, W, (R, S), stride, padding = case
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(K, N, H, W, C, generator=rng).to(device).permute(0, 1, 4, 2, 3)  # channels-last input
    w = torch.randn(K, CO, C, R, S, generator=rng).to(device)
    xd, wd = (t.double().cpu().requires_grad_() for t in (x, w))
    ref = grouped_conv2d_reference(xd, wd, None, stride, padding)
    dy = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref.backward(dy)
    dy_cl = dy.float().permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).to(device)
    y = gck.conv_forward(x, w, None, stride, padding, channels_last=True)
    dx = gck.conv_backward_data(dy_cl, w, x.shape, stride, padding, channels_last=True)
    dw = gck.conv_backward_weight(dy_cl, x, w.shape, stride, padding)
    for t in (y, dx):
        assert t.stride(2) == 1 and t.permute(0, 1, 3, 4, 2).is_contiguous()
    for got, want in ((y, ref), (dx, xd.grad), (dw, wd.grad)):
        assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def test_bf16_operands_accumulate_in_fp32(rng, device):
    K, N, C, CO, H, W = 2, 3, 19, 17, 6, 7
    x = torch.randn(K, N, C, H, W, generator=rng).to(device, torch.bfloat16)
    w = torch.randn(K, CO, C, 3, 3, generator=rng).to(device, torch.bfloat16)
    xd, wd = (t.double().cpu().requires_grad_() for t in (x, w))
    ref = grouped_conv2d_reference(xd, wd, None, (1, 1), (1, 1))
    dy = torch.randn(ref.shape, generator=rng, dtype=torch.float64).to(torch.bfloat16).double()
    ref.backward(dy)
    y = gck.conv_forward(x, w, None, (1, 1), (1, 1))
    dyd = dy.to(device, torch.bfloat16)
    dx = gck.conv_backward_data(dyd, w, x.shape, (1, 1), (1, 1))
    dw = gck.conv_backward_weight(dyd, x, w.shape, (1, 1), (1, 1))
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    for got, want, tol in ((y, ref, 4e-3), (dx, xd.grad, 4e-3), (dw, wd.grad, 1e-5)):
        # bf16 outputs: one rounding to nearest of an fp32 sum, at most 2^-8 of the largest value
        # (a truncation, which the interpreter does unless the kernel rounds, reaches 2^-7)
        err = float((got.double().cpu() - want).abs().max() / want.abs().max())
        assert err < tol, err


def _students_last(t):
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_rows_weight_gradient_matches_float64(case, rng, device):
    """conv_backward_weight_rows (the dense routes' weight gradient, all students in one launch,
    a program per row of taps) against float64 autograd, in fp32 (x's dtype out) and bf16 (bf16
    out: one rounding of the fp32 sum), into a given ``out`` (contiguous, or stored [K, Co, R, S,
    C] as the dense ops' dw) and a fresh contiguous tensor; the reduction
    split over programs (atomics, then a cast) where the output pixels pass one split's share
    and whole where not (the last case)."""
    K, N, C, CO, H, W, (R, S), stride, padding = case
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(K, N, C, H, W, generator=rng, dtype=torch.float64)
    w = torch.randn(K, CO, C, R, S, generator=rng, dtype=torch.float64)
    dy = torch.randn(grouped_conv2d_reference(x, w, None, stride, padding).shape, generator=rng, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):
        xq, dyq = x.to(dtype), dy.to(dtype)  # the reference from the same rounded operands
        xr, wr = xq.double().requires_grad_(), w.clone().requires_grad_()
        grouped_conv2d_reference(xr, wr, None, stride, padding).backward(dyq.double())
        poisoned = torch.full(w.shape, float("nan"), dtype=dtype, device=device)
        for out in (None, poisoned, _students_last(poisoned)):  # the dense ops' dw is stored [K, Co, R, S, C]
            got = gck.conv_backward_weight_rows(_students_last(dyq.to(device)), _students_last(xq.to(device)),
                                                w.shape, stride, padding, out=out)
            assert got.dtype == dtype and (got.is_contiguous() if out is None else got is out)
            err = float((got.double().cpu() - wr.grad).abs().max() / wr.grad.abs().max())
            assert err < tol, (dtype, err)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_rows_forward_matches_float64(case, rng, device):
    """conv_forward_rows (the dense routes' forward, all students in one launch) against float64,
    fp32 and bf16 (one rounding of the fp32 sum), strides 1 and 2, into a given students-last
    ``out`` (poisoned first) and a fresh one, each stored [K, N, Ho, Wo, Co]."""
    K, N, C, CO, H, W, (R, S), stride, padding = case
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(K, N, C, H, W, generator=rng, dtype=torch.float64)
    w = torch.randn(K, CO, C, R, S, generator=rng, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):
        xq, wq = x.to(dtype), w.to(dtype)
        ref = grouped_conv2d_reference(xq.double(), wq.double(), None, stride, padding)
        poisoned = _students_last(torch.full(ref.shape, float("nan"), dtype=dtype)).to(device)
        for out in (None, poisoned):
            got = gck.conv_forward_rows(_students_last(xq.to(device)), wq.to(device), stride, padding, out=out)
            assert got.dtype == dtype and gck.rows_layout_ok(got) and (out is None or got is out)
            err = float((got.double().cpu() - ref).abs().max() / ref.abs().max())
            assert err < tol, (dtype, err)


@pytest.mark.parametrize("case", [c for c in CASES if c[7] == 1], ids=lambda c: "x".join(map(str, c[:6])))
def test_rows_data_gradient_matches_float64(case, rng, device):
    """conv_backward_data_rows (stride 1: the dense routes' data gradient, all students in one
    launch) against float64 autograd, fp32 and bf16 (one rounding of the fp32 sum), into a given
    students-last ``out`` (poisoned first) and a fresh one, each stored [K, N, H, W, C]."""
    K, N, C, CO, H, W, (R, S), _, padding = case
    padding = _pair(padding)
    x = torch.randn(K, N, C, H, W, generator=rng, dtype=torch.float64)
    w = torch.randn(K, CO, C, R, S, generator=rng, dtype=torch.float64)
    y = grouped_conv2d_reference(x, w, None, (1, 1), padding)
    dy = torch.randn(y.shape, generator=rng, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):
        wq, dyq = w.to(dtype), dy.to(dtype)
        xr = x.clone().requires_grad_()
        grouped_conv2d_reference(xr, wq.double(), None, (1, 1), padding).backward(dyq.double())
        poisoned = _students_last(torch.full(x.shape, float("nan"), dtype=dtype)).to(device)
        for out in (None, poisoned):
            got = gck.conv_backward_data_rows(_students_last(dyq.to(device)), wq.to(device), x.shape, padding, out=out)
            assert got.dtype == dtype and gck.rows_layout_ok(got) and (out is None or got is out)
            err = float((got.double().cpu() - xr.grad).abs().max() / xr.grad.abs().max())
            assert err < tol, (dtype, err)


def test_rows_weight_gradient_refuses_other_layouts_and_shapes(rng, device):
    x = _students_last(torch.randn(2, 2, 4, 6, 6, generator=rng)).to(device)
    dy = _students_last(torch.randn(2, 2, 5, 6, 6, generator=rng)).to(device)
    w_shape = (2, 5, 4, 3, 3)
    with pytest.raises(ValueError, match="must be stored"):
        gck.conv_backward_weight_rows(dy.contiguous(), x, w_shape, (1, 1), (1, 1))  # NCHW per student
    with pytest.raises(ValueError, match="do not fit"):
        gck.conv_backward_weight_rows(dy, x, w_shape, (1, 1), (0, 0))  # the output would be 4x4
    with pytest.raises(ValueError, match=r"must be a \(2, 5, 4, 3, 3\)"):
        gck.conv_backward_weight_rows(dy, x, w_shape, (1, 1), (1, 1), out=torch.empty(2, 5, 3, 3, 4, device=device))
    assert gck.rows_layout_ok(x) and not gck.rows_layout_ok(x.contiguous())
    w = torch.randn(w_shape, generator=rng).to(device)
    with pytest.raises(ValueError, match="must be stored"):
        gck.conv_backward_data_rows(dy.contiguous(), w, x.shape, (1, 1))
    with pytest.raises(ValueError, match="do not fit stride 1"):
        gck.conv_backward_data_rows(dy, w, x.shape, (0, 0))
    with pytest.raises(ValueError, match="must be a"):
        gck.conv_backward_data_rows(dy, w, x.shape, (1, 1), out=x.contiguous())
    with pytest.raises(ValueError, match="x must be stored"):
        gck.conv_forward_rows(x.contiguous(), w, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="must be a"):
        gck.conv_forward_rows(x, w, (1, 1), (1, 1), out=dy.contiguous())


def test_grouped_conv2d_rejects_mismatched_shapes_and_unknown_backends():
    x, w = torch.randn(2, 1, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="do not match"):
        grouped_conv2d(x, w[:1], None, 1, 1)
    with pytest.raises(ValueError, match="do not match"):
        grouped_conv2d(x, w[:, :, :2], None, 1, 1)
    with pytest.raises(BackendUnavailable, match="torch and triton"):
        grouped_conv2d(x, w, None, 1, 1, backend="cpp")
    with pytest.raises(ValueError, match="route must be"):
        with route_convs(nn.Conv2d(3, 4, 3), "cudnn"):
            pass


class Mixed(nn.Module):
    """Routable convolutions (3x3, strided, 1x1) next to ones the kernels do not cover
    (groups=2, dilation=2), which must keep vmap's own rule."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c5 = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        for c in (self.c1, self.c2, self.c3, self.c4, self.c5):
            x = torch.tanh(c(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("backend", ["torch", "triton", "triton_cl"])
def test_route_under_vjp_of_vmap_equals_vmaps_own_rule(backend, rng, device):
    model = Mixed().to(device)
    x = torch.randn(3, 3, 7, 7, generator=rng).to(device)
    params = {n: p.detach() + 0.3 * torch.randn(4, *p.shape, generator=rng).to(device)
              for n, p in model.named_parameters()}
    cot = torch.randn(4, 3, 3, generator=rng).to(device)

    def grads(route):
        f = vmap(lambda p: functional_call(model, p, (x,)))
        ctx = route_convs(model, route) if route else None
        if ctx is None:
            out, pullback = vjp(f, params)
            calls = 0
        else:
            with ctx as routed:
                out, pullback = vjp(f, params)
            calls = routed.calls
        return out, pullback(cot)[0], calls

    out0, g0, _ = grads(None)
    out1, g1, calls = grads(backend)
    # c3 and c5; c1 (input shared by the students: one ordinary conv), the grouped and the
    # dilated layer stay with vmap's rule
    assert calls == 2
    assert torch.allclose(out1, out0, rtol=1e-5, atol=1e-6)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max())), n
    # outside the block the model is untouched
    assert all("_conv_forward" not in m.__dict__ for m in model.modules())


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.relu(self.c1(x)))).flatten(1))


def _engine_grads(model, proxy, students, **kw):
    corr = fastagg.KDCorrection(proxy, schedule=1.0, **kw)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, device=proxy.device, backend="torch")
    teacher = corr.teacher(agg.params, 0)
    loss, g = corr.engine(agg.params + students, teacher.probs)
    return loss, g, corr.engine


def _net_proxy_students(net, proxy_shape, K, rng, device):
    """A seeded ``net``, a random proxy batch and K students near zero (fresh draws from rng)."""
    torch.manual_seed(0)
    model = net().to(device)
    proxy = torch.randn(*proxy_shape, generator=rng).to(device)
    P = sum(p.numel() for p in model.parameters())
    return model, proxy, 0.1 * torch.randn(K, P, generator=rng).to(device)


def test_engine_triton_conv_route_equals_native_fp32_and_bf16_within_tolerance(rng, device):
    from test_correction import BF16_TOLERANCE

    model, proxy, students = _net_proxy_students(TwoConv, (12, 2, 5, 5), 5, rng, device)
    loss0, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=5)
    loss1, g1, eng = _engine_grads(model, proxy, students, conv="triton", chunk=5)
    assert eng.routed_convs == 1 and eng.routes == {5: "triton"}  # c2 (c1 reads the shared proxy batch)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    assert torch.allclose(loss1, loss0, rtol=1e-4, atol=1e-7)  # a KL: cancellation in fp32
    _, g2, eng = _engine_grads(model, proxy, students, conv="triton", precision="bf16", chunk=5)
    assert eng.routed_convs == 1
    assert float((g2 - g0).norm() / g0.norm()) < BF16_TOLERANCE
    _, g3, eng = _engine_grads(model, proxy, students, conv="triton_cl", chunk=5)
    assert eng.routed_convs == 1 and float((g3 - g0).norm() / g0.norm()) < 1e-5


def test_engine_chunks_equal_one_pass_and_auto_is_the_loop_for_convolutions_on_a_cpu(rng):
    model = cnn()
    proxy = torch.randn(12, 2, 5, 5, generator=rng)
    P = sum(p.numel() for p in model.parameters())
    students = 0.1 * torch.randn(7, P, generator=rng)
    loss0, g0, eng0 = _engine_grads(model, proxy, students, chunk=7, conv="native")
    loss1, g1, eng1 = _engine_grads(model, proxy, students, chunk=3, conv="native")  # passes of 3, 3 and 1
    loss2, g2, eng2 = _engine_grads(model, proxy, students)  # CPU + convolutions: one student per pass, loop
    for loss, g in ((loss1, g1), (loss2, g2)):
        assert torch.allclose(g, g0, rtol=1e-5, atol=1e-7) and torch.allclose(loss, loss0, rtol=1e-5)
    assert eng0.routes == {7: "native"} and eng1.routes == {3: "native", 1: "native"}
    assert eng2.chunk == 1 and eng2.routes == {1: "loop"}
    assert eng0.route_timings == {} and eng0.routed_convs == 0
    small = mlp(d_in=50)
    P_mlp = sum(p.numel() for p in small.parameters())
    _, _, eng_mlp = _engine_grads(small, torch.randn(12, 50, generator=rng), torch.randn(3, P_mlp, generator=rng))
    assert eng_mlp.chunk == "auto" and eng_mlp.chunks == {3: 3}  # nothing below 3 to time: one pass
    assert eng_mlp.chunk_timings == {}


class BufferedConv(nn.Module):
    """Convolutions, a batchnorm's buffers (no KD gradient) and a parameter the logits never use.
    Smooth (tanh), so that the stated bf16 tolerance applies: with a ReLU after the batch norm a
    bf16 rounding can flip a unit near 0, and one draw in ~8 went past 3% (README, bf16)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc, self.unused = nn.Linear(3 * 5 * 5, 4), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.c1(x))).flatten(1))


@pytest.mark.parametrize("net", [TwoConv, cnn, BufferedConv])
def test_loop_route_equals_native_and_a_float64_per_client_oracle(net, rng, device):
    """conv="loop" (no vmap; the CPU default for convolutional models): gradients and losses
    equal the native route's in fp32, the per-client float64 autograd oracle's, with zero rows
    for buffers and unused parameters; bf16 within the stated tolerance of fp32."""
    from test_correction import BF16_TOLERANCE

    model, proxy, students = _net_proxy_students(net, (9, 2, 5, 5), 5, rng, device)
    model.eval()
    if net is BufferedConv:
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=rng))
        students = 0.1 * torch.randn(5, sum(t.numel() for t in model.state_dict().values()
                                            if t.is_floating_point()), generator=rng).to(device)
    loss0, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=5)
    loss1, g1, eng = _engine_grads(model, proxy, students, conv="loop", chunk=2)  # passes of 2, 2 and 1
    assert eng.routes == {2: "loop", 1: "loop"}
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5 and torch.allclose(loss1, loss0, rtol=1e-4, atol=1e-7)
    zero = [(off, n) for name, _, off, n in eng.spec.items() if name.startswith(("bn.running", "bn.num", "unused"))]
    assert all(float(g1[:, off:off + n].abs().max()) == 0 for off, n in zero) and (net is not BufferedConv or zero)
    # the oracle: float64, client by client, plain autograd of the explicit KL formula
    m64 = copy.deepcopy(model).double()
    corr = fastagg.KDCorrection(proxy.double(), schedule=1.0, conv="loop", chunk=None)
    agg = fastagg.Aggregator(m64, fastagg.FedBuff(4), correction=corr, backend="torch")
    teacher = corr.teacher(agg.params, 0)
    want = corr._loop_grad(agg.params + students.double(), teacher)
    loss, got = corr.engine(agg.params + students.double(), teacher.probs)
    assert corr.engine.routes == {5: "loop"} and float((got - want).norm() / want.norm()) < 1e-10
    _, g2, _ = _engine_grads(model, proxy, students, conv="loop", precision="bf16", chunk=5)
    assert 0 < float((g2 - g0).norm() / g0.norm()) < BF16_TOLERANCE


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch"])
def test_loop_route_runs_every_cpu_backends_kd_op(backend, rng):
    """The loop hands each student's logits to the KD op of the aggregator's backend, detached
    (numba reads them as numpy arrays, which a tensor that requires grad refuses)."""
    need_backend(backend)
    model, proxy, students = _net_proxy_students(TwoConv, (9, 2, 5, 5), 3, rng, "cpu")
    loss0, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=3)
    corr = fastagg.KDCorrection(proxy, schedule=1.0, conv="loop", chunk=3)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, backend=backend)
    loss, g = corr.engine(agg.params + students, corr.teacher(agg.params, 0).probs)
    assert corr.engine.backend == backend and not loss.requires_grad
    assert float((g - g0).norm() / g0.norm()) < 1e-5 and torch.allclose(loss, loss0, rtol=1e-4, atol=1e-7)


def test_auto_chunk_keeps_the_fastest_pass_size_and_leaves_out_one_that_does_not_fit(rng, monkeypatch):
    """chunk="auto" on a model without convolutions: passes of K = 40 and of 16 are timed per
    student. Passes of 40 are made slow: 16 is kept, and the gradients equal one pass of all 40.
    Then passes of 40 run out of memory: recorded, left out, and nothing of them is kept."""
    import time

    model = mlp(d_in=9)
    proxy = torch.randn(10, 9, generator=rng)
    P = sum(p.numel() for p in model.parameters())
    students = 0.1 * torch.randn(40, P, generator=rng)
    loss0, g0, _ = _engine_grads(model, proxy, students, chunk=None)

    def patched(fail):
        def engine_grads():
            corr = fastagg.KDCorrection(proxy, schedule=1.0)
            agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, backend="torch")
            eng = corr.engine
            step = eng._step

            def step_40(s, p, o):
                if s.shape[0] == 40:
                    if fail:
                        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
                    time.sleep(0.2)
                return step(s, p, o)

            monkeypatch.setattr(eng, "_step", step_40)
            return eng(agg.params + students, corr.teacher(agg.params, 0).probs) + (eng,)
        return engine_grads()

    for fail in (False, True):
        loss, g, eng = patched(fail)
        assert eng.chunks == {40: 16} and set(eng.chunk_timings[40]) == {40, 16}
        assert isinstance(eng.chunk_timings[40][16], float)
        assert torch.allclose(g, g0, rtol=1e-5, atol=1e-7) and torch.allclose(loss, loss0, rtol=1e-5)
        assert set(eng.routes) == ({16, 8} if fail else {40, 16, 8})  # 40 = 16 + 16 + 8
    assert eng.chunk_timings[40][40] == "out of memory"


@pytest.mark.parametrize("kw, msg", [({"conv": "cudnn"}, "conv must be"), ({"chunk": 0}, "chunk must be"),
                                     ({"chunk": "big"}, "chunk must be")])
def test_engine_options_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fastagg.KDCorrection(torch.randn(4, 2, 5, 5), **kw)


def test_compiled_route_equals_the_native_one_and_auto_times_both(rng):
    """compile=True: torch.compile of a plain-op vmap(grad) is one more candidate; on fresh
    inputs it gives the native route's gradients (buffers included: zeros), and auto records
    both timings and keeps one of them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).eval()
    model[1].running_mean.normal_()
    proxy = torch.randn(10, 6, generator=rng)
    P = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    students = 0.2 * torch.randn(3, P, generator=rng)
    loss0, g0, _ = _engine_grads(model, proxy, students, conv="native")
    loss1, g1, eng = _engine_grads(model, proxy, students, compile=True)
    assert set(eng.route_timings[3]) == {"native", "compiled"} and eng.routes[3] in ("native", "compiled")
    eng.routes[3] = "compiled"  # whichever won, check the compiled route's numbers
    teacher_probs = torch.softmax(torch.randn(10, 5, generator=rng), -1)
    base = eng.spec.flatten({k: v for k, v in model.state_dict().items() if v.is_floating_point()})
    lc, gc = eng(base + students, teacher_probs)
    eng.routes[3] = "native"
    ln, gn = eng(base + students, teacher_probs)
    assert float((gc - gn).norm() / gn.norm()) < 1e-5 and torch.allclose(lc, ln, rtol=1e-4, atol=1e-7)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    buffers = [off for name, shape, off, n in eng.spec.items() if "running" in name]
    assert buffers and all(float(gc[:, off:off + 8].abs().max()) == 0 for off in buffers)


def test_compiled_route_in_bf16_within_stated_tolerance_of_fp32(rng):
    from test_correction import BF16_TOLERANCE

    model = cnn()
    proxy = torch.randn(16, 2, 5, 5, generator=rng)
    P = sum(p.numel() for p in model.parameters())
    students = 0.1 * torch.randn(4, P, generator=rng)
    _, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=4)
    corr = fastagg.KDCorrection(proxy, schedule=1.0, conv="native", chunk=4, compile=True, precision="bf16")
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, backend="torch")
    corr.engine.routes[4] = "compiled"  # skip the timing: this test is about the compiled numbers
    _, g1 = corr.engine(agg.params + students, corr.teacher(agg.params, 0).probs)
    err = float((g1 - g0).norm() / g0.norm())
    assert 0 < err < BF16_TOLERANCE


def test_a_failing_candidate_route_is_reported_and_left_out(rng, monkeypatch):
    model = mlp(d_in=6)
    proxy = torch.randn(8, 6, generator=rng)
    P = sum(p.numel() for p in model.parameters())
    corr = fastagg.KDCorrection(proxy, schedule=1.0, compile=True)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, backend="torch")

    def cannot_trace(*a, **k):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(corr.engine, "_compiled_step", cannot_trace)
    students = agg.params + 0.1 * torch.randn(2, P, generator=rng)
    with pytest.warns(RuntimeWarning, match="compiled route failed"):
        _, g = corr.engine(students, corr.teacher(agg.params, 0).probs)
    assert corr.engine.routes == {2: "native"}
    assert corr.engine.route_timings[2]["compiled"].startswith("failed: RuntimeError: cannot trace")
    ref = corr._loop_grad(students, corr.teacher(agg.params, 0))
    assert float((g - ref).norm() / ref.norm()) < 1e-5


def test_routes_are_timed_the_way_they_run_and_the_losers_graphs_are_freed(rng, monkeypatch):
    """With CUDA graphs on, each candidate is timed through capture and replay (not eagerly), a
    candidate's graph is freed as soon as it has lost (at most two held at once), and only the
    winner's stays. The capture is stood in for here (a CPU has none): ``_replay`` records which
    route it ran and files a graph under the engine's key."""
    import time

    model = TwoConv()
    proxy = torch.randn(6, 2, 5, 5, generator=rng)
    P = sum(p.numel() for p in model.parameters())
    corr = fastagg.KDCorrection(proxy, schedule=1.0, chunk=3)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, backend="torch")
    eng = corr.engine
    eng.cuda_graphs = True
    monkeypatch.setattr(eng, "_candidates", lambda students: ["native", "torch", "loop"])
    replayed, held = [], []
    step = eng._step

    def replay(students, probs, out, own=False):
        K = students.shape[0]
        replayed.append(eng.routes[K])
        eng._graphs.setdefault((K, tuple(probs.shape), eng.routes[K], own), "graph")
        held.append(len(eng._graphs))
        return eng._step(students, probs, out)  # looked up now: slow_torch_route below

    def slow_torch_route(students, probs, out):
        if eng.routes[students.shape[0]] in ("torch", "loop"):
            time.sleep(0.25)  # far beyond a pass of this net, even on a loaded machine
        return step(students, probs, out)

    monkeypatch.setattr(eng, "_replay", replay)
    monkeypatch.setattr(eng, "_step", slow_torch_route)
    students = agg.params + 0.1 * torch.randn(6, P, generator=rng)
    probs = corr.teacher(agg.params, 0).probs
    eng(students, probs)
    # route choice: one warm-up and three timed passes per candidate, all through _replay;
    # then the two passes of 3 students of this call through the winner
    assert replayed == ["native"] * 4 + ["torch"] * 4 + ["loop"] * 4 + ["native"] * 2
    assert eng.routes == {3: "native"} and set(eng.route_timings[3]) == {"native", "torch", "loop"}
    assert max(held) == 2  # torch's graph went before loop's was captured
    assert list(eng._graphs) == [(3, tuple(probs.shape), "native", False)]


def test_student_conv_outside_vmap_is_plain_conv2d_with_its_gradients(rng):
    """The routed op called on one student's plain tensors (no vmap) is F.conv2d, gradients too."""
    from fastagg.ops.grouped_conv import RouteCounter, _StudentConv

    x = torch.randn(3, 4, 7, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=rng, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 4, 3, generator=rng, dtype=torch.float64)
    y = _StudentConv.apply(x, w, b, (2, 2), (1, 1), torch.float64, "triton", RouteCounter())
    grads = torch.autograd.grad(y, (x, w, b), dy)
    y_ref = F.conv2d(x, w, b, 2, 1)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, grads_ref):
        assert g.dtype == r.dtype and torch.allclose(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("conv", ["triton", "triton_cl", "loop", "auto"])
def test_cuda_graph_replay_of_each_route_equals_eager_native(conv, rng):
    """On a GPU: the captured and replayed engine, through each conv route (auto: whichever it
    timed fastest, compiled included), gives the eager native route's gradients in bf16."""
    from test_correction import BF16_TOLERANCE

    torch.manual_seed(0)
    model = TwoConv().cuda()
    proxy = torch.randn(64, 2, 5, 5, generator=rng).cuda()
    P = sum(p.numel() for p in model.parameters())
    students = 0.1 * torch.randn(16, P, generator=rng).cuda()
    _, g0, _ = _engine_grads(model, proxy, students, conv="native")
    corr = fastagg.KDCorrection(proxy, schedule=1.0, conv=conv, precision="bf16", cuda_graphs=True,
                                compile=conv == "auto")
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), correction=corr, device="cuda")
    probs = corr.teacher(agg.params, 0).probs
    corr.engine(agg.params + students, probs)  # route choice, capture
    _, g1 = corr.engine(agg.params + students, probs)  # replay
    assert corr.engine._graphs or corr.engine.routes[16] == "compiled"
    assert float((g1 - g0).norm() / g0.norm()) < BF16_TOLERANCE, corr.engine.route_timings


# -- conv -> relu -> 2x2 max-pool, fused ------------------------------------------------------
# (K, N, C, Co, H, W, (R, S), stride, padding): even-sized convolution outputs (8x6, 8x8, 6x6,
# and 4x4: fewer pixels than one tile), channels across a block edge, strides 1 and 2
FUSED_CASES = [
    (2, 3, 5, 6, 8, 8, (3, 3), 1, (1, 0)),
    (3, 2, 4, 17, 8, 8, (5, 5), 1, 2),
    (2, 2, 3, 5, 11, 11, (3, 3), 2, 1),
    (2, 1, 19, 4, 6, 6, (3, 3), 1, 0),
]


class PoolNet(nn.Module):
    """Two conv -> relu -> 2x2 max-pool chains written two ways (functional; modules and a method
    call), then a linear layer."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = self.pool(self.c2(x).relu())
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("shared_input", [False, True])
def test_fused_conv_relu_pool_kernels_match_float64(case, shared_input, rng, device):
    """The epilogue's pooled values and window codes against float64 conv, relu and max-pool
    (codes compared where the window's two largest values differ by more than rounding), and the
    gradient rebuilt at the convolution's output against autograd of relu and max-pool."""
    from fastagg.ops.grouped_conv import conv_relu_pool_reference, unpool_relu_reference

    K, N, C, CO, H, W, (R, S), stride, padding = case
    stride, padding = _pair(stride), _pair(padding)
    x = torch.randn(1 if shared_input else K, N, C, H, W, generator=rng).to(device)
    x = x.expand(K, N, C, H, W) if shared_input else x
    w = torch.randn(K, CO, C, R, S, generator=rng).to(device)
    b = torch.randn(K, CO, generator=rng).to(device)
    y, code = gck.conv_relu_pool_forward(x, w, b, stride, padding)
    xd, wd, bd = (t.double().cpu() for t in (x, w, b))
    y_ref, code_ref = conv_relu_pool_reference(xd, wd, bd, stride, padding)
    assert y.shape == y_ref.shape and code.dtype == torch.int8
    assert torch.allclose(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-4 * float(y_ref.abs().max()))
    z = F.relu(grouped_conv2d_reference(xd, wd, bd, stride, padding))
    windows = z.unfold(-2, 2, 2).unfold(-2, 2, 2).reshape(*y_ref.shape, 4).sort(-1, descending=True).values
    clear = (windows[..., 0] - windows[..., 1] > 1e-3) | (windows[..., 0] == 0)
    assert bool((code.cpu() == code_ref)[clear].all()) and float(clear.double().mean()) > 0.9
    assert torch.equal(code.cpu() == -1, y.cpu() == 0)  # windows that relu zeroed: no gradient

    zd = grouped_conv2d_reference(xd, wd, bd, stride, padding).requires_grad_()
    out = F.max_pool2d(F.relu(zd.flatten(0, 1)), 2).view_as(y_ref)
    dp = torch.randn(y_ref.shape, generator=rng, dtype=torch.float64)
    (dz_ref,) = torch.autograd.grad(out, zd, dp)
    dz = gck.unpool_relu(dp.float().to(device), code_ref.to(device), *zd.shape[-2:])
    assert torch.equal(dz.cpu(), unpool_relu_reference(dp.float(), code_ref, *zd.shape[-2:]))
    assert torch.allclose(dz.double().cpu(), dz_ref, rtol=1e-6, atol=1e-6)


def test_fusion_finds_the_chains_and_changes_nothing_outside_the_routes(rng):
    from fastagg.bench import CifarCNN, CifarCNN4, ResNet18NoBN
    from fastagg.ops.grouped_conv import fuse_conv_relu_pool

    x = torch.randn(2, 3, 32, 32, generator=rng)
    for model, chains in ((CifarCNN(), 2), (CifarCNN4(), 3), (ResNet18NoBN(), 0)):
        gm, n = fuse_conv_relu_pool(model)
        assert n == chains and torch.equal(gm(x), model(x))
        assert dict(gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    gm, n = fuse_conv_relu_pool(PoolNet())
    assert n == 2

    class NotChains(nn.Module):  # conv output used twice; a pool of stride 1; a 3x3 pool
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.c1(x)
            y = F.max_pool2d(F.relu(y), 2) + F.max_pool2d(y, 2)
            y = F.max_pool2d(F.relu(self.c2(y)), 2, stride=1)
            return F.max_pool2d(F.relu(self.c3(y)), 3)

    assert fuse_conv_relu_pool(NotChains())[1] == 0

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x

    assert fuse_conv_relu_pool(Untraceable()) == (None, 0)


@pytest.mark.parametrize("conv", ["torch_fused", "triton_fused"])
def test_engine_fused_route_equals_native_in_fp32_and_its_reference_in_bf16(conv, rng, device):
    """Both chains of PoolNet run as fused ops under vjp(vmap(...)) (the first on the proxy batch
    shared by all students); in fp32 gradients and losses equal vmap's own convolutions. In bf16
    the kernels equal the plain-PyTorch reference of the same numerics (bf16 operands, fp32
    convolution, relu and pooling, bf16 output; 1e-2, where 20 draws through the interpreter
    measured 0.08-0.14%: before the kernels rounded their bf16 stores under the interpreter, its
    truncation moved max-pool windows and 2 of 20 draws exceeded 5%). Against fp32, true bf16
    convolutions before a max-pool move some windows' maxima: over 40 draws of this net the reference route
    differed from fp32 by 1.7% (median), 5.1% (90th percentile), 8.8% (max) — not a rounding
    error of the kernels; vmap's own convolutions stay fp32 under autocast, so native is no
    bf16 baseline here."""
    model, proxy, students = _net_proxy_students(PoolNet, (6, 2, 8, 8), 3, rng, device)
    loss0, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=3)
    loss1, g1, eng = _engine_grads(model, proxy, students, conv=conv, chunk=3)
    assert eng.fused_model()[1] == 2 and eng.routed_convs == 2 and eng.routes == {3: conv}
    # the KD loss is a difference of terms of size ~1 (xlogy(p, p) - p log q): compare it absolutely
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    assert torch.allclose(loss1, loss0, rtol=0, atol=1e-6)
    _, g2, _ = _engine_grads(model, proxy, students, conv=conv, chunk=3, precision="bf16")
    _, g3, _ = _engine_grads(model, proxy, students, conv="torch_fused", chunk=3, precision="bf16")
    tol = 0 if conv == "torch_fused" else 1e-2
    assert float((g2 - g3).norm() / g3.norm()) <= tol
    assert 0 < float((g2 - g0).norm() / g0.norm()) < 0.2  # bf16 ran, and is no garbage


def test_fused_chain_with_an_odd_sized_output_runs_unfused(rng):
    """A chain whose convolution output is odd-sized (the pool drops a row) stays three ops."""
    model = PoolNet()
    proxy = torch.randn(4, 2, 9, 9, generator=rng)  # c1: 9x9, odd
    P = sum(p.numel() for p in model.parameters())
    students = 0.1 * torch.randn(2, P, generator=rng)
    _, g0, _ = _engine_grads(model, proxy, students, conv="native", chunk=2)
    _, g1, eng = _engine_grads(model, proxy, students, conv="torch_fused", chunk=2)
    assert eng.routed_convs == 1  # c2 (4x4) only
    assert float((g1 - g0).norm() / g0.norm()) < 1e-6


def test_student_conv_relu_pool_outside_vmap_matches_the_three_ops(rng):
    from fastagg.ops.grouped_conv import RouteCounter, _StudentConvReluPool

    x = torch.randn(3, 4, 8, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=rng, dtype=torch.float64, requires_grad=True)
    y, code = _StudentConvReluPool.apply(x, w, b, (1, 1), (1, 1), torch.float64, "triton", RouteCounter())
    y_ref = F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), 2)
    dy = torch.randn(y_ref.shape, generator=rng, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    assert torch.equal(y, y_ref) and code.dtype == torch.int8
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-10)


def test_native_route_casts_the_convolutions_that_autocast_misses_under_vmap(rng):
    """torch.autocast does not reach a convolution under vmap (it runs in fp32): the engine's
    convolution routes cast its operands themselves, so "bf16" means bf16 convolutions too."""
    model = TwoConv()
    params = {k: v.detach().unsqueeze(0).expand(3, *v.shape).clone() for k, v in model.named_parameters()}
    x = torch.randn(4, 2, 5, 5, generator=rng)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vmap(lambda p: functional_call(model.c2, {"weight": p["c2.weight"], "bias": p["c2.bias"]},
                                                  (functional_call(model.c1, {"weight": p["c1.weight"],
                                                                              "bias": p["c1.bias"]}, (x,)),)))(params)

    assert run().dtype == torch.float32  # torch's behaviour, which the route corrects
    with route_convs(model, "native") as counter:
        assert run().dtype == torch.bfloat16
    assert counter.calls == 0  # cast, not grouped
