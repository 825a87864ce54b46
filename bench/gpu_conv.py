"""Device check: fastagg's grouped implicit-GEMM convolution kernels against cuDNN's grouped
convolution (what vmap's batching rule runs for K students), layer by layer for the CNNs and the
ResNet-18 of `fastagg bench`, bf16 operands. For each distinct layer shape: ms and TFLOP/s of
the forward, data-gradient and weight-gradient passes, and the bf16 matmul rate measured in the
same run (the limit); and for the `cnn`'s two conv -> relu -> 2x2 max-pool chains, the fused
kernel against the chain as vmap runs it. Run from the repository root on a CUDA machine:

    OUT=out python bench/gpu_conv.py
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from fastagg import bench
from fastagg.kernels import grouped_conv as gck

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
dev = torch.device("cuda")


def run_layer(K, shape):
    N, C, H, W, CO, R, S, stride, padding = shape
    HO, WO = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    bf = torch.bfloat16
    x = torch.randn(K, N, C, H, W, device=dev, dtype=bf)
    w = torch.randn(K, CO, C, R, S, device=dev, dtype=bf)
    dy = torch.randn(K, N, CO, HO, WO, device=dev, dtype=bf)
    flops = 2 * K * N * HO * WO * CO * C * R * S
    xg = x.movedim(0, 1).reshape(N, K * C, H, W).contiguous()
    wg = w.reshape(K * CO, C, R, S).contiguous()
    dyg = dy.movedim(0, 1).reshape(N, K * CO, HO, WO).contiguous()

    def cudnn_bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(dyg, xg, wg, None, stride, padding, (1, 1), False,
                                                           (0, 0), K, mask)

    cases = {
        "fwd": (lambda: gck.conv_forward(x, w, None, stride, padding),
                lambda: F.conv2d(xg, wg, None, stride, padding, groups=K)),
        "dgrad": (lambda: gck.conv_backward_data(dy, w, x.shape, stride, padding), cudnn_bwd((True, False, False))),
        "wgrad": (lambda: gck.conv_backward_weight(dy, x, w.shape, stride, padding), cudnn_bwd((False, True, False))),
    }
    # the same activations stored channels-last ([K, N, H, W, C] in memory, same logical shape),
    # outputs written channels-last too (the engine's "triton_cl" route): how much do contiguous
    # channel loads and stores gain?
    x_cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    dy_cl = dy.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    cases["fwd_channels_last"] = (lambda: gck.conv_forward(x_cl, w, None, stride, padding, True), None)
    cases["dgrad_channels_last"] = (lambda: gck.conv_backward_data(dy_cl, w, x.shape, stride, padding, True), None)
    cases["wgrad_channels_last"] = (lambda: gck.conv_backward_weight(dy_cl, x_cl, w.shape, stride, padding), None)
    relayout = do_bench(lambda: x.permute(0, 1, 3, 4, 2).contiguous(), warmup=10, rep=40)
    row = {"K": K, "N": N, "C": C, "H": H, "W": W, "Co": CO, "R": R, "S": S, "stride": stride[0],
           "padding": padding[0], "gflop_per_pass": flops / 1e9}
    # correctness at this shape (bf16 operands, fp32 accumulation on both sides)
    ref = F.conv2d(xg, wg, None, stride, padding, groups=K).view(N, K, CO, HO, WO).movedim(1, 0)
    got = gck.conv_forward(x, w, None, stride, padding)
    row["fwd_rel_err"] = float((got.float() - ref.float()).norm() / ref.float().norm())
    for name, (ours, theirs) in cases.items():
        row[f"{name}_ms"] = t_ours = do_bench(ours, warmup=10, rep=40)
        row[f"{name}_TFLOPs"] = flops / t_ours / 1e9
        if theirs is not None:
            row[f"{name}_cudnn_ms"] = t_cudnn = do_bench(theirs, warmup=10, rep=40)
            row[f"{name}_speedup_vs_cudnn"] = t_cudnn / t_ours
    row["relayout_x_ms"] = relayout
    del x, w, dy, xg, wg, dyg, x_cl, dy_cl
    torch.cuda.empty_cache()
    return row


def run_fused(K, shape, shared):
    """conv -> relu -> 2x2 max-pool of one layer: the fused kernel (the engine's triton_fused
    route) against the same chain as vmap runs it (cuDNN convolution, relu, max-pool with
    indices), forward and backward (ours: rebuild the gradient at the convolution's output, then
    the weight gradient and, for a batched input, the data gradient; theirs: autograd)."""
    N, C, H, W, CO, R, S, stride, padding = shape
    bf = torch.bfloat16
    x = torch.randn(1 if shared else K, N, C, H, W, device=dev, dtype=bf).expand(K, N, C, H, W)
    w = torch.randn(K, CO, C, R, S, device=dev, dtype=bf)
    b = torch.randn(K, CO, device=dev)
    y, code = gck.conv_relu_pool_forward(x, w, b, stride, padding)
    HO, WO = 2 * y.shape[-2], 2 * y.shape[-1]
    dp = torch.randn_like(y)

    def ours_bwd():
        dz = gck.unpool_relu(dp, code, HO, WO)
        gck.conv_backward_weight(dz, x, w.shape, stride, padding)
        if not shared:
            gck.conv_backward_data(dz, w, x.shape, stride, padding)

    wg = w.reshape(K * CO, C, R, S).detach().requires_grad_()
    xg = (x[0] if shared else x.movedim(0, 1).reshape(N, K * C, H, W).contiguous()).detach().requires_grad_(not shared)

    def theirs_fwd():
        z = F.conv2d(xg, wg, b.to(bf).reshape(-1), stride, padding, groups=1 if shared else K)
        return F.max_pool2d(F.relu(z), 2)

    yt = theirs_fwd()
    dpt = dp.movedim(0, 1).reshape(yt.shape)
    inputs = (wg,) if shared else (wg, xg)
    row = {"K": K, "N": N, "C": C, "H": H, "W": W, "Co": CO, "R": R, "S": S, "shared_input": shared,
           "fused_fwd_ms": do_bench(lambda: gck.conv_relu_pool_forward(x, w, b, stride, padding), warmup=10, rep=40),
           "chain_fwd_ms": do_bench(theirs_fwd, warmup=10, rep=40),
           "fused_bwd_ms": do_bench(ours_bwd, warmup=10, rep=40),
           "chain_bwd_ms": do_bench(lambda: torch.autograd.grad(yt, inputs, dpt, retain_graph=True), warmup=10, rep=40)}
    ref = theirs_fwd().detach().float().view(N, K, CO, *y.shape[-2:]).movedim(1, 0)
    row["fwd_rel_err"] = float((y.float() - ref).norm() / ref.norm())
    del x, w, y, code, dp, wg, xg, yt
    torch.cuda.empty_cache()
    return row


def check_offsets64():
    """A forward whose input holds more than 2^31 elements (66 students x [256, 128, 32, 32],
    4.4 GB bf16): the last student's output against F.conv2d on that student alone."""
    K, N, C, H, W, CO = 66, 256, 128, 32, 32, 16
    x = torch.randn(K, N, C, H, W, device=dev, dtype=torch.bfloat16)
    w = torch.randn(K, CO, C, 3, 3, device=dev, dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    y = gck.conv_forward(x, w, None, (1, 1), (1, 1))
    ref = F.conv2d(x[-1].float(), w[-1].float(), None, 1, 1)
    err = float((y[-1].float() - ref).norm() / ref.norm())
    del x, w, y
    torch.cuda.empty_cache()
    return err


def main():
    lim = bench.limits(dev)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "limits": lim, "rows": []}
    print(f"{res['device']}  bf16 matmul {lim['matmul_TFLOPs']:.0f} TFLOP/s")
    res["offsets64_rel_err"] = err = check_offsets64()
    print(f"input of {66 * 256 * 128 * 32 * 32:,} elements (> 2^31): last student's relative error {err:.1e}")
    print("model K  N   C   HxW    Co  RxS s | fwd ms (TF/s, x cuDNN) | dgrad | wgrad")
    path = os.path.join(OUT, "gpu_conv.json")
    res["fused"] = []
    for shape, shared in (((256, 3, 32, 32, 32, 5, 5, (1, 1), (2, 2)), True),  # `cnn`, K = 64
                          ((256, 32, 16, 16, 64, 5, 5, (1, 1), (2, 2)), False)):
        try:
            row = run_fused(64, shape, shared)
        except Exception as exc:  # noqa: BLE001 - recorded
            row = {"shape": str(shape), "error": f"{type(exc).__name__}: {exc}"[:300]}
        res["fused"].append(row)
        print("fused conv+relu+pool", row, flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    for name, K in (("cnn", 64), ("resnet18", 32), ("cnn4", 64)):
        for shape in bench.per_student_conv_shapes(name, dev):
            try:
                row = run_layer(K, shape)
            except Exception as exc:  # a failed shape is a result too: keep going, record it
                row = {"K": K, "shape": str(shape), "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(name, row)
                res["rows"].append({"model": name, **row})
                continue
            res["rows"].append({"model": name, **row})
            print(f"{name:8s} {K:3d} {row['N']:3d} {row['C']:3d} {row['H']:3d}x{row['W']:<3d} {row['Co']:3d} "
                  f"{row['R']}x{row['S']} {row['stride']} | " + " | ".join(
                      f"{row[f'{p}_ms']:.3f} ({row[f'{p}_TFLOPs']:.0f}, {row[f'{p}_speedup_vs_cudnn']:.2f}x)"
                      for p in ("fwd", "dgrad", "wgrad")) + f"  err {row['fwd_rel_err']:.1e}; channels-last "
                  + ", ".join(f"{row[f'{p}_channels_last_ms']:.3f}" for p in ("fwd", "dgrad", "wgrad"))
                  + f" (relayout {row['relayout_x_ms']:.3f})", flush=True)
            with open(path, "w") as f:  # after every layer: a timeout keeps what was measured
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
