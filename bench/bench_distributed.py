"""Scale-out of the FedADT-FedBuff server step over torch.distributed ranks (gloo on CPUs).

    python bench/bench_distributed.py                      # cnn and lm (small sizes), K = 8
    python bench/bench_distributed.py --models cnn --updates 16 --out bench/results/cpu_distributed.json

Every configuration serves the same stream: per step K updates of the model, each one version
stale (so each is KD-corrected), split evenly over the ranks. Configurations on the same cores:
one process with every core (a plain ``Aggregator``: what a server without scale-out runs), one
process with one core, and ``--ranks`` processes of one core each (``DistributedAggregator``).
Reported: updates/s of the whole step (the ranks' submits of their shares, then the collective
step: correction, the rank sums, the all-reduce and the update), the all-reduce of the [P] sum
timed alone, and each rate against the one-process rates measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastagg import Aggregator, DistributedAggregator, FedBuff, KDCorrection
from fastagg import bench as fb


def _run(rank, world, threads, model_name, K, reps, init, out):
    """One configuration: ``world`` ranks (0: one plain Aggregator) of ``threads`` threads."""
    distributed = world > 0
    if distributed:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(threads)
    model, proxy = fb.make(model_name, "cpu", small=True)
    model.eval()
    share = K // max(world, 1)
    # the correction `fastagg bench` times: one KD step per update, lambda = 1
    corr = KDCorrection(proxy, steps=1, min_staleness=1, staleness_factor="none", schedule=1.0)
    if distributed:
        agg = DistributedAggregator(model, FedBuff(buffer_size=K), correction=corr, local_capacity=share)
    else:
        agg = Aggregator(model, FedBuff(buffer_size=K), correction=corr)
    g = torch.Generator().manual_seed(rank)
    deltas = [0.01 * torch.randn(agg.spec.numel, generator=g) for _ in range(share)]

    def step():
        base = max(agg.version - 1, 0)
        for i, d in enumerate(deltas):
            agg.submit(d, base_version=base, client_id=f"{rank}.{i}.{agg.version}")
        if distributed:
            agg.step()  # the plain Aggregator merged inside the submit that filled its buffer

    times = []
    for i in range(reps + 2):  # the first two: version 0 -> 1 (nothing stale yet) and a warm-up
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = {"step_s": statistics.median(times[2:]), "P": agg.spec.numel, "corrected": agg.stats()["corrected"]}
    if distributed:
        u = torch.randn(agg.spec.numel)
        ar = []
        for _ in range(10):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(u)
            ar.append(time.perf_counter() - t)
        result["all_reduce_s"] = statistics.median(ar[2:])
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    if distributed:
        os._exit(0)  # past gloo's finalisation abort (see tests/test_distributed.py); the result is written


def configuration(world, threads, model, K, reps):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_run, args=(world, threads, model, K, reps, f"file://{tmp}/store", out),
                           nprocs=max(world, 1), start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,lm")
    p.add_argument("--updates", type=int, default=8, help="K per step, over all ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    if args.updates % args.ranks:
        sys.exit("--updates must be a multiple of --ranks")
    rows = []
    for model in args.models.split(","):
        one_all = configuration(0, cores, model, args.updates, args.reps)
        one_one = configuration(0, 1, model, args.updates, args.reps)
        many = configuration(args.ranks, max(1, cores // args.ranks), model, args.updates, args.reps)
        rate = {k: args.updates / r["step_s"] for k, r in (("one_process_all_cores", one_all),
                                                           ("one_process_one_core", one_one),
                                                           ("ranks", many))}
        rows.append({"model": model, "P": many["P"], "K": args.updates, "ranks": args.ranks,
                     "threads_per_rank": max(1, cores // args.ranks), "updates_per_s": rate,
                     "speedup_vs_one_process_all_cores": rate["ranks"] / rate["one_process_all_cores"],
                     "speedup_vs_one_core": rate["ranks"] / rate["one_process_one_core"],
                     "all_reduce_ms": 1e3 * many["all_reduce_s"],
                     "all_reduce_share_of_step": many["all_reduce_s"] / many["step_s"]})
        r = rows[-1]
        print(f"{model:9s} P={r['P']:>9,d} K={args.updates}: 1 process x {cores} threads "
              f"{rate['one_process_all_cores']:7.1f} upd/s | 1 x 1 {rate['one_process_one_core']:7.1f} | "
              f"{args.ranks} ranks x {r['threads_per_rank']} {rate['ranks']:7.1f} "
              f"({r['speedup_vs_one_process_all_cores']:.2f}x all-core process, "
              f"{r['speedup_vs_one_core']:.2f}x one core); "
              f"all-reduce {r['all_reduce_ms']:.2f} ms = {100 * r['all_reduce_share_of_step']:.1f}% of the step",
              flush=True)
    report = {"machine": platform.processor() or platform.machine(), "cores": cores, "torch": torch.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
