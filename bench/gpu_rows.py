"""Device check: the dense ops' rows-of-taps kernels (fastagg.kernels.grouped_conv:
conv_forward_rows, conv_backward_data_rows, conv_backward_weight_rows) against cuDNN's
per-student convolutions as the dense ops run them (one call per student round four side
streams, each student's operands channels-last), pass by pass, for the per-student layers of the
bench's models in bf16: ms (CUDA-graph replays, as the engine's captured passes run them) and
TFLOP/s of each, the bf16 matmul rate measured in the same run as the limit, and the config each
kernel's autotuner kept (pipelined or single-stage). The dense ops' own per-shape choice times
whole ways (a data and a weight gradient together); this separates the three kernels.

    OUT=out python bench/gpu_rows.py [--models cnn,resnet18] [--K 128]
    ncu --kernel-name regex:_conv_ --launch-skip 40 --launch-count 3 python bench/gpu_rows.py --once

``--once``: each kernel run once after its autotuning, nothing timed (for ncu). ``--small``:
tiny shapes (the CPU smoke test, under TRITON_INTERPRET=1; no cuDNN, no graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastagg import bench
from fastagg.kernels import grouped_conv as gck
from fastagg.ops import dense_conv
from fastagg.ops.timing import time_each


def students_last(t):
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def run_layer(K, shape, device, once=False, reps=5):
    """{pass: {way: ms}} for one layer shape, and the FLOPs of one pass of it."""
    N, C, H, W, CO, R, S, stride, padding = shape
    HO, WO = (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = students_last(torch.randn(K, N, C, H, W, device=device, dtype=dt))
    w = torch.randn(K, CO, C, R, S, device=device, dtype=dt)
    ws = students_last(w)
    dy = students_last(torch.randn(K, N, CO, HO, WO, device=device, dtype=dt))
    y = students_last(torch.empty(K, N, CO, HO, WO, device=device, dtype=dt))
    dx = students_last(torch.empty(K, N, C, H, W, device=device, dtype=dt))
    dw = torch.empty_like(w)
    flops = 2 * K * N * HO * WO * CO * C * R * S
    each = dense_conv._each_student
    cuda = device.type == "cuda"

    def cudnn(kind):
        def one(k):
            if kind == "forward":
                dense_conv._conv_into(y[k], x[k], ws[k], stride, padding)
                return
            mask = [kind == "dgrad", kind == "wgrad", False]
            gx, gw, _ = torch.ops.aten.convolution_backward(dy[k], x[k], ws[k], None, stride, padding, [1, 1],
                                                            False, [0, 0], 1, mask)
            (dx[k] if kind == "dgrad" else dw[k]).copy_(gx if kind == "dgrad" else gw)
        return lambda: each(K, device, one)

    passes = {
        "forward": {"rows": lambda: gck.conv_forward_rows(x, w, stride, padding, out=y)},
        "wgrad": {"rows": lambda: gck.conv_backward_weight_rows(dy, x, w.shape, stride, padding, out=dw)}}
    if tuple(stride) == (1, 1):
        passes["dgrad"] = {"rows": lambda: gck.conv_backward_data_rows(dy, w, x.shape, padding, out=dx)}
    if cuda:
        for kind in passes:
            passes[kind]["cudnn"] = cudnn(kind)
    got = {}
    for kind, ways in passes.items():
        if once:
            for fn in ways.values():
                fn()
            continue
        got[kind] = time_each(list(ways), lambda way: ways[way](), device, reps=reps)
    return got, flops


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--K", type=int, default=None, help="students (default: the bench's K per model)")
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.small else "cuda")
    out_dir = os.environ.get("OUT", "out")
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter smoke run)",
           "torch": torch.__version__, "layers": []}
    if device.type == "cuda":
        res["limits"] = bench.limits(device)
    t0 = time.perf_counter()
    for name in args.models.split(","):
        K = args.K or {"cnn": 128, "cnn4": 64, "resnet18": 32}[name]
        shapes = bench.per_student_conv_shapes(name, device)
        if args.small:  # one image of a few pixels and channels, the taps, strides and padding kept
            K, shapes = 2, [(1, min(C, 8), 6, 5, min(CO, 8), R, S, st, pd)
                            for (_, C, _, _, CO, R, S, st, pd) in shapes[:2]]
        for shape in shapes:
            if shape[6] * shape[1] > gck.ROWS_MAX_RUN:  # what the dense ops leave to cuDNN
                continue
            got, flops = run_layer(K, shape, device, args.once, reps=1 if args.small else 5)
            row = {"model": name, "K": K, "shape": [list(v) if isinstance(v, tuple) else v for v in shape],
                   "gflop": flops / 1e9, "ms": got}
            res["layers"].append(row)
            for kind, ms in got.items():
                print(f"{name} K={K} {shape}: {kind} " + ", ".join(
                    f"{way} {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s)" for way, t in ms.items()), flush=True)
            save(res, out_dir, t0, args.once)  # after each layer: a run stopped by its time limit keeps them
    for t in save(res, out_dir, t0, args.once)["autotuned"]:
        print(f"autotuned {t['kernel']} {', '.join(t['key'])}: {t['config']}")
    return res


def save(res, out_dir, t0, once):
    res["autotuned"] = [{"kernel": k, "key": list(key), "config": c} for (k, key), c in bench.autotuned().items()]
    res["seconds"] = time.perf_counter() - t0
    if not once:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu_rows.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
