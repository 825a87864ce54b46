"""One-call GPU check for the Triton kernels (issue: Triton kernels at the GPU's limits).

Run on a CUDA machine from the repository root:
    OUT=out python bench/gpu_check.py
It (1) runs the kernel test-suite without the interpreter, (2) checks 64-bit offsets with
K * P > 2^31, (3) measures the limits in the same process (device-to-device copy bandwidth,
bf16 matmul rate) and (4) benchmarks every kernel against PyTorch eager and torch.compile of the
reference. Writes $OUT/gpu_results.json and prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

from fastagg.kernels import fused_linear_kd as flk
from fastagg.kernels import kd_loss as kdk
from fastagg.kernels import merge as mk
from fastagg.ops import kd_loss_grad_reference

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
dev = torch.device("cuda")
R: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
ROWS = []


def bench(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def row(name, ms, **kw):
    ROWS.append({"name": name, "ms": ms, **kw})
    extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
    print(f"{name:58s} {ms:9.3f} ms  {extra}", flush=True)


def tests():
    env = dict(os.environ, FASTAGG_TEST_DEVICE="cuda")
    env.pop("TRITON_INTERPRET", None)
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_merge.py",
                        "tests/test_kd_loss.py", "tests/test_fused_linear_kd.py"],
                       env=env, capture_output=True, text=True)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    R["tests"] = {"rc": p.returncode, "summary": tail, "seconds": time.time() - t}
    print("kernel tests on GPU:", tail, flush=True)
    if p.returncode:
        print(p.stdout[-4000:], p.stderr[-2000:])


def offsets64():
    """K * P > 2^31: rows beyond the 32-bit range must be read correctly."""
    K, P = 3, 750_000_000  # K * P = 2.25e9 > 2^31
    theta = torch.randn(P, device=dev)
    rows = torch.empty(K, P, device=dev, dtype=torch.bfloat16)
    for k in range(K):
        rows[k].normal_()
    out = torch.full_like(theta, float("nan"))
    coefs = [0.5, -1.25, 2.0]
    mk.fused_merge(theta, 0.3, [(rows, coefs, None)], out=out)
    idx = torch.cat([torch.arange(0, 1000, device=dev), torch.arange(P - 1000, P, device=dev),
                     torch.randint(0, P, (100000,), device=dev)])
    ref = 0.3 * theta[idx].double() + sum(c * rows[k, idx].double() for k, c in enumerate(coefs))
    err = float((out[idx].double() - ref).abs().max())
    ok = bool(torch.isfinite(out).all()) and err < 1e-4
    R["offsets64"] = {"K": K, "P": P, "max_abs_err": err, "all_written": bool(torch.isfinite(out).all()), "ok": ok}
    print("64-bit offsets:", R["offsets64"], flush=True)
    del theta, rows, out
    torch.cuda.empty_cache()


def limits():
    n = 1 << 29  # 2 GiB fp32
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    R["copy_GBps"] = 2 * a.numel() * 4 / ms / 1e6
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: x @ y)
    R["bf16_TFLOPs"] = 2 * 8192 ** 3 / ms / 1e9
    print(f"limits: copy {R['copy_GBps']:.0f} GB/s, bf16 matmul {R['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    torch.cuda.empty_cache()


def merge_bench():
    bw = R["copy_GBps"]
    res = []
    # block / warps / unroll sweep at one shape per row dtype
    K, P = 64, 11_700_000
    theta = torch.randn(P, device=dev)
    out = torch.empty_like(theta)
    coefs = torch.randn(K).tolist()
    best_by_dtype = {}
    for dt in (torch.float32, torch.bfloat16):
        rows = torch.randn(K, P, device=dev, dtype=dt)
        need = (K * rows.element_size() + 8) * P
        best = None
        for block in (2048, 4096, 8192):
            for nw in (4, 8):
                for unroll in (1, 4):
                    ms = bench(lambda: mk.fused_merge(theta, 1.0, [(rows, coefs, None)], out=out, block=block,
                                                      num_warps=nw, unroll=unroll))
                    row(f"merge sweep K=64 P=11.7M {str(dt)[6:]} b={block} w={nw} u={unroll}", ms,
                        frac_copy_bw=need / ms / 1e6 / bw)
                    if best is None or ms < best[0]:
                        best = (ms, block, nw, unroll)
        best_by_dtype[dt] = best[1:]
        del rows
    R["merge_best_config"] = {str(k): v for k, v in best_by_dtype.items()}
    del theta, out
    torch.cuda.empty_cache()
    for K, P, dt in [(64, 11_700_000, torch.float32), (64, 11_700_000, torch.bfloat16),
                     (256, 11_700_000, torch.float32), (256, 11_700_000, torch.bfloat16),
                     (64, 100_000_000, torch.float32), (64, 100_000_000, torch.bfloat16),
                     (256, 100_000_000, torch.bfloat16)]:
        theta = torch.randn(P, device=dev)
        rows = torch.randn(K, P, device=dev, dtype=dt)
        coefs_l = torch.randn(K).tolist()
        coefs = torch.tensor(coefs_l, device=dev)
        out = torch.empty_like(theta)
        need = (K * rows.element_size() + 8) * P
        block, nw, unroll = best_by_dtype[dt]
        tri = bench(lambda: mk.fused_merge(theta, 1.0, [(rows, coefs_l, None)], out=out, block=block, num_warps=nw,
                                           unroll=unroll))
        name = f"K={K} P={P / 1e6:.1f}M {str(dt)[6:]}"
        r = {"K": K, "P": P, "dtype": str(dt), "triton_ms": tri, "floor_ms": need / bw / 1e6,
             "triton_frac_copy_bw": need / tri / 1e6 / bw}
        if dt == torch.float32:
            r["gemv_ms"] = bench(lambda: torch.addmv(theta, rows.t(), coefs, out=out))
        else:
            r["eager_ms"] = bench(lambda: torch.add(theta, (coefs.to(dt) @ rows).float(), out=out))
        if K == 64 and P < 50_000_000:
            def foreach():
                acc = theta.clone()
                for k in range(K):
                    acc.add_(rows[k], alpha=coefs_l[k])
                return acc
            r["per_client_add_ms"] = bench(foreach, warmup=5, rep=20)
        if K == 64 and P < 50_000_000:
            ref = torch.compile(lambda th, c, rw: th + c @ rw.float(), dynamic=False)
            ref(theta, coefs, rows)
            r["compiled_ref_ms"] = bench(lambda: ref(theta, coefs, rows))
        row(f"merge {name}", tri, frac_copy_bw=r["triton_frac_copy_bw"],
            **{k: v for k, v in r.items() if k.endswith("_ms") and k != "triton_ms"})
        res.append(r)
        del theta, rows, out
        torch.cuda.empty_cache()
    R["merge"] = res


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def kd_bench():
    res = []
    for K, N, C in [(16, 256, 32000), (64, 256, 10), (256, 256, 10)]:
        M = K * N
        z = torch.randn(M, C, device=dev) * 3
        p = torch.softmax(torch.randn(N, C, device=dev), -1)
        tri = bench(lambda: kdk.kd_loss_grad(z, p, 3.0))
        eag = bench(lambda: kd_loss_grad_reference(z, p, 3.0))
        comp_fn = torch.compile(kd_loss_grad_reference, dynamic=False)
        comp_fn(z, p, 3.0)
        comp = bench(lambda: comp_fn(z, p, 3.0))
        r = {"rows": M, "C": C, "triton_ms": tri, "eager_ms": eag, "compiled_ms": comp,
             "speedup_vs_eager": eag / tri, "speedup_vs_compiled": comp / tri,
             "triton_peak_bytes": peak(lambda: kdk.kd_loss_grad(z, p, 3.0)),
             "eager_peak_bytes": peak(lambda: kd_loss_grad_reference(z, p, 3.0)),
             "bytes_floor_ms": 2 * M * C * 4 / R["copy_GBps"] / 1e6}
        r["peak_ratio"] = r["triton_peak_bytes"] / r["eager_peak_bytes"]
        row(f"kd loss+grad {M}x{C} fp32", tri, eager=eag, compiled=comp, x_eager=r["speedup_vs_eager"],
            peak_ratio=r["peak_ratio"])
        res.append(r)
        del z, p
        torch.cuda.empty_cache()
    R["kd_loss"] = res


def flk_bench():
    N, H, C, T = 8192, 1024, 128_000, 2.0
    dt = torch.bfloat16
    h = torch.randn(1, N, H, device=dev, dtype=dt)
    W = torch.randn(1, C, H, device=dev, dtype=dt) * 0.03
    g = torch.randn(N, H, device=dev, dtype=dt)
    V = torch.randn(C, H, device=dev, dtype=dt) * 0.03

    def eager():
        hh = h[0].detach().requires_grad_(True)
        WW = W[0].detach().requires_grad_(True)
        z = hh @ WW.t()
        with torch.no_grad():
            pt = torch.softmax((g @ V.t()).float() / T, -1)
        logq = torch.log_softmax(z.float() / T, -1)
        loss = (torch.xlogy(pt, pt) - pt * logq).sum() * (T * T / N)
        return torch.autograd.grad(loss, (hh, WW))

    fused = lambda: flk.fused_linear_kd(h, W, g, V, T)
    ms_f = bench(fused, warmup=3, rep=10)
    ms_e = bench(eager, warmup=3, rep=10)
    pf, pe = peak(fused), peak(eager)
    logits_bytes = N * C * 2
    flops = 2 * N * C * H * 4  # student fwd, teacher fwd, dh, dW
    r = {"rows": N, "vocab": C, "hidden": H, "dtype": "bf16", "fused_ms": ms_f, "eager_ms": ms_e,
         "speedup": ms_e / ms_f, "fused_peak_bytes": pf, "eager_peak_bytes": pe,
         "logits_bytes_bf16": logits_bytes, "fused_peak_below_logits": pf < logits_bytes,
         "matmul_floor_ms": flops / R["bf16_TFLOPs"] / 1e9}
    loss, dh, dW = fused()
    gh, gW = eager()
    r["rel_err_dh"] = float((dh[0].float() - gh.float()).norm() / gh.float().norm())
    r["rel_err_dW"] = float((dW[0].float() - gW.float()).norm() / gW.float().norm())
    row("fused linear KD 8192 x 128k bf16 H=1024", ms_f, eager=ms_e, x_eager=r["speedup"],
        peak_GB=pf / 1e9, eager_peak_GB=pe / 1e9, floor=r["matmul_floor_ms"])
    R["fused_linear_kd"] = r


if __name__ == "__main__":
    steps = sys.argv[1:] or ["tests", "offsets64", "limits", "merge", "kd", "flk"]
    fns = {"tests": tests, "offsets64": offsets64, "limits": limits, "merge": merge_bench, "kd": kd_bench,
           "flk": flk_bench}
    for s in steps:
        if s in ("merge", "kd", "flk") and "copy_GBps" not in R:
            limits()
        try:
            fns[s]()
        except Exception as exc:  # keep going: one failing stage must not lose the others' numbers
            import traceback
            traceback.print_exc()
            R.setdefault("errors", {})[s] = repr(exc)
        with open(os.path.join(OUT, "gpu_results.json"), "w") as f:
            json.dump({**R, "rows": ROWS}, f, indent=1)
    print(json.dumps({k: v for k, v in R.items() if k not in ("merge", "kd_loss")}, indent=1)[:3000])
