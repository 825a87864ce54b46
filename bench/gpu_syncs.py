"""Where the host waits for the GPU during the server step (device session only).

    python bench/gpu_syncs.py          # prints the synchronising call sites and their counts

The seventh session's H100 figures had the host-update step near ingest + correction, as if the
host waited for each buffer's correction before ingesting the next. This runs the `cnn` step
(K = 32, bf16 correction, host updates) with ``torch.cuda.set_sync_debug_mode("warn")`` after a
warm-up, and counts the synchronising calls by the fastagg line that made them: each one is a
place where ingest stops overlapping the device's work.
"""

from __future__ import annotations

import collections
import traceback
import warnings

import torch

from fastagg import Aggregator, FedBuff, KDCorrection, staleness
from fastagg import bench as fb


def main(K=32, buffers=3):
    if not torch.cuda.is_available():
        print("gpu_syncs: no CUDA device, nothing to look at")
        return
    model, proxy = fb.make("cnn", "cuda")
    corr = KDCorrection(proxy, precision="bf16", steps=1, min_staleness=1, staleness_factor="none", schedule=1.0,
                        cuda_graphs=True, chunk=None, conv="native")
    agg = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=corr, device="cuda",
                     max_versions=4)
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
    torch.cuda.synchronize()
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


if __name__ == "__main__":
    main()
