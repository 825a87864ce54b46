"""The engine's loop route against vmap's native one, where the engine picks the loop: a
convolutional model on a CPU, one student per pass.

    python bench/bench_loop_route.py [--out bench/results/cpu_loop_route.json]

Per model and precision: corrected updates/s of ``conv="native"`` (vmap over one student: its
convolutions become grouped convolutions of one group) and ``conv="loop"`` (the model's own
layers, plain autograd), timed in alternating rounds (fastagg.bench.interleaved) on the same
students, the relative L2 difference of their gradients, and in bf16 each route's difference
from its fp32 gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from fastagg import Aggregator, FedBuff, KDCorrection
from fastagg import bench as fb
from fastagg.engine import StudentGradEngine
from fastagg.simulate import make_model


def models():
    yield "cnn", *fb.make("cnn", "cpu", small=True)
    yield "cnn4", *fb.make("cnn4", "cpu", small=True)
    yield "resnet18", *fb.make("resnet18", "cpu", small=True)
    torch.manual_seed(0)  # simulate's Fashion-MNIST net on its 150 proxy images
    yield "simulate_fashion", make_model("fashion-mnist", 784, 10), torch.randn(150, 1, 28, 28)


def run(K=4):
    rows = []
    for name, model, proxy in models():
        corr = KDCorrection(proxy, schedule=1.0)
        agg = Aggregator(model, FedBuff(K), correction=corr, device="cpu")
        probs = corr.teacher(agg.params, 0).probs
        students = agg.params + 1e-3 * torch.randn(K, agg.spec.numel, generator=torch.Generator().manual_seed(1))
        fp32 = {}
        for precision in ("fp32", "bf16"):
            eng = {route: StudentGradEngine(model, agg.spec, corr.proxy, corr.temperature, agg.backend, precision,
                                            conv=route, chunk=1) for route in ("native", "loop")}
            out = {route: torch.empty_like(students) for route in eng}
            rates = fb.interleaved({route: ((lambda e, o: lambda: e(students, probs, out=o))(eng[route], out[route]), K)
                                    for route in eng}, "cpu", rounds=5)
            diff = float((out["loop"] - out["native"]).norm() / out["native"].norm())
            fp32 = fp32 or out  # bf16: each route's error against the fp32 gradients of the same route
            err = {route: float((out[route] - fp32[route]).norm() / fp32[route].norm()) for route in out}
            rows.append({"model": name, "precision": precision, "native_updates_per_s": rates["native"],
                         "loop_updates_per_s": rates["loop"], "loop_vs_native": rates["loop"] / rates["native"],
                         "rel_diff": diff, **({"err_vs_fp32": err} if precision == "bf16" else {})})
            print(f"{name:17s} {precision}: native {rates['native']:7.1f}  loop {rates['loop']:7.1f} upd/s "
                  f"({rates['loop'] / rates['native']:.2f}x), gradients differ by {diff:.1e}"
                  + (f"; against fp32: native {err['native']:.1e}, loop {err['loop']:.1e}" if precision == "bf16" else ""))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = {"device": f"CPU, {os.cpu_count()} cores ({platform.machine()})", "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rows": run()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
