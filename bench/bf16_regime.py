"""Where the bf16 correction stops following the fp32 one: the KD gradient against the distance
between student and teacher.

    python bench/bf16_regime.py [--device cpu|cuda] [--simulate] [--out FILE]

The KD gradient vanishes as a student approaches the teacher, while the rounding of a bf16
forward and backward does not: below some distance the bf16 gradient is mostly noise. The
relative step (a fixed length, rho * lambda * |delta|, along g / |g|) then moves the update by
its full length in a direction that is mostly noise. This measures, per model, the fp32 and
bf16 engines' gradients (same students, fp32 teacher) at relative distances
|theta_s - theta_t| / |theta_t| from 1e-1 down to 0: their cosine, the relative L2 error, and
the gradient norms (at 0 the fp32 norm is fp32 rounding, the bf16 one bf16 rounding: the noise
floor). ``--simulate`` also records the distances of the students that `fastagg simulate`
corrects (digits, FedADT-buff, 600 arrivals): the regime real runs are in.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from fastagg import Aggregator, FedBuff, KDCorrection
from fastagg import bench as fb
from fastagg.engine import StudentGradEngine

DISTANCES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 0.0)


def regime(name, device, K=8, distances=DISTANCES, seed=0):
    """Rows of {distance, cos_mean, cos_min, rel_err, g32, g16} for model ``name``."""
    device = torch.device(device)
    model, proxy = fb.make(name, device, small=device.type == "cpu")
    corr = KDCorrection(proxy, precision="fp32", schedule=1.0)
    agg = Aggregator(model, FedBuff(K), correction=corr, device=device)
    theta = agg.params
    teacher = corr.teacher(theta, 0)
    engines = {p: StudentGradEngine(model, agg.spec, corr.proxy, corr.temperature, agg.backend, p, chunk=None,
                                    conv="native")  # the precision is in question here, not the route
               for p in ("fp32", "bf16")}
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(K, theta.numel(), generator=g).to(device)
    d /= d.norm(dim=1, keepdim=True)
    rows = []
    for r in distances:
        students = theta + (r * float(theta.norm())) * d
        g32 = engines["fp32"](students, teacher.probs)[1].double()
        g16 = engines["bf16"](students, teacher.probs)[1].double()
        cos = (g32 * g16).sum(1) / (g32.norm(dim=1) * g16.norm(dim=1)).clamp_min(1e-300)
        rows.append({"distance": r, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "rel_err": float(((g16 - g32).norm(dim=1) / g32.norm(dim=1).clamp_min(1e-300)).mean()),
                     "g32": float(g32.norm(dim=1).mean()), "g16": float(g16.norm(dim=1).mean())})
    return rows


def simulated_distances(arrivals=600):
    """Relative distances of the students `fastagg simulate` corrects (digits, fedadt-buff), by
    quarter of the run: percentiles 5, 50, 95."""
    import fastagg.correction as fc
    import fastagg.simulate as sim

    held, seen = {}, []
    build, correct = sim.build_aggregator, fc.KDCorrection.correct

    def building(*a, **k):
        held["agg"] = build(*a, **k)
        return held["agg"]

    def correcting(self, students, *a, **k):
        theta = held["agg"].params
        seen.extend(((students - theta).norm(dim=1) / theta.norm()).tolist())
        return correct(self, students, *a, **k)

    sim.build_aggregator, fc.KDCorrection.correct = building, correcting
    try:
        curve = sim.run_one("fedadt-buff", sim.SimConfig(dataset="digits", arrivals=arrivals))
    finally:
        sim.build_aggregator, fc.KDCorrection.correct = build, correct
    x, n = np.array(seen), len(seen)
    quarters = [x[i * n // 4:(i + 1) * n // 4] for i in range(4)]
    return {"final_accuracy": curve.accuracy[-1], "corrected": n,
            "percentiles_5_50_95_by_quarter": [np.percentile(q, [5, 50, 95]).tolist() for q in quarters]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="cnn,lm")
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in args.models.split(","):
        res["models"][name] = rows = regime(name, args.device)
        print(f"{name} ({args.device}): distance  cos(bf16, fp32) mean/min  rel. L2 error  |g| fp32  |g| bf16")
        for r in rows:
            print(f"  {r['distance']:8.0e}  {r['cos_mean']:6.3f} {r['cos_min']:6.3f}  {r['rel_err']:12.3g}"
                  f"  {r['g32']:9.2e}  {r['g16']:9.2e}")
    if args.simulate:
        res["simulate_digits_fedadt_buff"] = s = simulated_distances()
        print(f"simulate (digits, fedadt-buff, {s['corrected']} corrections): distances p5/p50/p95 by quarter "
              + "; ".join("/".join(f"{v:.1e}" for v in q) for q in s["percentiles_5_50_95_by_quarter"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
