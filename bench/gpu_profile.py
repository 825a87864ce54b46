"""Device check: where a corrected update's time goes, and whether the first convolution should
be a GEMM.

    OUT=out python bench/gpu_profile.py              # on the GPU machine
    OUT=/tmp/p python bench/gpu_profile.py --small --device cpu   # a dry run of every path here

1. The first layer reads the proxy batch that every student shares, so under vmap it is one
   dense convolution with K * Co output channels over 3 input channels (what vmap's rule makes
   of it); on the H100 cuDNN ran the `cnn`'s at ~11 TFLOP/s with its relu and pool (NOTES-gpu.md).
   Timed here, bf16, forward and weight gradient, for the `cnn` and `resnet18` first layers at the
   engine's K: cuDNN NCHW, cuDNN channels-last, and the same product as GEMMs over the unfolded
   input (cuBLAS): ``bmm`` (one [K*Co, C*R*S] x [C*R*S, Ho*Wo] product per image, the output in
   vmap's NCHW layout: the gemm route's op), ``mm`` (one [N*Ho*Wo, C*R*S] x [C*R*S, K*Co]
   product, the output channels-last) and ``vmap_product`` (one product per student, the shared
   columns broadcast: what compiled_gemm's plain ops lower to). Each against fp32 cuDNN with
   TF32 off, relative L2 error.
   For `cnn` also the first layer with its relu and pool (the chain): cuDNN's three ops with
   autograd against fastagg.kernels.shared_conv (the gemm_fused route), forward and weight gradient.
   Then `cnn`'s second layer (K = 128), forward and both gradients: cuDNN's grouped convolution
   (what vmap runs) against each student's dense convolution in a loop captured as a CUDA graph,
   on one stream and round four (what the loop routes run), and round four with every operand
   channels-last (the _cl loop routes): the loop routes' premise.
2. ``torch.profiler`` over engine passes per route (by default compiled_fused_dense, compiled_dense,
   compiled_fused_cl and compiled; others by --routes, e.g. compiled_fused, loop_fused, gemm_fused,
   native, gemm, compiled_gemm): the kernels
   that take the time, summed by name, as a share of the pass (without CUDA graphs, so that the
   profiler sees each launch; the kernels are the same).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from fastagg import bench
from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec


def _time(fn, device, reps=10):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def first_layer(name, K, N, C, H, W, CO, R, pad, device):
    bf = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(N, C, H, W, device=device)
    w = torch.randn(K * CO, C, R, R, device=device) / (C * R * R) ** 0.5
    dy = torch.randn(N, K * CO, H, W, device=device)
    flops = 2 * N * H * W * K * CO * C * R * R
    # the reference in fp32 with TF32 off (float64 convolutions of this size take seconds on a
    # GPU): enough for errors at the bf16 level, ~1e-3
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    ref_y = F.conv2d(x, w, padding=pad)
    ref_dw = torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=pad)
    torch.backends.cudnn.allow_tf32 = tf32
    xb, wb, dyb = x.to(bf), w.to(bf), dy.to(bf)
    xcl, wcl, dycl = (t.contiguous(memory_format=torch.channels_last) for t in (xb, wb, dyb))
    CRS, L = C * R * R, H * W
    w2 = wb.reshape(K * CO, CRS)

    def cols():
        return F.unfold(xb, (R, R), padding=pad)  # [N, CRS, L], shared by the K students

    def bmm_fwd():
        return torch.bmm(w2.expand(N, -1, -1), cols()).view(N, K * CO, H, W)

    def bmm_wgrad():  # sum over images of dy[n] [K*Co, L] x cols[n]^T [L, CRS]
        return torch.bmm(dyb.view(N, K * CO, L), cols().transpose(1, 2)).sum(0, dtype=torch.float32)

    def mm_fwd():  # rows are pixels: the output is channels-last [N, H, W, K*Co]
        return cols().transpose(1, 2).reshape(N * L, CRS) @ w2.t()

    dy_rows = dycl.permute(0, 2, 3, 1).reshape(N * L, K * CO)  # channels-last dy as rows, no copy

    def mm_wgrad():
        return dy_rows.t() @ cols().transpose(1, 2).reshape(N * L, CRS)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    cols_t = cols().transpose(1, 2).reshape(N * L, CRS)
    wk = wb.reshape(K, CO, CRS)
    dyk = dycl.permute(0, 2, 3, 1).reshape(N * L, K, CO).permute(1, 2, 0)  # [K, Co, N*L], no copy

    def product_fwd():  # compiled_gemm's per-student product as vmap lowers it: shared operand broadcast
        return torch.bmm(cols_t.expand(K, -1, -1), wk.transpose(1, 2))  # [K, N*L, Co]

    def product_wgrad():
        return torch.bmm(dyk, cols_t.expand(K, -1, -1))  # [K, Co, CRS]

    variants = {
        "cudnn_nchw": (lambda: F.conv2d(xb, wb, padding=pad),
                       lambda: torch.nn.grad.conv2d_weight(xb, wb.shape, dyb, padding=pad)),
        "cudnn_channels_last": (lambda: F.conv2d(xcl, wcl, padding=pad),
                                lambda: torch.nn.grad.conv2d_weight(xcl, wcl.shape, dycl, padding=pad)),
        "gemm_bmm": (bmm_fwd, bmm_wgrad),
        "gemm_mm": (mm_fwd, mm_wgrad),
        "vmap_product": (product_fwd, product_wgrad),
    }
    row = {"model": name, "K": K, "N": N, "C": C, "H": H, "W": W, "Co": CO, "R": R, "gflop": flops / 1e9}
    if name == "cnn" and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        row["chain"] = chain(xb, wb, x, w, pad, flops, device)
    for key, (fwd, wgrad) in variants.items():
        y, dw = fwd(), wgrad()
        if key == "gemm_mm":
            y = y.reshape(N, H, W, K * CO).permute(0, 3, 1, 2)
        elif key == "vmap_product":  # [K, N*L, Co] -> [N, K*Co, H, W]
            y = y.view(K, N, H, W, CO).permute(1, 0, 4, 2, 3).reshape(N, K * CO, H, W)
        row[key] = {"fwd_ms": _time(fwd, device), "wgrad_ms": _time(wgrad, device),
                    "fwd_err": rel(y, ref_y), "wgrad_err": rel(dw.reshape(w.shape), ref_dw)}
        row[key]["fwd_TFLOPs"] = flops / row[key]["fwd_ms"] / 1e9
        row[key]["wgrad_TFLOPs"] = flops / row[key]["wgrad_ms"] / 1e9
        print(f"{name} first layer K={K} {key:20s} fwd {row[key]['fwd_ms']:8.3f} ms ({row[key]['fwd_TFLOPs']:6.1f} TF/s, "
              f"err {row[key]['fwd_err']:.1e})  wgrad {row[key]['wgrad_ms']:8.3f} ms "
              f"({row[key]['wgrad_TFLOPs']:6.1f} TF/s, err {row[key]['wgrad_err']:.1e})", flush=True)
    return row


def _graphed(fn, device):
    """``fn`` captured as a CUDA graph (warmed up on a side stream first), as its replay; on a CPU
    ``fn`` itself."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def second_layer(K, N, C, H, W, CO, R, pad, device):
    """`cnn`'s second layer (each student's own input: vmap makes it one grouped convolution of K
    groups) forward, data gradient and weight gradient with autograd, bf16: as vmap runs it
    (cuDNN's grouped convolution) against each student's dense convolution in a loop (the loop
    routes), on one stream, round four, and round four channels-last (the _cl loop routes), each
    loop captured as a CUDA graph. Each student's input is a strided slice of all K students'
    (one copy per student, as in loop_fused). The premise of the loop routes: cuDNN's dense
    kernels beat its grouped ones on this layer. Then the dense routes' op round 4 streams, each
    of its variants fixed: the data gradient as a forward convolution or by convolution_backward,
    with cuDNN's heuristics or its search (benchmark mode)."""
    bf = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(N, K * C, H, W, device=device, dtype=bf)
    w = (torch.randn(K * CO, C, R, R, device=device) / (C * R * R) ** 0.5).to(bf)
    dy = torch.randn(N, K * CO, H, W, device=device, dtype=bf)
    flops = 3 * 2 * N * H * W * K * CO * C * R * R  # forward, data gradient, weight gradient
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()

    def grouped():
        return torch.autograd.grad(F.conv2d(xr, wr, padding=pad, groups=K), (xr, wr), dy)

    xs = [x[:, k * C:(k + 1) * C].detach().requires_grad_() for k in range(K)]  # strided, as loop_fused's
    ws = [w[k * CO:(k + 1) * CO].detach().requires_grad_() for k in range(K)]
    dys = [dy[:, k * CO:(k + 1) * CO].contiguous() for k in range(K)]

    def student(k):
        return torch.autograd.grad(F.conv2d(xs[k], ws[k], padding=pad), (xs[k], ws[k]), dys[k])

    def loop():
        return [student(k) for k in range(K)]

    streams = [torch.cuda.Stream() for _ in range(4)] if device.type == "cuda" else []

    def loop_streams(one=student):
        main = torch.cuda.current_stream()
        for st in streams:
            st.wait_stream(main)
        for k in range(K):
            with torch.cuda.stream(streams[k % 4]):
                one(k)
        for st in streams:
            main.wait_stream(st)

    cl = torch.channels_last  # the same, every operand channels-last (no layout transposes in cuDNN)
    xcl = [t.detach().contiguous(memory_format=cl).requires_grad_() for t in xs]
    wcl = [t.detach().contiguous(memory_format=cl).requires_grad_() for t in ws]
    dycl = [t.contiguous(memory_format=cl) for t in dys]

    def student_cl(k):
        return torch.autograd.grad(F.conv2d(xcl[k], wcl[k], padding=pad), (xcl[k], wcl[k]), dycl[k])

    gx, gw = grouped()
    err = max(float((a.float() - b.float()).norm() / b.float().norm())
              for gx0, gw0 in (student(0), student_cl(0)) for a, b in ((gx[:, :C], gx0), (gw[:CO], gw0)))
    row = {"K": K, "N": N, "C": C, "H": H, "W": W, "Co": CO, "R": R, "gflop_fwd_bwd": flops / 1e9,
           "student0_grouped_vs_dense_rel_err": err}
    variants = {"grouped_cudnn": grouped, "dense_loop_graphed": loop}
    if streams:
        variants["dense_loop_4_streams_graphed"] = loop_streams
        variants["dense_loop_channels_last_4_streams_graphed"] = functools.partial(loop_streams, student_cl)
    # the engine's dense op itself (fastagg.ops.dense_conv), its students round 4 side streams on CUDA
    # (one after the other on a CPU, for a dry run), each variant fixed
    from fastagg.ops import dense_conv

    xk = dense_conv._students_last(x.view(N, K, C, H, W).movedim(1, 0)).detach().requires_grad_()
    wk = w.view(K, CO, C, R, R).detach().requires_grad_()
    dyk = dense_conv._students_last(dy.view(N, K, CO, H, W).movedim(1, 0))

    def dense_op(n, dgrad="auto", search="auto"):
        old = dense_conv.DGRAD, dense_conv.CUDNN_BENCHMARK
        dense_conv.DGRAD, dense_conv.CUDNN_BENCHMARK = dgrad, search
        try:
            with dense_conv.streams(n):
                y = dense_conv.dense_grouped_conv(xk, wk, None, [1, 1], [pad, pad])
                return torch.autograd.grad(y, (xk, wk), dyk)
        finally:
            dense_conv.DGRAD, dense_conv.CUDNN_BENCHMARK = old

    for dgrad in ("forward", "backward"):  # the op's variants, each fixed (the engine times them per shape)
        for search in (False, True):
            gxk, gwk = dense_op(4, dgrad, search)
            row[f"dense_op_{dgrad}_{search}_vs_grouped_rel_err"] = max(
                float((a.float() - b.float()).norm() / b.float().norm()) for a, b in (
                    (gxk.movedim(0, 1).reshape(N, K * C, H, W), gx), (gwk.reshape(K * CO, C, R, R), gw)))
            name = f"dense_op_4_streams_dgrad_{dgrad}_{'cudnn_search' if search else 'heuristics'}_graphed"
            variants[name] = functools.partial(dense_op, 4, dgrad, search)
    for key, fn in variants.items():
        try:
            ms = _time(_graphed(fn, device) if key != "grouped_cudnn" else fn, device)
        except Exception as exc:  # a capture that fails: say so, time the others
            row[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"cnn second layer K={K} {key}: failed: {row[key]['error']}", flush=True)
            continue
        row[key] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
        print(f"cnn second layer K={K} {key:30s} fwd+bwd {ms:8.3f} ms ({row[key]['TFLOPs']:6.1f} TF/s)", flush=True)
    return row


def chain(xb, wb, x, w, pad, flops, device):
    """The first layer with its relu and 2x2 max-pool (`cnn`'s first chain), forward and weight
    gradient from a pooled gradient: cuDNN's convolution, relu and pool with autograd (what the
    native and gemm routes run, the product aside) against fastagg.kernels.shared_conv (the
    gemm_fused route: pooled in the epilogue, nothing of the [N, K*Co, H, W] output written).
    Errors against the fp32 chain with TF32 off."""
    from fastagg.kernels.shared_conv import shared_conv_relu_pool_forward, shared_conv_relu_pool_wgrad

    wr = wb.detach().requires_grad_()

    def cudnn_fwd():
        return F.max_pool2d(F.relu(F.conv2d(xb, wr, padding=pad)), 2)

    yt = cudnn_fwd()
    dp = torch.randn(yt.shape, device=device).to(xb.dtype)
    y, code = shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad), method="tile")
    y_r, _ = shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad), method="resident")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    wf = w.detach().requires_grad_()
    ref_y = F.max_pool2d(F.relu(F.conv2d(x, wf, padding=pad)), 2)
    (ref_dw,) = torch.autograd.grad(ref_y, (wf,), dp.float())
    torch.backends.cudnn.allow_tf32 = tf32
    (dw_t,) = torch.autograd.grad(yt, (wr,), dp, retain_graph=True)
    dw, _ = shared_conv_relu_pool_wgrad(xb, dp, code, wb.shape, (1, 1), (pad, pad), bias=False, method="kernel")
    dw_u, _ = shared_conv_relu_pool_wgrad(xb, dp, code, wb.shape, (1, 1), (pad, pad), bias=False, method="unpool")

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    out = {"cudnn_chain": {"fwd_ms": _time(cudnn_fwd, device),
                           "wgrad_ms": _time(lambda: torch.autograd.grad(yt, (wr,), dp, retain_graph=True), device),
                           "fwd_err": rel(yt, ref_y), "wgrad_err": rel(dw_t, ref_dw)},
           "shared_fused": {"fwd_ms": _time(lambda: shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad),
                                                                                   method="tile"), device),
                            "wgrad_ms": _time(lambda: shared_conv_relu_pool_wgrad(
                                xb, dp, code, wb.shape, (1, 1), (pad, pad), bias=False, method="kernel"), device),
                            "fwd_err": rel(y, ref_y), "wgrad_err": rel(dw, ref_dw)}}
    # the weight gradient's other method: dz written out channels-last, then cuDNN's dense one
    out["shared_unpool"] = {**out["shared_fused"], "wgrad_err": rel(dw_u, ref_dw), "wgrad_ms": _time(
        lambda: shared_conv_relu_pool_wgrad(xb, dp, code, wb.shape, (1, 1), (pad, pad), bias=False, method="unpool"),
        device)}
    # the forward's other kernel (eighteenth session): the im2col block gathered once per program,
    # channel tiles looped over it; with the unpool weight gradient
    out["shared_resident"] = {**out["shared_unpool"], "fwd_err": rel(y_r, ref_y), "fwd_ms": _time(
        lambda: shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad), method="resident"), device)}
    # the columns kernels (twenty-first session): the shared input's im2col built once, window
    # position by position, and read as plain tiles by both kernels (no gather); the forward's time
    # includes building the columns, the weight gradient reuses the forward's (as the engine does)
    keep = {}
    y_c, code_c = shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad), method="columns", keep=keep)
    dw_c, _ = shared_conv_relu_pool_wgrad(xb, dp, code_c, wb.shape, (1, 1), (pad, pad), bias=False, method="columns",
                                          columns=keep["columns"])
    out["shared_columns"] = {
        "fwd_err": rel(y_c, ref_y), "wgrad_err": rel(dw_c, ref_dw),
        "fwd_ms": _time(lambda: shared_conv_relu_pool_forward(xb, wb, None, (1, 1), (pad, pad), method="columns"),
                        device),
        "wgrad_ms": _time(lambda: shared_conv_relu_pool_wgrad(xb, dp, code_c, wb.shape, (1, 1), (pad, pad), bias=False,
                                                              method="columns", columns=keep["columns"]), device),
        "codes_differing_from_tile": float((code_c != code).double().mean())}  # near-ties summed in another order
    for key, r in out.items():
        r["fwd_TFLOPs"], r["wgrad_TFLOPs"] = flops / r["fwd_ms"] / 1e9, flops / r["wgrad_ms"] / 1e9
        print(f"cnn first chain (conv, relu, pool) {key:14s} fwd {r['fwd_ms']:8.3f} ms ({r['fwd_TFLOPs']:6.1f} TF/s, "
              f"err {r['fwd_err']:.1e})  wgrad {r['wgrad_ms']:8.3f} ms ({r['wgrad_TFLOPs']:6.1f} TF/s, "
              f"err {r['wgrad_err']:.1e})", flush=True)
    c, f, u, r = out["cudnn_chain"], out["shared_fused"], out["shared_unpool"], out["shared_resident"]
    out["speedup_vs_cudnn"] = (c["fwd_ms"] + c["wgrad_ms"]) / (f["fwd_ms"] + f["wgrad_ms"])
    out["unpool_speedup_vs_cudnn"] = (c["fwd_ms"] + c["wgrad_ms"]) / (u["fwd_ms"] + u["wgrad_ms"])
    out["resident_speedup_vs_cudnn"] = (c["fwd_ms"] + c["wgrad_ms"]) / (r["fwd_ms"] + r["wgrad_ms"])
    co = out["shared_columns"]
    out["columns_speedup_vs_cudnn"] = (c["fwd_ms"] + c["wgrad_ms"]) / (co["fwd_ms"] + co["wgrad_ms"])
    print(f"cnn first chain: shared_fused {out['speedup_vs_cudnn']:.2f}x cuDNN, shared_unpool "
          f"{out['unpool_speedup_vs_cudnn']:.2f}x, shared_resident {out['resident_speedup_vs_cudnn']:.2f}x, "
          f"shared_columns {out['columns_speedup_vs_cudnn']:.2f}x (forward + weight gradient)", flush=True)
    return out


BASELINE = "compiled_vmap_baseline"


def profile_routes(name, K, device, small, routes, passes=3):
    model, proxy = bench.make(name, device, small)
    model.eval()
    spec = ParamSpec.from_module(model)
    flat = spec.flatten(model.state_dict()).to(device)
    students = flat + 1e-3 * torch.randn(K, spec.numel, device=device)
    with torch.no_grad():
        probs = torch.softmax(model(proxy).float() / 3.0, -1)
    rows = {}
    for route in routes:
        if route == BASELINE:  # stock PyTorch's best, as the bench times it: where the engine differs
            base = torch.compile(bench.vmap_baseline(model, spec, proxy, probs, 3.0, device.type == "cuda"))
            rows[route] = _profile(name, K, route, lambda: base(students), device, passes)
            continue
        compiled = route.startswith("compiled")
        conv = {"compiled": "native", "compiled_gemm": "gemm", "compiled_fused": "gemm_fused",
                "compiled_fused_cl": "gemm_fused", "compiled_cl": "native", "compiled_dense": "native",
                "compiled_fused_dense": "gemm_fused"}.get(route, route)  # routes[K] set below
        eng = StudentGradEngine(model, spec, proxy, 3.0, precision="bf16" if device.type == "cuda" else "fp32",
                                cuda_graphs=False, conv=conv, chunk=None, compile=compiled)
        if compiled:
            eng.routes[K] = route
        out = torch.empty_like(students)
        rows[route] = _profile(name, K, route, lambda: eng(students, probs, out), device, passes)
    return rows


def _profile(name, K, route, run, device, passes):
    """The kernels of ``run()`` (one pass) under torch.profiler, summed by name; or why it failed."""
    try:
        run()
        run()
    except Exception as exc:  # say so, profile the others
        row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"{name} {route}: failed: {row['error']}", flush=True)
        return row
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(passes):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / passes * 1e3
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        dev_us = ev.time_range.elapsed_us() if device.type == "cuda" else ev.self_cpu_time_total
        if device.type == "cuda" and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and not ev.name.startswith("aten::"):
            continue
        per[ev.name][0] += 1
        per[ev.name][1] += dev_us / 1e3 / passes
    if not per and device.type == "cuda":  # no kernel events listed: the ops' own device time instead
        for ka in prof.key_averages():
            us = getattr(ka, "self_device_time_total", None) or getattr(ka, "self_cuda_time_total", 0)
            if us:
                per[f"[op] {ka.key}"] = [ka.count, us / 1e3 / passes]
    total = sum(v[1] for v in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][1])[:15]
    row = {"wall_ms_per_pass": wall, "kernel_ms_per_pass": total,
           "kernels_per_pass": sum(v[0] for v in per.values()) / passes,
           "top": [{"kernel": k[:160], "calls_per_pass": v[0] / passes, "ms_per_pass": v[1],
                    "share": v[1] / total if total else 0.0} for k, v in top]}
    print(f"{name} K={K} route {route}: {wall:.2f} ms per pass (kernels {total:.2f} ms, "
          f"{row['kernels_per_pass']:.0f} launches)", flush=True)
    for r in row["top"][:10]:
        print(f"   {r['ms_per_pass']:8.3f} ms {100 * r['share']:5.1f}%  x{r['calls_per_pass']:<5.0f} {r['kernel'][:110]}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (a dry run on a CPU)")
    ap.add_argument("--routes", default="compiled_fused_dense,compiled_dense,compiled_fused_cl,compiled",
                    help=f"engine routes to profile; {BASELINE}: torch.compile of the bf16 vmap, as the bench's baseline")
    ap.add_argument("--models", default="cnn,resnet18", help="models whose passes are profiled (cnn, resnet18, lm)")
    ap.add_argument("--profiles-only", action="store_true", help="skip the first- and second-layer timings")
    a = ap.parse_args()
    device = torch.device(a.device)
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "first_layer": [], "profiles": {}}
    path = os.path.join(out, "gpu_profile.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    shapes = ([("cnn", 128, 256, 3, 32, 32, 32, 5, 2), ("resnet18", 32, 64, 3, 32, 32, 64, 3, 1)] if not a.small
              else [("cnn", 4, 8, 3, 12, 12, 8, 5, 2), ("resnet18", 3, 4, 3, 10, 10, 8, 3, 1)])
    if not a.profiles_only:
        for s in shapes:
            res["first_layer"].append(first_layer(*s, device))
            save()
        res["second_layer"] = second_layer(*((4, 8, 3, 6, 6, 5, 5, 2) if a.small else (128, 256, 32, 16, 16, 64, 5, 2)),
                                           device)
        save()
    sizes = {"cnn": (128, 4), "resnet18": (32, 2), "lm": (16, 2)}  # K: the bench's, and a dry run's
    for name in a.models.split(","):
        K = sizes[name][a.small]
        res["profiles"][name] = {}
        for route in a.routes.split(","):  # saved route by route: a timeout keeps what was profiled
            if "fused" in route and name != "cnn":  # no conv -> relu -> pool chain there
                continue
            res["profiles"][name].update(profile_routes(name, K, device, a.small, [route]))
            save()


if __name__ == "__main__":
    main()
