"""The fused KD loss and its logit gradient (fastagg.ops.kd_loss): the Triton kernel and the
C++ and numba kernels against the plain-PyTorch reference in float64, awkward sizes, every logits
dtype, a 32k vocabulary; the custom op checked by torch.library.opcheck.

On the CPU the Triton kernel runs through TRITON_INTERPRET=1; with FASTAGG_TEST_DEVICE=cuda it
runs compiled on the GPU (the CPU kernels' cases are then skipped: they are CI's).
"""

import pytest
import torch

import fastagg
from fastagg.ops import kd_loss_grad_reference
from fastagg.ops.kd_loss import _kd_loss_op

from conftest import rel_err, triton_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("K,N,C,block_c", [(1, 5, 300, 128), (37, 3, 130, 128), (4, 6, 10, None),
                                           (37, 3, 130, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kd_loss_grad_matches_reference(K, N, C, block_c, dtype, rng, device):
    """block_c=128: the looping two-pass kernel (C > block); None with C <= 256: the row-block kernel."""
    kdk = triton_kernels("kd_loss")
    T = 2.7
    logits = (3 * torch.randn(K * N, C, generator=rng)).to(device, dtype)
    teacher = torch.softmax(2 * torch.randn(N, C, generator=rng), -1).to(device)
    teacher[0, :3] = 0.0  # exact zeros in p_T: 0 log 0 = 0
    teacher[0] /= teacher[0].sum()
    loss_ref, grad_ref = kd_loss_grad_reference(logits.double(), teacher.double(), T)
    loss, grad = kdk.kd_loss_grad(logits, teacher, T, block_c=block_c)
    assert grad.dtype == dtype and loss.shape == (K,)
    assert rel_err(loss, loss_ref) < 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
    assert rel_err(grad, grad_ref) < tol


def test_triton_kd_loss_writes_every_element(rng, device):
    kdk = triton_kernels("kd_loss")
    logits = torch.randn(6, 257, generator=rng).to(device)
    teacher = torch.softmax(torch.randn(3, 257, generator=rng), -1).to(device)
    grad = torch.full_like(logits, float("nan"))
    kdk.launch_kd(logits, teacher, 1.5, 0.1, grad, False, block_c=64)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kd_loss_custom_op_opcheck(backend, rng, device):
    if backend == "triton":
        pytest.importorskip("triton")
    logits = torch.randn(6, 33, generator=rng).to(device).requires_grad_(True)
    teacher = torch.softmax(torch.randn(3, 33, generator=rng), -1).to(device)
    torch.library.opcheck(_kd_loss_op, (logits, teacher, 2.0, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    loss = fastagg.ops.kd_loss(logits, teacher, 2.0, backend)
    (g,) = torch.autograd.grad((loss * torch.tensor([2.0, -1.0], device=device)).sum(), logits)
    _, ref = kd_loss_grad_reference(logits.detach().double(), teacher.double(), 2.0)
    ref = ref.view(2, 3, 33) * torch.tensor([2.0, -1.0], dtype=torch.float64, device=device).view(2, 1, 1)
    assert rel_err(g, ref.view(6, 33)) < 1e-5


@pytest.mark.parametrize("K,N,C", [(1, 5, 1000), (37, 3, 130), (16, 7, 10)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kd_loss_grad_matches_reference(cpu_backend, K, N, C, dtype, rng):
    T = 1.7
    logits = (3 * torch.randn(K * N, C, generator=rng)).to(dtype)
    teacher = torch.softmax(2 * torch.randn(N, C, generator=rng), -1)
    teacher[0, :4] = 0.0
    teacher[0] /= teacher[0].sum()
    loss_ref, grad_ref = kd_loss_grad_reference(logits.double(), teacher.double(), T)
    loss, grad = cpu_backend.kd_loss_grad(logits, teacher, T)
    assert grad.dtype == dtype and loss.shape == (K,)
    assert torch.isfinite(grad).all()
    assert rel_err(loss, loss_ref) < 1e-5
    assert rel_err(grad, grad_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kd_loss_stays_close_to_float64_over_a_32k_vocabulary(cpu_backend, dtype, rng):
    """The loss is the small difference of two sums of ~log C each (sum p log p, sum p log q). At
    C = 32k with logits tens apart, the C++ kernel's fp32 shift and sums put it 5.5e-5 (relative)
    from float64 where torch's fp32 reference stays at ~3e-7; now every CPU backend is within
    2e-6, in every logit dtype."""
    K, N, C = 2, 8, 32000
    for T, scale in ((1.0, 0.1), (3.0, 30.0), (7.5, 300.0)):
        logits = (scale * torch.randn(K * N, C, generator=rng)).to(dtype)
        teacher = torch.softmax(5 * torch.randn(N, C, generator=rng), -1)
        loss_ref, _ = kd_loss_grad_reference(logits.double(), teacher.double(), T)
        loss, _ = cpu_backend.kd_loss_grad(logits, teacher, T)
        err = float(((loss.double() - loss_ref).abs() / (loss_ref.abs() + 1)).max())
        assert err < 2e-6, (T, scale, err)


def test_cpu_kd_loss_refuses_memory_elsewhere(cpu_backend):
    """The kernels take raw pointers: logits in a GPU's memory ("meta" stands in for it) are
    refused before a pointer is taken."""
    with pytest.raises(TypeError, match="CPU tensors, got one on meta"):
        cpu_backend.kd_loss_grad(torch.empty(4, 5, device="meta"), torch.full((2, 5), 0.2), 3.0)
