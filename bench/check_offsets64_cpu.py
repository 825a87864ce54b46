"""One-off check (about 11 GB of memory, ~1 minute): the CPU kernels index rows with 64-bit
offsets, so K * P > 2^31 works. Not part of CI (too large); run by hand:
    python bench/check_offsets64_cpu.py
"""

import torch

from fastagg import cpu_cpp, cpu_numba

K, P = 3, 750_000_000  # K * P = 2.25e9 > 2^31
theta = torch.randn(P)
rows = torch.empty(K, P, dtype=torch.bfloat16)
for k in range(K):
    rows[k].normal_()
coefs = [0.5, -1.25, 2.0]
idx = torch.cat([torch.arange(1000), torch.arange(P - 1000, P), torch.randint(0, P, (100_000,))])
ref = 0.3 * theta[idx].double() + sum(c * rows[k, idx].double() for k, c in enumerate(coefs))
for mod in (cpu_cpp, cpu_numba):
    out = torch.full_like(theta, float("nan"))
    mod.fused_merge(theta, 0.3, [(rows, coefs, None)], out=out)
    err = float((out[idx].double() - ref).abs().max())
    print(f"{mod.__name__}: K*P = {K * P:,} > 2^31, max abs error on 102,000 sampled elements {err:.2e}, "
          f"all written: {bool(torch.isfinite(out).all())}")
    assert err < 1e-4 and torch.isfinite(out).all()
