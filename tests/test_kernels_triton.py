"""Triton kernels against the plain-PyTorch references (float64), awkward sizes, every dtype.

On the CPU these run through TRITON_INTERPRET=1 (grids kept to a few hundred programs); with
FASTAGG_TEST_DEVICE=cuda the same tests run the compiled kernels on the GPU.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import fastagg  # noqa: E402
from fastagg.kernels import fused_linear_kd as flk  # noqa: E402
from fastagg.kernels import kd_loss as kdk  # noqa: E402
from fastagg.kernels import merge as mk  # noqa: E402
from fastagg.ops import fused_linear_kd_reference, fused_merge_reference, kd_loss_grad_reference  # noqa: E402
from fastagg.ops.kd_loss import _kd_loss_op  # noqa: E402

from conftest import mlp  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("K", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_merge_matches_reference(K, dtype, rng, device):
    P = 3001  # not a multiple of the block; 12 programs of 256
    theta = torch.randn(P, generator=rng).to(device)
    deltas = torch.randn(K, P, generator=rng).to(device, dtype)
    corr = torch.randn(K, P, generator=rng).to(device, dtype)
    store = torch.randn(5, P, generator=rng).to(device)
    c_d = torch.randn(K, generator=rng).tolist()
    c_c = torch.randn(K, generator=rng).tolist()
    idx = torch.randint(0, 5, (3,), generator=rng).tolist()
    c_v = torch.rand(3, generator=rng).tolist()
    groups = [(deltas, c_d, None), (corr, c_c, None), (store, c_v, idx)]
    out = torch.full_like(theta, float("nan"))  # poisoned: every element must be written
    mk.fused_merge(theta, 0.37, groups, out=out, block=256, unroll=4)  # K=37: 9 unrolled steps + 1
    ref = fused_merge_reference(theta.double(), 0.37, [(r.double(), c, i) for r, c, i in groups])
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-6
    out = torch.full_like(theta, float("nan"))  # the default elements per program (merge_block on CUDA)
    mk.fused_merge(theta, 0.37, groups, out=out)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-6


def test_merge_block_keeps_eight_programs_per_multiprocessor():
    """merge_block: 4096 elements per program where that fills the device 8 programs deep, smaller
    powers of two where it does not (`cnn`'s 1.1M parameters on an H100's 132 multiprocessors), 512
    at least."""
    pytest.importorskip("triton")
    from fastagg.kernels.merge import merge_block

    assert merge_block(11_700_000, 132) == 4096
    assert merge_block(1_105_098, 132) == 1024 and 1_105_098 / 1024 >= 8 * 132 > 1_105_098 / 2048
    assert merge_block(4096 * 8 * 132, 132) == 4096 and merge_block(4096 * (8 * 132 - 1), 132) == 2048
    assert merge_block(1000, 132) == 512


def test_fused_merge_in_place_and_empty_groups(rng, device):
    P = 777
    theta = torch.randn(P, generator=rng).to(device)
    rows = torch.randn(2, P, generator=rng).to(device)
    ref = fused_merge_reference(theta.double(), 1.0, [(rows.double(), [0.5, -2.0], None)])
    mk.fused_merge(theta, 1.0, [(rows, [0.5, -2.0], None), (rows, [], None)], out=theta, block=128, unroll=1)
    assert _rel(theta, ref) < 1e-6


@pytest.mark.parametrize("K,N,C,block_c", [(1, 5, 300, 128), (37, 3, 130, 128), (4, 6, 10, None),
                                           (37, 3, 130, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_loss_grad_matches_reference(K, N, C, block_c, dtype, rng, device):
    """block_c=128: the looping two-pass kernel (C > block); None with C <= 256: the row-block kernel."""
    T = 2.7
    logits = (3 * torch.randn(K * N, C, generator=rng)).to(device, dtype)
    teacher = torch.softmax(2 * torch.randn(N, C, generator=rng), -1).to(device)
    teacher[0, :3] = 0.0  # exact zeros in p_T: 0 log 0 = 0
    teacher[0] /= teacher[0].sum()
    loss_ref, grad_ref = kd_loss_grad_reference(logits.double(), teacher.double(), T)
    loss, grad = kdk.kd_loss_grad(logits, teacher, T, block_c=block_c)
    assert grad.dtype == dtype and loss.shape == (K,)
    assert _rel(loss, loss_ref) < 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
    assert _rel(grad, grad_ref) < tol


def test_kd_loss_writes_every_element(rng, device):
    logits = torch.randn(6, 257, generator=rng).to(device)
    teacher = torch.softmax(torch.randn(3, 257, generator=rng), -1).to(device)
    grad = torch.full_like(logits, float("nan"))
    kdk.launch_kd(logits, teacher, 1.5, 0.1, grad, False, block_c=64)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kd_matches_reference(dtype, rng, device):
    K, N, H, C = 2, 11, 24, 300
    h = torch.randn(K, N, H, generator=rng).to(device, dtype)
    W = (0.3 * torch.randn(K, C, H, generator=rng)).to(device, dtype)
    g = torch.randn(N, H, generator=rng).to(device, dtype)
    V = (0.3 * torch.randn(C, H, generator=rng)).to(device, dtype)
    loss, dh, dW = flk.fused_linear_kd(h, W, g, V, 2.0, chunk_rows=4)  # 3 chunks, the last short
    rl, rdh, rdW = fused_linear_kd_reference(h.double(), W.double(), g.double(), V.double(), 2.0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert dh.dtype == dtype and dW.dtype == dtype
    assert _rel(loss, rl) < tol and _rel(dh, rdh) < tol and _rel(dW, rdW) < tol


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kd_loss_custom_op_opcheck(backend, rng, device):
    logits = torch.randn(6, 33, generator=rng).to(device).requires_grad_(True)
    teacher = torch.softmax(torch.randn(3, 33, generator=rng), -1).to(device)
    torch.library.opcheck(_kd_loss_op, (logits, teacher, 2.0, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    loss = fastagg.ops.kd_loss(logits, teacher, 2.0, backend)
    (g,) = torch.autograd.grad((loss * torch.tensor([2.0, -1.0], device=device)).sum(), logits)
    _, ref = kd_loss_grad_reference(logits.detach().double(), teacher.double(), 2.0)
    ref = ref.view(2, 3, 33) * torch.tensor([2.0, -1.0], dtype=torch.float64, device=device).view(2, 1, 1)
    assert _rel(g, ref.view(6, 33)) < 1e-5


@pytest.mark.parametrize("rule", [fastagg.FedBuff(4, momentum=0.3), fastagg.FedAsync(0.6, batch_size=3)])
def test_aggregator_triton_equals_torch_over_a_fedadt_run(rule, rng, device):
    proxy = torch.randn(8, 6, generator=rng)
    models = []
    for backend in ("torch", "triton"):
        corr = fastagg.KDCorrection(proxy, steps=2, schedule=fastagg.schedules.constant(1.0))
        agg = fastagg.Aggregator(mlp(), rule, correction=corr, backend=backend, device=device)
        g = torch.Generator().manual_seed(7)
        for i in range(14):
            lag = int(torch.randint(0, 3, (1,), generator=g))
            agg.submit(0.1 * torch.randn(agg.spec.numel, generator=g).to(device),
                       base_version=max(0, agg.version - lag))
        assert agg.stats()["corrected"] > 0 and agg.backend == backend
        models.append(agg.params)
    assert _rel(models[1], models[0]) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the bounds check is the interpreter's")
def test_interpreter_refuses_a_lane_that_reads_or_writes_past_its_tensor():
    """Under the interpreter every address a lane touches must lie inside one of the launch's
    tensors (tests/interpreter_bounds.py, installed by conftest): a mask one element too wide
    fails the launch, on a load and on a store, and the same kernel within bounds runs."""
    import triton
    import triton.language as tl
    from interpreter_bounds import active

    @triton.jit
    def copy(x, y, n_load, n_store, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n_load), mask=o < n_store)

    assert active()
    x, y = torch.randn(8), torch.zeros(8)
    copy[(1,)](x, y, 8, 8, BLOCK=16)
    assert torch.equal(x, y)
    for n_load, n_store, what in ((9, 8, "load"), (8, 9, "store")):
        with pytest.raises(Exception, match=f"out-of-bounds {what}: 1 of 9 lanes"):
            copy[(1,)](x, y, n_load, n_store, BLOCK=16)
