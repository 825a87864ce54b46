"""Bytes into the buffer row: what ``Aggregator.submit(bytes)`` does before validation.

    python bench/bench_decode.py --out bench/results/cpu_decode.json

fastagg reads a payload's safetensors header itself and copies each tensor from the payload's
bytes straight into the row (``wire.parse_update`` + the row write). The baseline, in the same
run: safetensors' loader (``safetensors.torch.load``: the tensors copied out of the bytes) and
then the row write from those tensors, as submit did before. Each figure is the median over
rounds of 8 different payloads, the two paths alternating; the floor is one copy of the payload
at the host copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import safetensors.torch
import torch

from fastagg import Aggregator, FedBuff, encode_update
from fastagg import bench as fb
from fastagg.wire import parse_update


def run(models=("cnn", "resnet18"), rounds=7):
    res = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "limits": fb.limits("cpu"), "models": []}
    host = res["limits"]["host_copy_GBps"] * 1e9
    for name in models:
        model, _ = fb.make(name, torch.device("cpu"), True)
        agg = Aggregator(model, FedBuff(2), backend="torch")
        spec, P = agg.spec, agg.spec.numel
        g = torch.Generator().manual_seed(0)
        payloads = [encode_update(spec.unflatten(1e-3 * torch.randn(P, generator=g)), base_version=0)
                    for _ in range(8)]
        row = agg._deltas[0]
        paths = {"fastagg": lambda p: agg._write_row(parse_update(p)[0], row),
                 "safetensors_load": lambda p: agg._write_row(safetensors.torch.load(bytes(p)), row)}
        times = {k: [] for k in paths}
        for r in range(rounds + 1):
            for k, f in paths.items():
                t = time.perf_counter()
                for p in payloads:
                    f(p)
                if r:  # the first round warms up
                    times[k].append((time.perf_counter() - t) / len(payloads))
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        row_res = {"model": name, "P": P, "payload_MB": len(payloads[0]) / 1e6, "ms_per_update": ms,
                   "speedup": ms["safetensors_load"] / ms["fastagg"],
                   "floor_ms": 1e3 * 2 * P * 4 / host}
        print(f"{name}: P={P / 1e6:.2f}M  fastagg {ms['fastagg']:.3f} ms, safetensors load + write "
              f"{ms['safetensors_load']:.3f} ms ({row_res['speedup']:.1f}x), floor {row_res['floor_ms']:.3f} ms")
        res["models"].append(row_res)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--out")
    a = ap.parse_args()
    out = run(a.models.split(","))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
