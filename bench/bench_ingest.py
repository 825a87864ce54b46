"""Host ingest: staging an update into its row, and concurrent submits.

    python bench/bench_ingest.py --out bench/results/cpu_ingest.json

1. Staging (``fastagg.ops.stage.stage_row``: copy into the row, dtype conversion, the sum of
   squares for the norm check), per update over 16 distinct updates and rows, for fp32 and bf16
   rows: the C++ kernel (1 and all OpenMP threads) and numba against the torch backend — a copy
   then a norm, which is what submit did until the eighth session — and against one plain copy of
   the same bytes (``Tensor.copy_``, the floor), all in the same run, medians of alternating rounds.
2. ``submit(bytes)`` throughput, no correction (FedBuff(16), so merges are a small part), from 1
   and 2 threads: the rows are staged outside the aggregator's lock, so two threads stage at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time

import torch

from fastagg import Aggregator, FedBuff, backends, encode_update
from fastagg import bench as fb
from fastagg.ops.stage import stage_row

N_ROWS = 16


def _median_rounds(paths, rounds):
    times = {k: [] for k in paths}
    for r in range(rounds + 1):
        for k, f in paths.items():
            t = time.perf_counter()
            f()
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) / N_ROWS for k, v in times.items()}


def staging(P, dtype, rounds, g):
    src = [(1e-3 * torch.randn(P, generator=g)).to(dtype) for _ in range(N_ROWS)]
    rows = torch.zeros(N_ROWS, P, dtype=dtype)
    avail = {n: backends.available()[n][0] for n in ("cpp", "numba")}
    threads = backends.cpu_threads()

    def each(fn):
        return lambda: [fn(s, rows[i]) for i, s in enumerate(src)]

    paths = {"copy_floor": each(lambda s, r: r.copy_(s)),
             "torch": each(lambda s, r: stage_row(s, r, "torch"))}
    if avail["cpp"]:
        paths["cpp_1_thread"] = each(lambda s, r: stage_row(s, r, "cpp", threads=1))
        if threads > 1:
            paths[f"cpp_{threads}_threads"] = each(lambda s, r: stage_row(s, r, "cpp", threads=threads))
    if avail["numba"]:
        paths["numba"] = each(lambda s, r: stage_row(s, r, "numba"))
    return _median_rounds(paths, rounds)


def submits(model, P, dtype, n_threads, per_thread, g):
    agg = Aggregator(model, FedBuff(16), delta_dtype=dtype)
    payloads = [encode_update(agg.spec.unflatten(1e-3 * torch.randn(P, generator=g)), base_version=0,
                                dtype=dtype)
                for _ in range(8)]
    count = [0]

    def work(w):
        for i in range(per_thread):
            agg.submit(payloads[(w + i) % len(payloads)], base_version=agg.version, client_id=(w, i, count[0]))

    for warm in (True, False):
        count[0] += 1
        ts = [threading.Thread(target=work, args=(w,)) for w in range(n_threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        dt = time.perf_counter() - t
    return n_threads * per_thread / dt


def run(models=("cnn", "resnet18"), rounds=7):
    res = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "cpu_threads": backends.cpu_threads(), "limits": fb.limits("cpu"),
           "models": []}
    g = torch.Generator().manual_seed(0)
    for name in models:
        model, _ = fb.make(name, torch.device("cpu"), True)
        P = Aggregator(model, FedBuff(1)).spec.numel
        for dtype in (torch.float32, torch.bfloat16):
            ms = staging(P, dtype, rounds, g)
            per = 24 if P < 5e6 else 6
            rate = {n: submits(model, P, dtype, n, per * 2 // n, g) for n in (1, 2)}
            row = {"model": name, "P": P, "dtype": str(dtype).replace("torch.", ""), "stage_ms_per_update": ms,
                   "stage_vs_torch": {k: ms["torch"] / v for k, v in ms.items() if k.startswith(("cpp", "numba"))},
                   "stage_vs_copy_floor": {k: ms["copy_floor"] / v for k, v in ms.items() if k != "copy_floor"},
                   "submit_bytes_per_s": {f"{n}_threads": v for n, v in rate.items()},
                   "two_threads_vs_one": rate[2] / rate[1]}
            res["models"].append(row)
            print(f"{name} {row['dtype']}: stage ms/update " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items())
                  + f"; submit(bytes) {rate[1]:.0f}/s from 1 thread, {rate[2]:.0f}/s from 2 "
                  f"({row['two_threads_vs_one']:.2f}x)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out")
    a = ap.parse_args()
    res = run(tuple(a.models.split(",")), a.rounds)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
