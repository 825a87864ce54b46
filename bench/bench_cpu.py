"""CPU kernel benchmarks: C++ and numba fused ops against the machine's limits and baselines.

    python bench/bench_cpu.py               # summary table -> bench/results/cpu.json
    pytest bench/bench_cpu.py               # the same cases as pytest-benchmark suites

Every speed is a ratio measured in the same run: the merge against a STREAM-like triad
(a = b + s*c, 3 * 4 bytes per element) and copy, against the torch reference / torch.addmv, and
against a Flower-style per-layer numpy aggregation of a ResNet-18-shaped update; the KD op
against eager torch.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
import pytest
import torch

from fastagg import cpu_cpp, cpu_numba
from fastagg.bench import flower_numpy_merge
from fastagg.bench import timeit as _timeit
from fastagg.ops import fused_merge_reference, kd_loss_grad_reference


def resnet18_shapes():
    """Shapes of a ResNet-18 state_dict (parameters and BatchNorm buffers), 11.7M floats."""
    shapes = [(64, 3, 7, 7)] + [(64,)] * 4
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3)] + [(cout,)] * 4 + [(cout, cout, 3, 3)] + [(cout,)] * 4
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1)] + [(cout,)] * 4
        cin = cout
    return shapes + [(1000, 512), (1000,)]


def timeit(fn, reps=7, warmup=2):
    return _timeit(fn, "cpu", reps=reps, warmup=warmup)


def limits(n=1 << 27):  # 512 MB per array: far larger than any last-level cache
    a, b, c = torch.empty(n), torch.randn(n), torch.randn(n)
    triad = timeit(lambda: torch.add(b, c, alpha=0.5, out=a))
    copy = timeit(lambda: a.copy_(b))
    return {"triad_GBps": 3 * n * 4 / triad / 1e9, "copy_GBps": 2 * n * 4 / copy / 1e9}


def merge_case(K=16, P=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = P or sum(int(np.prod(s)) for s in resnet18_shapes())
    theta = torch.randn(P, generator=g)
    rows = torch.randn(K, P, generator=g).to(dtype)
    coefs = (torch.rand(K, generator=g) / K).tolist()
    return theta, rows, coefs


def summary():
    torch.set_num_threads(os.cpu_count())
    lim = limits()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "numpy": np.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           **lim, "cpp": cpu_cpp.available()[1], "numba": cpu_numba.available()[1], "merge": [], "kd": []}
    print(f"limits: triad {lim['triad_GBps']:.1f} GB/s, copy {lim['copy_GBps']:.1f} GB/s")
    for K, dtype in ((16, torch.float32), (16, torch.bfloat16), (64, torch.float32)):
        theta, rows, coefs = merge_case(K, dtype=dtype)
        P = theta.numel()
        out = torch.empty_like(theta)
        groups = [(rows, coefs, None)]
        nbytes = (K * rows.element_size() + 8) * P
        r = {"K": K, "P": P, "dtype": str(dtype)}
        r["cpp_s"] = timeit(lambda: cpu_cpp.fused_merge(theta, 1.0, groups, out=out))
        r["numba_s"] = timeit(lambda: cpu_numba.fused_merge(theta, 1.0, groups, out=out))
        r["torch_ref_s"] = timeit(lambda: fused_merge_reference(theta, 1.0, groups))
        if dtype == torch.float32:
            c = torch.tensor(coefs)
            r["addmv_s"] = timeit(lambda: torch.addmv(theta, rows.t(), c, out=out))
            shapes = resnet18_shapes()
            clients = []
            for k in range(K):
                flat = rows[k].numpy()
                offs = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
                clients.append([flat[offs[i]:offs[i + 1]].reshape(s) for i, s in enumerate(shapes)])
            r["flower_numpy_s"] = timeit(lambda: flower_numpy_merge(clients, [10] * K), reps=3, warmup=1)
        r["cpp_frac_triad"] = nbytes / r["cpp_s"] / 1e9 / lim["triad_GBps"]
        r["cpp_vs_torch_ref"] = r["torch_ref_s"] / r["cpp_s"]
        res["merge"].append(r)
        print(f"merge K={K} P={P / 1e6:.1f}M {str(dtype)[6:]}: cpp {r['cpp_s'] * 1e3:.1f} ms "
              f"({r['cpp_frac_triad']:.0%} of triad), numba {r['numba_s'] * 1e3:.1f} ms, torch ref "
              f"{r['torch_ref_s'] * 1e3:.1f} ms ({r['cpp_vs_torch_ref']:.2f}x)"
              + (f", addmv {r['addmv_s'] * 1e3:.1f} ms, Flower numpy {r['flower_numpy_s'] * 1e3:.0f} ms"
                 if "addmv_s" in r else ""))
        del theta, rows, out
    # bf16 logits: what the engine's bf16 forward hands the KD op
    for K, N, C, dtype in ((16, 256, 1000, torch.float32), (16, 256, 1000, torch.bfloat16), (64, 64, 10, torch.float32),
                           (16, 32, 32000, torch.float32), (16, 32, 32000, torch.bfloat16)):
        g = torch.Generator().manual_seed(1)
        z = (torch.randn(K * N, C, generator=g) * 3).to(dtype)
        p = torch.softmax(torch.randn(N, C, generator=g), -1)
        r = {"rows": K * N, "C": C, "dtype": str(dtype).replace("torch.", "")}
        r["cpp_s"] = timeit(lambda: cpu_cpp.kd_loss_grad(z, p, 3.0))
        r["numba_s"] = timeit(lambda: cpu_numba.kd_loss_grad(z, p, 3.0))
        r["eager_s"] = timeit(lambda: kd_loss_grad_reference(z, p, 3.0))
        r["cpp_vs_eager"] = r["eager_s"] / r["cpp_s"]
        r["numba_vs_eager"] = r["eager_s"] / r["numba_s"]
        res["kd"].append(r)
        print(f"kd {K * N}x{C} {r['dtype']}: cpp {r['cpp_s'] * 1e3:.2f} ms, numba {r['numba_s'] * 1e3:.2f} ms, eager "
              f"{r['eager_s'] * 1e3:.2f} ms (cpp {r['cpp_vs_eager']:.2f}x, numba {r['numba_vs_eager']:.2f}x)")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/cpu.json", "w") as f:
        json.dump(res, f, indent=1)
    return res


# -- pytest-benchmark suites ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_inputs():
    return merge_case(16, P=2_000_000)


@pytest.mark.parametrize("impl", ["cpp", "numba", "torch"])
def test_bench_merge(benchmark, merge_inputs, impl):
    theta, rows, coefs = merge_inputs
    fn = {"cpp": cpu_cpp.fused_merge, "numba": cpu_numba.fused_merge, "torch": fused_merge_reference}[impl]
    benchmark(fn, theta, 1.0, [(rows, coefs, None)])


@pytest.mark.parametrize("impl", ["cpp", "numba", "torch"])
def test_bench_kd(benchmark, impl):
    z = torch.randn(4096, 1000)
    p = torch.softmax(torch.randn(256, 1000), -1)
    fn = {"cpp": cpu_cpp.kd_loss_grad, "numba": cpu_numba.kd_loss_grad, "torch": kd_loss_grad_reference}[impl]
    benchmark(fn, z, p, 3.0)


if __name__ == "__main__":
    sys.exit(0 if summary() else 1)
