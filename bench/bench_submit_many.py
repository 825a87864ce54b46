"""The aggregator's host-side work per update: ``submit`` one at a time against ``submit_many``.

    python bench/bench_submit_many.py --out bench/results/cpu_submit_many.json

A small model (P = 340), so that the copies are negligible and what is timed is the server's
bookkeeping per update: argument checks, admission (staleness, duplicates), the norm check,
the buffer's records, and per buffer the merge (FedBuff(K), no correction). At the 15,000
updates/s that issue 6 asks of one GPU an update has 67 us in all, so this is the share of it
that the host spends before any byte moves.

Three paths, medians of alternating rounds, K = 128 updates a buffer:
- a CPU aggregator, ``submit`` per update (host staging into its delta rows);
- the GPU aggregator's paths, run on the CPU with an ingest that copies at once (the pinned rows
  and the side stream replaced by plain tensors): ``submit`` per update (staged, then copied),
  and ``submit_many`` of the buffer as one [K, P] tensor (the batched path: one copy and one norm
  reduction per buffer). On a GPU the per-update path also reads each norm back (a device sync
  per update, waiting for the work queued before it); the batched path reads once per buffer.
  That part is the GPU's to measure (``fastagg bench``'s ``step_device_batched_per_s``).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import fastagg
import fastagg.aggregator as fa
from fastagg import bench as fb


class _Done:
    def synchronize(self):
        pass


class _ImmediateIngest:
    """fastagg.aggregator._Ingest with its copies done at once on the host (no stream, no pinning)."""

    @staticmethod
    def used_on(device):
        return True

    @staticmethod
    def pinned(rows, numel, dtype):
        return torch.empty(rows, numel, dtype=dtype)

    def __init__(self, device):
        pass

    def copy(self, dst, src, after=None):
        dst.copy_(src)
        return _Done()

    def join(self):
        pass

    def mark(self):
        return _Done()


def main(out, K=128, buffers=8, rounds=7):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    P = sum(p.numel() for p in model.parameters())
    rows = 0.01 * torch.randn(buffers, K, P)
    cpu = fastagg.Aggregator(model, fastagg.FedBuff(K), backend="torch", max_staleness=8)
    real = fa._Ingest
    fa._Ingest = _ImmediateIngest
    try:
        staged = fastagg.Aggregator(model, fastagg.FedBuff(K), backend="torch", max_staleness=8)
        batched = fastagg.Aggregator(model, fastagg.FedBuff(K), backend="torch", max_staleness=8)
    finally:
        fa._Ingest = real
    ids = iter(range(1 << 62))

    def one_by_one(agg):
        for b in range(buffers):
            base = max(0, agg.version - 1)
            for r in rows[b]:
                agg.submit(r, base_version=base, num_samples=10, client_id=next(ids))

    def many(agg):
        for b in range(buffers):
            got = agg.submit_many(rows[b], base_versions=max(0, agg.version - 1), num_samples=10,
                                  client_ids=[next(ids) for _ in range(K)])
            assert all(isinstance(g, fastagg.Receipt) for g in got)

    n = buffers * K
    paths = {"cpu_submit": (lambda: one_by_one(cpu), n), "staged_submit": (lambda: one_by_one(staged), n),
             "batched_submit_many": (lambda: many(batched), n)}
    rates = fb.interleaved(paths, "cpu", rounds=rounds, warmup=1)  # alternating rounds, medians
    us = {k: 1e6 / rate for k, rate in rates.items()}
    assert cpu.version == staged.version == batched.version
    torch.testing.assert_close(staged.params, cpu.params)  # the same updates, the same model
    torch.testing.assert_close(batched.params, cpu.params)
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "python": platform.python_version(), "P": P, "K": K,
           "buffers": buffers, "rounds": rounds, "us_per_update": us,
           "staged_over_batched": us["staged_submit"] / us["batched_submit_many"],
           "share_of_15000_per_s_budget": {k: v / (1e6 / 15000) for k, v in us.items()}}
    for k, v in us.items():
        print(f"{k:22s} {v:6.1f} us per update ({100 * v / (1e6 / 15000):.0f}% of 67 us)")
    print(f"staged submit / batched submit_many: {res['staged_over_batched']:.1f}x")
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    main(a.out, rounds=a.rounds)
