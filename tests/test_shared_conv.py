"""The gemm route's shared-input convolution (fastagg.ops.shared_conv) against float64
F.conv2d, student by student: values and the gradients that torch.func's vjp of a vmap gives;
and the engine's "gemm" route against its "native" route."""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec
from fastagg.ops.shared_conv import conv2d_as_product, shared_conv2d, shared_input_convs

@contextlib.contextmanager
def _no_tf32():
    """fp32 convolutions and products without TF32 (exact comparisons on a GPU)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _engine_case(net, N, side, K, rng, device):
    """(model, spec, proxy [N, 3, side, side], K students near the model, teacher probabilities):
    a freshly seeded ``net`` and fresh draws from rng."""
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    model = net().to(device)
    spec = ParamSpec.from_module(model)
    proxy = torch.randn(N, 3, side, side, generator=rng).to(device)
    students = spec.flatten(model.state_dict()).to(device) + 0.05 * torch.randn(K, spec.numel, generator=rng).to(device)
    probs = torch.softmax(torch.randn(N, 7, generator=rng), -1).to(device)
    return model, spec, proxy, students, probs


def _spy_kernels(monkeypatch):
    """The list that records each call of the two shared-chain kernels, by name."""
    from fastagg.kernels import shared_conv as kern

    calls = []
    for name in ("shared_conv_relu_pool_forward", "shared_conv_relu_pool_wgrad"):
        monkeypatch.setattr(kern, name, lambda *a, f=getattr(kern, name), name=name, **k: calls.append(name) or f(*a, **k))
    return calls


GEOMETRIES = [  # (K, N, C, H, W, Co, R, S, stride, padding)
    (3, 2, 3, 7, 6, 4, 3, 2, (2, 1), (1, 0)),
    (1, 3, 1, 5, 5, 2, 5, 5, (1, 1), (2, 2)),
    (4, 1, 2, 9, 4, 3, 1, 3, (3, 2), (0, 1)),
]


def _reference(x, w, b, stride, padding):
    """Each student's own F.conv2d in float64: [K, N, Co, Ho, Wo]."""
    return torch.stack([F.conv2d(x.double(), w[k].double(), None if b is None else b[k].double(), stride, padding)
                        for k in range(w.shape[0])])


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"K{g[0]}-{g[6]}x{g[7]}-s{g[8][0]}{g[8][1]}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("op", [shared_conv2d, conv2d_as_product], ids=["gemm_op", "plain_product"])
def test_vjp_of_vmap_over_students_equals_float64_conv(geo, bias, op, rng):
    K, N, C, H, W, CO, R, S, stride, padding = geo
    x = torch.randn(N, C, H, W, dtype=torch.float64, generator=rng)
    w = torch.randn(K, CO, C, R, S, dtype=torch.float64, generator=rng)
    b = torch.randn(K, CO, dtype=torch.float64, generator=rng) if bias else None
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    ref = _reference(xr, wr, br, stride, padding)
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=rng)
    ref_grads = torch.autograd.grad(ref, [t for t in (xr, wr, br) if t is not None], dy)

    def students(xx, ww, *bb):  # x is shared: not batched
        return torch.func.vmap(lambda w1, *b1: op(xx, w1, b1[0] if bias else None, stride, padding))(ww, *bb)

    out, pullback = torch.func.vjp(students, x, w, *([b] if bias else []))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dx, dw, *db = pullback(dy)
    torch.testing.assert_close(dx, ref_grads[0], rtol=1e-12, atol=1e-12)  # summed over the students
    torch.testing.assert_close(dw, ref_grads[1], rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(db[0], ref_grads[2], rtol=1e-12, atol=1e-12)


def test_one_student_and_a_batched_input_fall_back_to_plain_convolution(rng):
    K, N, C, H, W, CO, R = 3, 2, 2, 6, 5, 3, 3
    x = torch.randn(K, N, C, H, W, dtype=torch.float64, generator=rng)
    w = torch.randn(K, CO, C, R, R, dtype=torch.float64, generator=rng, requires_grad=True)
    b = torch.randn(K, CO, dtype=torch.float64, generator=rng)
    out = torch.func.vmap(lambda xx, ww, bb: shared_conv2d(xx, ww, bb, (1, 2), (1, 1)))(x, w, b)
    ref = torch.stack([F.conv2d(x[k], w[k], b[k], (1, 2), (1, 1)) for k in range(K)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    one = shared_conv2d(x[0], w[0], b[0], (1, 2), (1, 1))  # outside vmap: F.conv2d and its gradients
    (g,) = torch.autograd.grad(one.square().sum(), w)
    (g_ref,) = torch.autograd.grad(F.conv2d(x[0], w[0], b[0], (1, 2), (1, 1)).square().sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


class _Net(torch.nn.Module):
    """c1 on the shared proxy batch as a conv -> relu -> 2x2 max-pool chain, then c2 and a head.
    ``tail``: "relu" (c2 with stride 2, relu); "tanh" (the same, smooth: in bf16 a route's rounding
    then moves no ReLU or max-pool window after the chain; with the ReLU, 3 of 41 draws of the
    gemm_fused bf16 comparison below went past 2%, up to 5.1%, against a 0.29% median); "pool"
    (c2 with padding 1, relu, pool: a second chain, on a per-student input)."""

    def __init__(self, tail="relu"):
        super().__init__()
        self.tail = tail
        self.c1 = torch.nn.Conv2d(3, 6, 5, padding=2)
        self.c2 = torch.nn.Conv2d(6, 5, 3, padding=1) if tail == "pool" else torch.nn.Conv2d(6, 5, 3, stride=2)
        self.fc = torch.nn.Linear(5 * 3 * 3, 7)

    def forward(self, x):
        y = self.c2(F.max_pool2d(torch.relu(self.c1(x)), 2))
        if self.tail == "pool":
            y = F.max_pool2d(torch.relu(y), 2)
        else:
            y = torch.tanh(y) if self.tail == "tanh" else torch.relu(y)
        return self.fc(y.flatten(1))


_CNN = _Net
_ChainThenSmooth = functools.partial(_Net, "tanh")
_TwoChains = functools.partial(_Net, "pool")


def test_shared_input_convs_are_the_layers_that_read_the_input():
    model = _CNN()
    assert shared_input_convs(model, torch.randn(2, 3, 14, 14)) == [model.c1]
    assert model.training  # left as it was
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 3))
    before = bn[0].running_mean.clone()
    assert shared_input_convs(bn, torch.randn(4, 3, 5, 5) + 3.0) == []  # reads the normalized input, not x
    assert torch.equal(bn[0].running_mean, before)  # the detection forward moved no statistics


@pytest.mark.parametrize("route", ["gemm", "compiled_gemm"])
def test_engine_gemm_routes_equal_native(route, device, rng):
    """fp32, TF32 off: the same KD gradients for K students as vmap's own convolutions (the
    compiled route through torch.compile, its first layer as one product per student)."""
    model, spec, proxy, students, probs = _engine_case(_CNN, 9, 14, 5, rng, device)
    out = {}
    with _no_tf32():
        for name in ("native", route):
            eng = StudentGradEngine(model, spec, proxy, 3.0, conv="native" if name == "native" else "gemm", chunk=None,
                                    compile=name == "compiled_gemm")
            if name == "compiled_gemm":
                eng.routes[students.shape[0]] = name  # this route, untimed
            loss, grads = eng(students, probs)
            out[name] = (loss, grads.clone(), eng.routed_convs + eng.product_convs)
    assert out[route][2] == 1 and out["native"][2] == 0  # the first layer, and only it, went the gemm way
    torch.testing.assert_close(out[route][0], out["native"][0], rtol=1e-5, atol=1e-7)
    err = float((out[route][1] - out["native"][1]).norm() / out["native"][1].norm())
    assert err < 1e-5


# -- conv -> relu -> 2x2 max-pool on the shared input: fastagg.kernels.shared_conv -------------
# (N, C, H, W, KCo, R, S, stride, padding), even-sized convolution outputs: cnn's first layer
# made small (C*R*S = 75: several reduction blocks and a tail), one input channel, stride 2,
# and fewer pixels than one tile; output channels across block edges
CHAIN_GEOMETRIES = [
    (3, 3, 10, 10, 40, 5, 5, (1, 1), (2, 2)),
    (2, 1, 8, 8, 17, 3, 3, (1, 1), (1, 0)),
    (2, 2, 11, 11, 21, 3, 3, (2, 2), (1, 1)),
    (1, 3, 4, 4, 5, 3, 1, (1, 1), (1, 0)),
]


def _chain_ref(x, w, b, stride, padding):
    """float64 conv, relu, 2x2 max-pool of [N, C, H, W] with [KCo, C, R, S]: (pooled, conv output)."""
    z = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    return F.max_pool2d(F.relu(z), 2), z


def _poison_empty(monkeypatch):
    """torch.empty fills what it allocates (NaN, int8 7: no window code) until undone, so that an
    output element a kernel skips shows."""
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(7) if t.dtype == torch.int8 else t

    monkeypatch.setattr(torch, "empty", poisoned)
    return lambda: monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unpool_chain_writes_each_windows_gradient_at_its_code(channels_last, dtype, rng, device, monkeypatch):
    """The unpool method's kernel: every element of dz written (poisoned first), dp at each
    window's code and 0 elsewhere (-1: relu zeroed the window), exactly as the reference; the
    pooled gradient a [N, K, Co, h, w] view of a [K, N, Co, h, w] tensor (the students' layout
    under vmap); tails in windows (N*h*w = 3*3*5, blocks of 16) and channels (K*Co = 21); the bias
    gradient the fp32 sum of the kept dp per channel."""
    pytest.importorskip("triton")
    from fastagg.kernels.shared_conv import unpool_chain
    from fastagg.ops.grouped_conv import unpool_relu_reference

    N, K, CO, h, w = 3, 3, 7, 3, 5
    dpk = torch.randn(K, N, CO, h, w, generator=rng).to(dtype)
    code = torch.randint(-1, 4, (N, K * CO, h, w), generator=rng, dtype=torch.int8)
    dp5 = dpk.to(device).movedim(0, 1)
    undo = _poison_empty(monkeypatch)
    dz, db = unpool_chain(dp5, code.to(device), channels_last, bias=True)
    undo()
    ref = unpool_relu_reference(dpk.movedim(0, 1).reshape(N, K * CO, h, w).double(), code, 2 * h, 2 * w)
    assert dz.dtype == dtype and dz.is_contiguous(memory_format=torch.channels_last if channels_last
                                                    else torch.contiguous_format)
    assert torch.equal(dz.double().cpu(), ref)
    kept = torch.where(code >= 0, dpk.movedim(0, 1).reshape(N, K * CO, h, w).double(), 0.0)
    torch.testing.assert_close(db.double().cpu(), kept.sum((0, 2, 3)), rtol=1e-6, atol=1e-6)
    dz2, none = unpool_chain(dp5, code.to(device), channels_last, bias=False)
    assert none is None and torch.equal(dz2, dz)


# the forward's three kernels ride along with the weight gradient's three methods (each pair on
# every geometry and dtype; the engine's tests run the forward's CPU default, resident, on many more)
@pytest.mark.parametrize("method,fwd", [("kernel", "tile"), ("unpool", "resident"), ("columns", "columns")],
                         ids=["kernel", "unpool", "columns"])
@pytest.mark.parametrize("geo", CHAIN_GEOMETRIES, ids=lambda g: f"C{g[1]}-{g[5]}x{g[6]}-s{g[7][0]}-KCo{g[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shared_chain_kernels_match_float64(geo, dtype, method, fwd, rng, device, monkeypatch):
    """Forward (by the ``fwd`` kernel, its outputs poisoned first): pooled values against float64
    conv, relu and pool of the same (rounded) operands,
    window codes where the window's two largest values differ by more than rounding. Weight and
    bias gradients, by either method, from a pooled gradient with other strides than the
    forward's output (a view, here channels-last) against float64 autograd through relu and pool
    with the kernel's own codes: within fp32 rounding, except the unpool method's bf16 dw, which
    cuDNN returns in bf16 (one rounding, 2^-9 relative at most; the bound allows 2^-8 for how a
    GPU library sums in bf16)."""
    pytest.importorskip("triton")
    from fastagg.kernels.shared_conv import shared_conv_relu_pool_forward, shared_conv_relu_pool_wgrad
    from fastagg.ops.grouped_conv import unpool_relu_reference

    N, C, H, W, KCO, R, S, stride, padding = geo
    bias = KCO != 21  # one geometry without a bias
    x = torch.randn(N, C, H, W, generator=rng).to(dtype)
    w = torch.randn(KCO, C, R, S, generator=rng).to(dtype)
    b = torch.randn(KCO, generator=rng) if bias else None
    with _no_tf32():
        undo = _poison_empty(monkeypatch)
        keep = {}
        y, code = shared_conv_relu_pool_forward(x.to(device), w.to(device), None if b is None else b.to(device),
                                                stride, padding, method=fwd, keep=keep)
        assert ("columns" in keep) == (fwd == "columns")
        y_cl, code_cl = shared_conv_relu_pool_forward(x.to(device), w.to(device), None if b is None else b.to(device),
                                                      stride, padding, channels_last=True, method=fwd)
        undo()
        ref, z = _chain_ref(x, w, b, stride, padding)
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the stored pooled value's rounding
        assert y.dtype == dtype and code.dtype == torch.int8 and y.shape == ref.shape
        assert torch.allclose(y.double().cpu(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
        windows = F.relu(z).unfold(-2, 2, 2).unfold(-2, 2, 2).reshape(*ref.shape, 4).sort(-1, descending=True).values
        clear = (windows[..., 0] - windows[..., 1] > 1e-3) | (windows[..., 0] == 0)
        q = torch.arange(4).view(1, 1, 1, 1, 4)
        argmax = torch.where(windows[..., 0] > 0, (F.relu(z).unfold(-2, 2, 2).unfold(-2, 2, 2).reshape(*ref.shape, 4)
                                                  == windows[..., :1]).long().mul(4 - q).argmax(-1), -1)
        assert bool((code.cpu().long() == argmax)[clear].all()) and float(clear.double().mean()) > 0.9
        assert torch.equal(code.cpu() == -1, y.cpu() == 0)
        assert y_cl.is_contiguous(memory_format=torch.channels_last) and code_cl.is_contiguous()
        assert torch.equal(y_cl, y) and torch.equal(code_cl, code)  # the same values, stored channels-last
        K = next(k for k in (4, 3, 2, 1) if KCO % k == 0)  # students: each one's channels stored apart
        undo = _poison_empty(monkeypatch)
        y_ps, code_ps = shared_conv_relu_pool_forward(x.to(device), w.to(device), None if b is None else b.to(device),
                                                      stride, padding, method=fwd, students=K)
        undo()
        assert y_ps.shape == (N, K, KCO // K, *y.shape[2:]) and y_ps.permute(1, 0, 3, 4, 2).is_contiguous()
        assert torch.equal(y_ps, y.view(y_ps.shape)) and torch.equal(code_ps, code)
        if fwd == "columns":  # the kernel's other way (FOUR: the four positions' products side by side)
            import triton
            from fastagg.kernels import shared_conv as kern
            tuner = kern._shared_fwd_relu_pool_columns
            configs, cache = tuner.configs, tuner.cache
            tuner.configs, tuner.cache = [triton.Config({"BP": 16, "BN": 16, "BK": 16, "FOUR": True}, num_warps=4)], {}
            try:
                y4, code4 = shared_conv_relu_pool_forward(x.to(device), w.to(device),
                                                          None if b is None else b.to(device), stride, padding,
                                                          method=fwd, students=K)
            finally:
                tuner.configs, tuner.cache = configs, cache
            assert torch.equal(y4, y_ps) and torch.equal(code4, code)  # the same sums, in the same order
        with pytest.raises(ValueError, match="do not split into"):
            shared_conv_relu_pool_forward(x.to(device), w.to(device), None, stride, padding, students=KCO + 1)

        # the pooled gradient with other strides than the forward's output (channels-last here)
        dp = torch.randn(N, *ref.shape[-2:], KCO, generator=rng).to(dtype).permute(0, 3, 1, 2)
        assert dp.shape == ref.shape and (KCO == 1 or not dp.is_contiguous())
        dw, db = shared_conv_relu_pool_wgrad(x.to(device), dp.to(device), code, w.shape, stride, padding, bias=bias,
                                             method=method)
        if method == "columns":  # the forward's columns reused: the same sums
            dw_kept, db_kept = shared_conv_relu_pool_wgrad(x.to(device), dp.to(device), code, w.shape, stride,
                                                           padding, bias=bias, method=method,
                                                           columns=keep["columns"])
            assert torch.equal(dw_kept, dw) and (db is None or torch.equal(db_kept, db))
        dz = unpool_relu_reference(dp.double(), code.cpu(), *z.shape[-2:])
        dw_ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dz, stride, padding)
        assert dw.dtype == torch.float32 and dw.shape == w.shape
        rounded = method == "unpool" and dtype == torch.bfloat16
        assert float((dw.double().cpu() - dw_ref).norm() / dw_ref.norm()) < (2 ** -8 if rounded else 1e-5)
        if bias:
            torch.testing.assert_close(db.double().cpu(), dz.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
        else:
            assert db is None
        if KCO % 5 == 0:  # the same gradient as the students' view [N, K, Co, ...] of a [K, N, Co, ...] tensor
            K = 5
            dpk = dp.reshape(N, K, KCO // K, *dp.shape[-2:]).movedim(1, 0).contiguous()
            dw5, db5 = shared_conv_relu_pool_wgrad(x.to(device), dpk.movedim(0, 1).to(device), code, w.shape,
                                                   stride, padding, bias=bias, method=method)
            if method in ("kernel", "columns"):
                assert torch.equal(dw5, dw) and (db5 is None or torch.equal(db5, db))
            else:  # the same dz into cuDNN, whose weight gradient may sum in another order
                torch.testing.assert_close(dw5, dw, rtol=1e-5, atol=1e-5 * float(dw.abs().max()))
                if bias:
                    torch.testing.assert_close(db5, db, rtol=1e-5, atol=1e-5)


def test_shared_chain_weight_gradient_auto_times_each_method_once_on_a_gpu(rng, device, monkeypatch):
    """method="auto": on a GPU the three methods timed once for a shape, the fastest kept (its
    result is that method's) and timed no more; on a CPU the kernel, untimed."""
    pytest.importorskip("triton")
    from fastagg.kernels import shared_conv as kern

    monkeypatch.setattr(kern, "wgrad_choices", {})  # nothing timed before in this process
    x = torch.randn(3, 2, 10, 6, generator=rng).to(device)
    w = torch.randn(10, 2, 3, 3, generator=rng).to(device)
    y, code = kern.shared_conv_relu_pool_forward(x, w, None, (1, 1), (1, 1))
    dp = torch.randn(y.shape, generator=rng).to(device)
    dw, db = kern.shared_conv_relu_pool_wgrad(x, dp, code, w.shape, (1, 1), (1, 1), method="auto")
    new = dict(kern.wgrad_choices)
    if device.type != "cuda":
        assert not new
        chosen = "kernel"
    else:
        ((key, timed),) = new.items()
        assert key[0] == x.device and all(timed[m] > 0 for m in kern.WGRAD_METHODS)
        chosen = timed["chosen"]
        assert timed[chosen] == min(timed[m] for m in kern.WGRAD_METHODS)

        def unpool_out_of_memory(method):  # a method out of memory is never kept
            if method == "unpool":
                raise torch.cuda.OutOfMemoryError("dz does not fit")
            return kern._WGRAD_RUN[method](x, dp.unsqueeze(1), code, tuple(w.shape), (1, 1), (1, 1), True)

        oom_key = (x.device, "an out-of-memory case")
        try:
            got = kern._pick_wgrad(oom_key, unpool_out_of_memory)
            rec = kern.wgrad_choices[oom_key]
            assert got != "unpool" and rec["unpool"] == float("inf") and rec[got] == min(rec["kernel"], rec["columns"])
        finally:
            kern.wgrad_choices.pop(oom_key, None)
    dw1, db1 = kern.shared_conv_relu_pool_wgrad(x, dp, code, w.shape, (1, 1), (1, 1), method=chosen)
    torch.testing.assert_close(dw, dw1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, db1, rtol=1e-5, atol=1e-6)
    kern.shared_conv_relu_pool_wgrad(x, dp, code, w.shape, (1, 1), (1, 1), method="auto")
    assert kern.wgrad_choices == new  # timed once
    with pytest.raises(ValueError, match="unknown method 'cudnn'"):
        kern.shared_conv_relu_pool_wgrad(x, dp, code, w.shape, (1, 1), (1, 1), method="cudnn")


def test_the_forwards_auto_choice_is_timed_once_per_shape_on_a_gpu(rng, device, monkeypatch):
    """Forward method auto: on a CPU the resident kernel where C*R*S fits (nothing timed), the tile
    one where it does not (7x7 taps on 7 channels); on CUDA the methods that apply timed once per
    shape (resident only where C*R*S fits) and the fastest kept. Either way the outputs are the
    named method's, bit for bit."""
    pytest.importorskip("triton")
    from fastagg.kernels import shared_conv as kern

    monkeypatch.setattr(kern, "fwd_choices", {})
    x = torch.randn(3, 2, 10, 6, generator=rng).to(device)
    w = torch.randn(10, 2, 3, 3, generator=rng).to(device)
    y, code = kern.shared_conv_relu_pool_forward(x, w, None, (1, 1), (1, 1), method="auto")
    new = dict(kern.fwd_choices)
    if device.type != "cuda":
        assert not new
        chosen = "resident"
    else:
        ((key, timed),) = new.items()
        chosen = timed["chosen"]
        assert timed[chosen] == min(timed["tile"], timed["resident"], timed["columns"]) > 0
    y1, code1 = kern.shared_conv_relu_pool_forward(x, w, None, (1, 1), (1, 1), method=chosen)
    assert torch.equal(y, y1) and torch.equal(code, code1)
    kern.shared_conv_relu_pool_forward(x, w, None, (1, 1), (1, 1), method="auto")
    assert kern.fwd_choices == new  # timed once
    big_x, big_w = torch.randn(1, 7, 8, 8, generator=rng).to(device), torch.randn(2, 7, 7, 7, generator=rng).to(device)
    with pytest.raises(ValueError, match="resident method takes C\\*R\\*S up to 160, got 343"):
        kern.shared_conv_relu_pool_forward(big_x, big_w, None, (1, 1), (3, 3), method="resident")
    y2, code2 = kern.shared_conv_relu_pool_forward(big_x, big_w, None, (1, 1), (3, 3), method="auto")
    if device.type != "cuda":
        big = "tile"
        assert kern.fwd_choices == new
    else:  # timed too, without the resident method
        (timed,) = (v for key, v in kern.fwd_choices.items() if key not in new)
        assert "resident" not in timed and timed[timed["chosen"]] == min(timed["tile"], timed["columns"])
        big = timed["chosen"]
    y3, code3 = kern.shared_conv_relu_pool_forward(big_x, big_w, None, (1, 1), (3, 3), method=big)
    assert torch.equal(y2, y3) and torch.equal(code2, code3)
    with pytest.raises(ValueError, match="unknown method 'cudnn'"):
        kern.shared_conv_relu_pool_forward(x, w, None, (1, 1), (1, 1), method="cudnn")


@pytest.mark.parametrize("geo", CHAIN_GEOMETRIES[:3], ids=lambda g: f"C{g[1]}-{g[5]}x{g[6]}-s{g[7][0]}")
def test_window_columns_hold_each_pixels_receptive_field_by_window_position(geo, rng, device):
    """Row (q, p) of the window columns: the receptive field of the conv output pixel at position q
    (row-major) of pooled window p (n, ph, pw), read off x by index here (zero outside the image),
    zero past C*R*S up to the padded width; and a columns tensor that is not x's is refused."""
    pytest.importorskip("triton")
    from fastagg.kernels import shared_conv as kern

    N, C, H, W, KCO, R, S, stride, padding = geo
    x = torch.randn(N, C, H, W, generator=rng, dtype=torch.float64)
    cols = kern.window_columns(x.to(device), R, S, stride, padding).cpu()
    HO, WO = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    width = -(-(C * R * S) // 32) * 32
    assert cols.shape == (4, N * (HO // 2) * (WO // 2), width) and cols.is_contiguous()
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    for q in range(4):
        for p in range(cols.shape[1]):
            n, ph, pw = p // ((HO // 2) * (WO // 2)), (p // (WO // 2)) % (HO // 2), p % (WO // 2)
            ho, wo = 2 * ph + q // 2, 2 * pw + q % 2
            field = xp[n, :, ho * stride[0]:ho * stride[0] + R, wo * stride[1]:wo * stride[1] + S].reshape(-1)
            assert torch.equal(cols[q, p, :C * R * S], field)
    assert not cols[..., C * R * S:].any()
    w_shape = (KCO, C, R, S)
    code = torch.zeros(N, KCO, HO // 2, WO // 2, dtype=torch.int8, device=device)
    dp = torch.zeros(code.shape, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="are not the window columns of input"):
        kern.shared_conv_relu_pool_wgrad(x.to(device), dp, code, w_shape, stride, padding, method="columns",
                                         columns=cols.to(device)[:, 1:])


def test_shared_chain_rejects_what_it_cannot_run():
    pytest.importorskip("triton")
    from fastagg.kernels.shared_conv import shared_conv_relu_pool_forward, shared_conv_relu_pool_wgrad

    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="7x7 must be even-sized"):
        shared_conv_relu_pool_forward(x, w, None, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="do not match"):
        shared_conv_relu_pool_forward(x, torch.randn(4, 2, 3, 3), None, (1, 1), (1, 1))
    code = torch.zeros(2, 4, 4, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="do not fit"):
        shared_conv_relu_pool_wgrad(x, torch.randn(2, 4, 5, 5), code, w.shape, (1, 1), (1, 1))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(98, 3))
    spec = ParamSpec.from_module(net)
    eng = StudentGradEngine(net, spec, x, 3.0, conv="gemm_fused", chunk=None)
    assert eng.shared_chains() == 0 and eng.split_model() == (None, [])
    for route in ("compiled_fused", "loop_fused"):
        eng.routes[2] = route
        with pytest.raises(ValueError, match=f"the {route} route needs a conv -> relu -> 2x2 max-pool chain"):
            eng(spec.flatten(net.state_dict()).expand(2, -1).clone(), torch.softmax(torch.randn(2, 3), -1))


@pytest.mark.parametrize("bias", [True, False])
def test_shared_chain_under_vjp_of_vmap_equals_float64_per_student(bias, rng, device, monkeypatch):
    """``conv_relu_pool`` on the proxy batch under vmap over K students, on the ``gemm_fused``
    route: the stacked op through both kernels (counted), values and weight/bias gradients against
    each student's float64 conv, relu and pool."""
    pytest.importorskip("triton")
    from fastagg.ops.grouped_conv import conv_relu_pool, route_convs

    calls = _spy_kernels(monkeypatch)
    K, N, C, H, W, CO = 4, 3, 3, 8, 6, 5
    x = torch.randn(N, C, H, W, generator=rng).to(device)
    w = torch.randn(K, CO, C, 3, 3, generator=rng).to(device)
    b = torch.randn(K, CO, generator=rng).to(device)
    with _no_tf32(), route_convs(torch.nn.Module(), "gemm_fused") as counter:
        def students(ww, *bb):
            return torch.func.vmap(lambda w1, *b1: conv_relu_pool(x, w1, b1[0] if bias else None, (1, 1), (1, 1)))(
                ww, *bb)

        out, pullback = torch.func.vjp(students, w, *([b] if bias else []))
        dy = torch.randn(out.shape, generator=rng).to(device)
        grads = pullback(dy)
    assert counter.calls == 1 and calls == ["shared_conv_relu_pool_forward", "shared_conv_relu_pool_wgrad"]
    wd = w.double().cpu().requires_grad_()
    bd = b.double().cpu().requires_grad_() if bias else None
    ref = torch.stack([_chain_ref(x.cpu(), wd[k], None if bd is None else bd[k], (1, 1), (1, 1))[0] for k in range(K)])
    ref_grads = torch.autograd.grad(ref, [t for t in (wd, bd) if t is not None], dy.double().cpu())
    assert out.shape == (K, N, CO, H // 2, W // 2)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert float((g.double().cpu() - r).norm() / r.norm()) < 1e-5


def test_engine_gemm_fused_route_equals_native_and_its_reference_in_bf16(rng, device):
    """The engine's gemm_fused route on a CNN whose first chain reads the proxy batch: fp32 KD
    gradients equal vmap's own convolutions (TF32 off); in bf16 they equal torch_fused, whose
    shared chain is the plain-PyTorch reference of the kernels' numerics (1e-2; 40 draws on the
    CPU: 0.31% median, 0.45% max), and differ from fp32 by bf16's rounding, not more (2.7%
    median, 6.5% max over the same draws)."""
    pytest.importorskip("triton")
    from fastagg.bench import CifarCNN, ResNet18NoBN

    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 7, 14, 4, rng, device)
    out = {}
    with _no_tf32():
        for conv, precision in (("native", "fp32"), ("gemm_fused", "fp32"), ("gemm_fused", "bf16"),
                                ("torch_fused", "bf16")):
            eng = StudentGradEngine(model, spec, proxy, 3.0, conv=conv, chunk=None, precision=precision)
            loss, grads = eng(students, probs)
            out[conv, precision] = (loss, grads.clone(), eng)
    eng = out["gemm_fused", "fp32"][2]
    assert eng.shared_chains() == 1 and eng.routed_convs == 1 and eng.routes == {4: "gemm_fused"}
    g0 = out["native", "fp32"][1]
    torch.testing.assert_close(out["gemm_fused", "fp32"][0], out["native", "fp32"][0], rtol=1e-5, atol=1e-6)
    assert float((out["gemm_fused", "fp32"][1] - g0).norm() / g0.norm()) < 1e-5
    g_bf, g_ref = out["gemm_fused", "bf16"][1], out["torch_fused", "bf16"][1]
    assert float((g_bf - g_ref).norm() / g_ref.norm()) < 1e-2
    assert 0 < float((g_bf - g0).norm() / g0.norm()) < 0.2  # bf16 ran, and is no garbage
    assert StudentGradEngine(CifarCNN(), ParamSpec.from_module(CifarCNN()), torch.randn(2, 3, 32, 32),
                             3.0).shared_chains() == 1
    assert StudentGradEngine(ResNet18NoBN(), ParamSpec.from_module(ResNet18NoBN()), torch.randn(1, 3, 32, 32),
                             3.0).shared_chains() == 0


def test_shared_chain_64_bit_offsets_give_the_same_results(rng, monkeypatch, device):
    """The kernels' 64-bit offset branch (taken when a tensor may pass 2^31 elements, e.g. the codes
    of 1,024 `cnn` students) computes exactly what the 32-bit one does."""
    pytest.importorskip("triton")
    from fastagg.kernels import shared_conv as kern

    off64 = kern._off64
    assert not off64(torch.empty(7, 4096, 256, 256, device="meta")) and off64(torch.empty(9, 4096, 256, 256, device="meta"))
    x, w, b = (t.to(device) for t in (torch.randn(2, 3, 6, 6, generator=rng), torch.randn(9, 3, 3, 3, generator=rng),
                                       torch.randn(9, generator=rng)))
    out = {}
    for wide in (False, True):
        monkeypatch.setattr(kern, "_off64", lambda *t, wide=wide: wide)
        y, code = kern.shared_conv_relu_pool_forward(x, w, b, (1, 1), (1, 1))
        dw, db = kern.shared_conv_relu_pool_wgrad(x, y, code, w.shape, (1, 1), (1, 1))
        out[wide] = (y, code, dw, db)
    for a, c in zip(out[False], out[True]):
        assert torch.equal(a, c)


def _fused_engine(model, spec, proxy, route, K, **kw):
    """An engine that runs passes of K students through ``route`` (compiled_fused, loop_fused or
    their _cl forms: the chains on the proxy batch through the kernels, the rest of the model
    compiled under vmap or student by student), untimed."""
    eng = StudentGradEngine(model, spec, proxy, 3.0, conv="gemm_fused", chunk=None,
                            compile=route.startswith("compiled"), **kw)
    eng.routes[K] = route
    return eng


@pytest.mark.parametrize("route, wgrad", [("compiled_fused", "auto"), ("loop_fused", "auto"), ("loop_fused", "unpool"),
                                          ("loop_fused", "columns"), ("compiled_fused", "columns"),
                                          ("loop_fused_cl", "auto"), ("compiled_fused_cl", "auto")])
@pytest.mark.parametrize("net", [_ChainThenSmooth, _TwoChains], ids=["smooth_tail", "two_chains"])
def test_split_routes_equal_native(net, route, wgrad, rng, device, monkeypatch):
    """compiled_fused and loop_fused: the shared chain cut out of the model (torch.fx) and run
    through the kernels for all students at once, the rest through torch.compile of vmap(grad)
    or student by student with plain autograd (the _cl forms: the chains' outputs and the
    students' activations channels-last);
    fp32 KD gradients and losses equal vmap's own convolutions (TF32 off), both kernels ran once
    per pass, and the rest no longer holds the chain (a second chain, on a per-student input,
    stays in it as the model has it). In bf16 (the smooth tail only: see _Net) the route equals
    the eager gemm_fused route within 1e-2 (draws on the CPU: compiled_fused 0.26% median, 0.35%
    max over 12; loop_fused and loop_fused_cl 0.32%, 0.41% over 15). ``wgrad``: the chains'
    weight-gradient method (auto: the kernel on a CPU, the fastest one timed on a GPU); with
    "columns" the forward's method too, and the weight gradient reuses the forward's window
    columns (built once per chain and pass)."""
    pytest.importorskip("triton")
    if route.endswith("_cl") and device.type != "cuda":
        pytest.skip("the channels-last routes run on CUDA only")
    from fastagg.kernels import shared_conv as kern

    monkeypatch.setattr(kern, "WGRAD", wgrad)
    built = []
    if wgrad == "columns":
        monkeypatch.setattr(kern, "FWD", "columns")
        monkeypatch.setattr(kern, "window_columns", lambda *a, f=kern.window_columns: built.append(1) or f(*a))
    calls = _spy_kernels(monkeypatch)
    smooth = net is _ChainThenSmooth
    model, spec, proxy, students, probs = _engine_case(net, 6, 14 if smooth else 12, 3, rng, device)
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        eng = _fused_engine(model, spec, proxy, route, 3)
        loss1, g1 = eng(students, probs)
        route_built = len(built)  # one pass: the columns built once, by the forward
        if smooth:
            _, g_eager = StudentGradEngine(model, spec, proxy, 3.0, conv="gemm_fused", chunk=None,
                                           precision="bf16")(students, probs)
            _, g_bf = _fused_engine(model, spec, proxy, route, 3, precision="bf16")(students, probs)
    rest, chains = eng.split_model()
    assert chains == [{"weight": "c1.weight", "bias": "c1.bias", "stride": (1, 1), "padding": (2, 2)}]
    assert "c1" not in rest.code and "c2" in rest.code and ("max_pool2d" in rest.code) == (net is _TwoChains)
    assert calls == ["shared_conv_relu_pool_forward", "shared_conv_relu_pool_wgrad"] * (3 if smooth else 1)
    assert route_built == (1 if wgrad == "columns" else 0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    if smooth:
        assert float((g_bf - g_eager).norm() / g_eager.norm()) < 1e-2
        assert 0 < float((g_bf - g0).norm() / g0.norm()) < 0.2  # bf16 ran, and is no garbage


@pytest.mark.parametrize("route", ["compiled_fused", "loop_fused"])
@pytest.mark.parametrize("frozen", ["c1.bias", "c1.weight"])
def test_split_routes_with_a_frozen_chain_parameter_equal_native(frozen, route, rng, device):
    """A chain parameter with requires_grad=False still enters the chain's forward (from the
    frozen views) and gets no KD gradient (zeros in its columns, as on the native route)."""
    pytest.importorskip("triton")
    model, _, proxy, students, probs = _engine_case(_ChainThenSmooth, 5, 14, 2, rng, device)
    model.get_parameter(frozen).requires_grad_(False)
    spec = ParamSpec.from_module(model)
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        loss1, g1 = _fused_engine(model, spec, proxy, route, 2)(students, probs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    off = spec.offsets[spec.names.index(frozen)]
    assert not g1[:, off:off + model.get_parameter(frozen).numel()].any()


class _TiedNet(_Net):
    """_ChainThenSmooth whose head also reads the chain's bias (a tied use in the rest)."""

    def __init__(self):
        super().__init__("tanh")

    def forward(self, x):
        return super().forward(x) * (1 + self.c1.bias[:1])  # scales the logits: a KD gradient


@pytest.mark.parametrize("route", ["loop", "loop_cl"])
def test_loop_routes_on_a_named_route_equal_native(route, rng, device):
    """loop named on any device (the CPU default; on CUDA auto times it), loop_cl on CUDA (a CPU
    refuses it, loop_fused_cl and native_cl with a clear error, and compiled_fused_cl and
    compiled_cl, which only auto lists, when a pass is sent through them): each student through
    the model's own layers with plain autograd, loop_cl with the proxy batch channels-last; fp32
    gradients and losses equal vmap's own convolutions (TF32 off)."""
    model, spec, proxy, students, probs = _engine_case(_TwoChains, 5, 12, 3, rng, device)
    if route == "loop_cl" and device.type != "cuda":
        for conv in ("loop_cl", "loop_fused_cl", "native_cl"):
            with pytest.raises(ValueError, match=f"conv='{conv}' runs on CUDA only"):
                StudentGradEngine(model, spec, proxy, 3.0, conv=conv)
        with pytest.raises(ValueError, match="compiled_fused_cl route runs on CUDA only"):
            _fused_engine(model, spec, proxy, "compiled_fused_cl", 3)(students, probs)
        eng = StudentGradEngine(model, spec, proxy, 3.0, chunk=None, compile=True)
        eng.routes[3] = "compiled_cl"
        with pytest.raises(ValueError, match="compiled_cl route runs on CUDA only"):
            eng(students, probs)
        return
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        eng = StudentGradEngine(model, spec, proxy, 3.0, conv=route, chunk=None)
        loss1, g1 = eng(students, probs)
    assert eng.routes == {3: route}
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    assert (eng._cl_proxy is not None) == (route == "loop_cl")
    if route == "loop_cl":
        assert eng._cl_proxy.is_contiguous(memory_format=torch.channels_last)


class _BNNet(torch.nn.Module):
    """A conv, an eval-mode batch norm and a second conv (smooth activations: bf16 moves no kink)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.c2, self.fc = torch.nn.Conv2d(4, 5, 3, stride=2), torch.nn.Linear(5 * 5 * 5, 7)
        self.eval()

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.bn(self.c1(x))))).flatten(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the channels-last vmap routes run on CUDA only")
@pytest.mark.parametrize("route", ["native_cl", "compiled_cl"])
def test_channels_last_vmap_routes_equal_native(route, rng):
    """native_cl and compiled_cl (the proxy batch channels-last into vmap's convolutions, so that
    cuDNN gets its bf16 layout without transposes): fp32 KD gradients and losses equal native's
    (TF32 off), captured and replayed for native_cl; in bf16 as close to fp32 as the same route on
    the NCHW proxy (native, compiled) comes, give or take half. (Not a fixed bound: how far this
    net's bf16 KD gradients land from fp32 depends on the draw; on an H100 in the eighteenth
    session one draw passed the correction's stated 3% and the next gave 4.0% for compiled_cl.)"""
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 6, 14, 4, rng, "cuda")
    compile = route == "compiled_cl"
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        for precision in ("fp32", "bf16"):
            eng = StudentGradEngine(model, spec, proxy, 3.0, conv="native_cl", chunk=None, precision=precision,
                                    cuda_graphs=route == "native_cl", compile=compile)
            eng.routes[4] = route
            eng(students, probs)  # capture (native_cl) or compile
            loss1, g1 = eng(students, probs)
            if precision == "fp32":
                torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
                assert float((g1 - g0).norm() / g0.norm()) < 1e-5
            else:
                nchw = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None, precision="bf16",
                                         compile=compile)
                nchw.routes[4] = "compiled" if compile else "native"
                _, g2 = nchw(students, probs)
                err, err_nchw = (float((g - g0).norm() / g0.norm()) for g in (g1, g2))
                assert 0 < err <= 1.5 * err_nchw + 5e-3, (err, err_nchw)
    assert eng._cl_proxy.is_contiguous(memory_format=torch.channels_last)
    assert eng.channels_last_vmap() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the channels-last vmap routes run on CUDA only")
def test_a_batchnorm_model_is_kept_off_the_channels_last_vmap_routes(rng):
    """vmap cannot run a CUDA batch norm on channels-last activations (torch 2.11: NYI, seen on an
    H100): auto leaves native_cl, compiled_cl and compiled_fused_cl out for such a model and picks
    among the rest, whose gradients equal native's; conv="native_cl" is refused with the reason."""
    model, spec, proxy, students, probs = _engine_case(_BNNet, 6, 12, 4, rng, "cuda")
    with pytest.raises(ValueError, match="conv='native_cl' cannot run this model: it has a BatchNorm2d, and vmap cannot"):
        StudentGradEngine(model, spec, proxy, 3.0, conv="native_cl")
    eng = StudentGradEngine(model, spec, proxy, 3.0, compile=True, chunk=None)
    assert "NYI" in eng.channels_last_vmap()
    cands = eng._candidates(students)
    assert "native" in cands and "loop_cl" in cands and not set(cands) & {"native_cl", "compiled_cl", "compiled_fused_cl"}
    eng.only_routes = {"native", "loop_cl", "compiled"}  # a few, to keep the compile time down
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        loss1, g1 = eng(students, probs)
    assert eng.routes[4] in ("native", "loop_cl", "compiled") and set(eng.route_timings[4]) == eng.only_routes
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5


class _LayoutQuery(torch.nn.Module):
    """Asks for its convolution's output channels-last when its input is: as a CUDA batch norm's
    kernel choice does, so that vmap refuses it (NYI) on a channels-last proxy only (any device)."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 6 * 6, 7)

    def forward(self, x):
        y = self.c(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return self.fc(torch.tanh(y).flatten(1))


def test_channels_last_vmap_says_why_a_model_cannot_take_the_vmap_channels_last_routes(rng):
    """channels_last_vmap: a model with a batch norm is refused by its layer (the CPU's batch norm
    runs there; a CUDA one does not); another runs under vmap(vjp) on channels-last proxy samples:
    the reason for one that fails only there (vmap's NYI), None for one that runs, and None for
    one that fails on the plain proxy too (not the layout's fault: the route's error says that)."""
    for net, expect in ((_LayoutQuery, "NYI"), (_ChainThenSmooth, None), (_BNNet, "has a BatchNorm2d")):
        model, spec, proxy, *_ = _engine_case(net, 3, {_LayoutQuery: 8, _BNNet: 12}.get(net, 14), 2, rng, "cpu")
        why = StudentGradEngine(model, spec, proxy, 3.0).channels_last_vmap()
        assert (why is None) if expect is None else (expect in why and "channels-last" in why), why
    model, spec, proxy, *_ = _engine_case(_LayoutQuery, 3, 9, 2, rng, "cpu")  # 9x9: the head does not fit
    assert StudentGradEngine(model, spec, proxy, 3.0).channels_last_vmap() is None


def test_loop_fused_in_passes_and_with_a_tied_chain_parameter_equals_native(rng, device):
    """loop_fused in passes of 2 of 5 students (each pass writes its rows of the [K, P] output),
    on a model whose rest also reads the chain's bias: the bias' KD gradient is the chain's share
    (the weight-gradient kernel) plus the rest's (the loop's autograd), as native gives it; in
    float64 it is native's to rounding."""
    pytest.importorskip("triton")
    model, spec, proxy, students, probs = _engine_case(_TiedNet, 4, 14, 5, rng, device)
    with _no_tf32():
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
        eng = StudentGradEngine(model, spec, proxy, 3.0, conv="loop_fused", chunk=2)
        loss1, g1 = eng(students, probs)
    assert eng.routes == {2: "loop_fused", 1: "loop_fused"}
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    off = spec.offsets[spec.names.index("c1.bias")]
    torch.testing.assert_close(g1[:, off:off + 6], g0[:, off:off + 6], rtol=1e-5, atol=1e-7)
    # float64 students: the chain as the model has it (the kernels accumulate in fp32, ~1e-7 off)
    model, students, probs = model.double(), students.double(), probs.double()
    loss0, g0 = StudentGradEngine(model, spec, proxy.double(), 3.0, conv="native", chunk=None)(students, probs)
    loss1, g1 = StudentGradEngine(model, spec, proxy.double(), 3.0, conv="loop_fused", chunk=2)(students, probs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-14)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("route", ["loop", "loop_cl", "loop_fused", "loop_fused_cl"])
def test_loop_routes_replayed_as_cuda_graphs_equal_native(route, rng):
    """On a GPU the loop routes run under CUDA graphs (a pass of K students, autograd included,
    captured once): a replay on new students gives native's fp32 gradients (TF32 off), and
    conv="auto" times them all there."""
    model, spec, proxy, students, probs = _engine_case(_ChainThenSmooth, 16, 14, 8, rng, "cuda")
    with _no_tf32():
        eng = StudentGradEngine(model, spec, proxy, 3.0, conv=route, chunk=None, cuda_graphs=True)
        eng(students, probs)  # capture
        students = students + 0.05 * torch.randn(students.shape, generator=rng).cuda()
        loss1, g1 = eng(students, probs)
        loss0, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
    assert list(eng._graphs) == [(8, tuple(probs.shape), route, False)]
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    candidates = StudentGradEngine(model, spec, proxy, 3.0, compile=True)._candidates(students)
    assert {"native_cl", "loop_cl", "loop_fused", "loop_fused_cl", "compiled_cl", "compiled_fused",
            "compiled_fused_cl"} <= set(candidates)
    assert not {"loop", "triton_cl"} & set(candidates)  # measured slower than native: named only


def test_compiled_routes_stay_compiled_past_dynamo_s_recompile_limit(rng, device):
    """Each engine and route compiles under its own code object: two engines each compiling
    passes of two sizes make four graphs, past a recompile limit of 2 per code object, and all four
    compile (with one shared code object, as until the fifteenth session, dynamo ran the third
    and fourth eagerly with a logged warning: past its default limit of 8 a "compiled" route of a
    busy process did so unseen)."""
    from torch._dynamo.utils import counters

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 7)).to(device)
    spec = ParamSpec.from_module(model)
    proxy = torch.randn(5, 6, generator=rng).to(device)
    probs = torch.softmax(torch.randn(5, 7, generator=rng), -1).to(device)
    flat = spec.flatten(model.state_dict()).to(device)
    before = counters["frames"]["ok"]
    with torch._dynamo.config.patch(**{limit: 2}):
        for _ in range(2):
            eng = StudentGradEngine(model, spec, proxy, 3.0, chunk=None, compile=True)
            for K in (2, 3):
                eng.routes[K] = "compiled"
                students = flat + 0.05 * torch.randn(K, spec.numel, generator=rng).to(device)
                _, g1 = eng(students, probs)
                _, g0 = StudentGradEngine(model, spec, proxy, 3.0, chunk=None)(students, probs)
                assert float((g1 - g0).norm() / g0.norm()) < 1e-5
    assert counters["frames"]["ok"] - before == 4


def test_compiled_routes_recompile_for_each_shape_in_one_process(rng, device):
    """Compiled passes of several shapes in one process (a conv net through compiled_gemm, then
    an MLP with a batch norm at two proxy sizes) each equal native: the engine compiles one
    static graph per shape. With dynamo's automatic dynamic shapes (the engine until the
    thirteenth session) the MLP's pass failed inside vmap(grad) ("RuntimeError when making fake
    tensor call"), where a timed route picker would have left compiled out; in the test suite it
    showed as an order-dependent failure of test_grouped_conv's compiled tests."""
    def mlp():
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 7))
        m[1].running_mean.normal_()
        return m.eval()

    for net, conv, route, n, side, K in ((_CNN, "gemm", "compiled_gemm", 9, 14, 5),
                                         (mlp, "native", "compiled", 10, None, 3),
                                         (mlp, "native", "compiled", 7, None, 3)):
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
        model = net().to(device)
        spec = ParamSpec.from_module(model)
        shape = (n, 3, side, side) if side else (n, 6)
        proxy = torch.randn(*shape, generator=rng).to(device)
        students = spec.flatten(model.state_dict()).to(device) + 0.05 * torch.randn(K, spec.numel, generator=rng).to(device)
        probs = torch.softmax(torch.randn(n, 7, generator=rng), -1).to(device)
        with _no_tf32():
            _, g0 = StudentGradEngine(model, spec, proxy, 3.0, conv="native", chunk=None)(students, probs)
            eng = StudentGradEngine(model, spec, proxy, 3.0, conv=conv, chunk=None, compile=True)
            eng.routes[K] = route
            _, g1 = eng(students, probs)
        assert float((g1 - g0).norm() / g0.norm()) < 1e-5, (route, n)
