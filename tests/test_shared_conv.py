"""The gemm route's shared-input convolution (fastagg.ops.shared_conv) against float64
F.conv2d, student by student: values and the gradients that torch.func's vjp of a vmap gives;
and the engine's "gemm" route against its "native" route."""

import pytest
import torch
import torch.nn.functional as F

from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec
from fastagg.ops.shared_conv import conv2d_as_product, shared_conv2d, shared_input_convs

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


class _CNN(torch.nn.Module):
    """First layer on the shared proxy batch, then a per-student layer, pooling and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 6, 5, padding=2)
        self.c2 = torch.nn.Conv2d(6, 5, 3, stride=2)
        self.fc = torch.nn.Linear(5 * 3 * 3, 7)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.c2(x)).flatten(1))


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
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    model = _CNN().to(device)
    spec = ParamSpec.from_module(model)
    proxy = torch.randn(9, 3, 14, 14, generator=rng).to(device)
    flat = spec.flatten(model.state_dict()).to(device)
    students = flat + 0.05 * torch.randn(5, spec.numel, generator=rng).to(device)
    probs = torch.softmax(torch.randn(9, 7, generator=rng), -1).to(device)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = {}
        for name in ("native", route):
            eng = StudentGradEngine(model, spec, proxy, 3.0, conv="native" if name == "native" else "gemm", chunk=None,
                                    compile=name == "compiled_gemm")
            if name == "compiled_gemm":
                eng.routes[students.shape[0]] = name  # this route, untimed
            loss, grads = eng(students, probs)
            out[name] = (loss, grads.clone(), eng.routed_convs + eng.product_convs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert out[route][2] == 1 and out["native"][2] == 0  # the first layer, and only it, went the gemm way
    torch.testing.assert_close(out[route][0], out["native"][0], rtol=1e-5, atol=1e-7)
    err = float((out[route][1] - out["native"][1]).norm() / out["native"][1].norm())
    assert err < 1e-5
