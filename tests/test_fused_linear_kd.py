"""The chunked linear + KD (fastagg.ops.fused_linear_kd, for large vocabularies): the Triton
kernels against the plain-PyTorch reference in float64."""

import pytest
import torch

from fastagg.ops import fused_linear_kd_reference

from conftest import rel_err, triton_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_kd_matches_reference(dtype, rng, device):
    flk = triton_kernels("fused_linear_kd")
    K, N, H, C = 2, 11, 24, 300
    h = torch.randn(K, N, H, generator=rng).to(device, dtype)
    W = (0.3 * torch.randn(K, C, H, generator=rng)).to(device, dtype)
    g = torch.randn(N, H, generator=rng).to(device, dtype)
    V = (0.3 * torch.randn(C, H, generator=rng)).to(device, dtype)
    loss, dh, dW = flk.fused_linear_kd(h, W, g, V, 2.0, chunk_rows=4)  # 3 chunks, the last short
    rl, rdh, rdW = fused_linear_kd_reference(h.double(), W.double(), g.double(), V.double(), 2.0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert dh.dtype == dtype and dW.dtype == dtype
    assert rel_err(loss, rl) < tol and rel_err(dh, rdh) < tol and rel_err(dW, rdW) < tol
