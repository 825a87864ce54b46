"""Where the host waits for the GPU during the server step, and where its own time goes.

    python bench/gpu_syncs.py          # the synchronising call sites and their counts, then the host profile

The seventh session's H100 figures had the host-update step near ingest + correction, as if the
host waited for each buffer's correction before ingesting the next. This runs the `cnn` step
(K = 32, bf16 correction, host updates) with ``torch.cuda.set_sync_debug_mode("warn")`` after a
warm-up, and counts the synchronising calls by the fastagg line that made them: each one is a
place where ingest stops overlapping the device's work. Then the same buffers again under
cProfile, with the host's time per submit and the calls that took most of it (a wait for the
device shows as time inside the call that waited; the rest is the host's own work). Without
CUDA only the profile runs, on a tiny proxy set (CI runs it so that the device run does not
find a broken script).
"""

from __future__ import annotations

import collections
import cProfile
import pstats
import time
import traceback
import warnings

import torch

from fastagg import Aggregator, FedBuff, KDCorrection, staleness
from fastagg import bench as fb


def main(K=32, buffers=3, device=None):
    """``device``: cuda when there is one; on a CPU (CI's smoke run: tiny proxy set) there is no
    sync to count, only the host profile."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    model, proxy = fb.make("cnn", device, small=not cuda)
    corr = KDCorrection(proxy, precision="bf16" if cuda else "fp32", steps=1, min_staleness=1, staleness_factor="none",
                        schedule=1.0, cuda_graphs=cuda, chunk=None, conv="native", compile=False)
    agg = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=corr, device=device,
                     max_versions=4)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    deltas = [1e-3 * torch.randn(agg.spec.numel, generator=g) for _ in range(K)]
    n = [0]

    def run(nbuf):
        for _ in range(nbuf):
            base = agg.version
            for d in deltas:
                n[0] += 1
                agg.submit(d, base_version=max(0, base - 1), client_id=n[0])

    run(2)  # warm: routes, graphs, the caches
    sync()
    if cuda:
        count_syncs(run, buffers, K)
    us = host_profile(run, buffers, K, sync)
    st = agg.stats()
    assert st["merged"] == n[0] and st["corrected"] == n[0] - K, st  # the first buffer was fresh
    return us


def count_syncs(run, buffers, K):
    """The synchronising calls of ``buffers`` buffers, by the fastagg line that made them."""
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/fastagg/" in f.filename]
        where = f"{frames[-1].filename.split('/fastagg/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames \
            else f"{filename}:{lineno}"
        sites[(where, str(message)[:80])] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(buffers)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    torch.cuda.synchronize()
    print(f"gpu_syncs: {buffers} buffers of {K} host updates, {sum(sites.values())} synchronising calls")
    for (where, msg), count in sites.most_common(12):
        print(f"  {count:5d}  {where}  ({msg})")


def host_profile(run, buffers, K, sync):
    """The same buffers under cProfile: the host's time per submit and the calls that took it.
    Returns the microseconds per submit."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run(buffers)
    prof.disable()
    host = time.perf_counter() - t0
    sync()
    total = time.perf_counter() - t0
    print(f"gpu_syncs: host {1e6 * host / (buffers * K):.0f} us per submit under cProfile "
          f"(device done {1e3 * (total - host):.1f} ms after the last submit); calls, own ms, ms with callees:")
    for line in top_calls(prof, 14):
        print("  " + line)
    return 1e6 * host / (buffers * K)


def top_calls(prof, n):
    """The ``n`` calls with the most time of their own: calls, own ms, ms with callees, where."""
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (prim calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [f"{nc:7d} {1e3 * tt:9.1f} {1e3 * ct:9.1f}  {name if file == '~' else file.split('/')[-1] + ':' + str(line) + ' ' + name}"
            for (file, line, name), (_, nc, tt, ct, _) in rows]


if __name__ == "__main__":
    main()
