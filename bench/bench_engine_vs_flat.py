"""One bench model's engine, held to one route, against the compiled bf16 vmap with and without its
gradients copied into the flat [K, P] rows that the merge reads: best of many alternating passes
in one process (the whole-step bench's rounds are too few to settle a ~10% gap on a noisy VM).

    python bench/bench_engine_vs_flat.py                  # the small LM on a CPU, K = 4, compiled
    python bench/bench_engine_vs_flat.py --route head --full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from fastagg import bench as B
from fastagg.engine import StudentGradEngine
from fastagg.flat import ParamSpec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lm")
    ap.add_argument("--full", action="store_true", help="the GPU's sizes (default: the CPU's small ones)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--route", default="compiled")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="bench/results/cpu_engine_vs_flat.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, proxy = B.make(a.model, "cpu", small=not a.full)
    model.eval()
    spec = ParamSpec.from_module(model)
    theta = spec.flatten(model.state_dict())
    students = theta + 0.01 * torch.randn(a.k, theta.numel())
    out = torch.empty_like(students)
    with torch.no_grad():
        probs = torch.softmax(model(proxy) / 3.0, -1)
    eng = StudentGradEngine(model, spec, proxy, 3.0, "auto", "bf16", conv="head" if "head" in a.route else "native",
                            chunk=None, compile=a.route.startswith("compiled"))
    eng.only_routes = {a.route}
    compiled = torch.compile(B.vmap_baseline(model, spec, proxy, probs, 3.0, True))
    flat = B.flattened(compiled, torch.empty_like(out))
    fns = {"engine": lambda: eng(students, probs, out=out), "compiled_vmap_bf16": lambda: compiled(students),
           "compiled_vmap_bf16_flat": lambda: flat(students)}
    for f in fns.values():  # compilation and the route's first pass
        f()
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(a.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    res = {"device": f"CPU, {os.cpu_count()} cores", "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "model": a.model, "full": a.full, "K": a.k, "route": eng.routes,
           "rounds": a.rounds, "best_ms": {k: v * 1e3 for k, v in best.items()}}
    print(json.dumps(res["best_ms"]), res["route"])
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
