"""Timing candidates against each other where an op chooses its method per shape at first use
(the shared chain's forward and weight gradient in fastagg.kernels.shared_conv, the dense ops'
variants in fastagg.ops.dense_conv)."""

from __future__ import annotations

import time

import torch


def time_each(methods, run, device, reps=3):
    """{method: ms} for each of ``methods``: ``run(method)`` once (compilation, autotuning and
    library searches out of the timing), then ``reps`` times, each timed (CUDA events on the
    current stream on a GPU, the host clock elsewhere), the median kept. A method that runs out
    of device memory is timed as infinitely slow."""
    ms = {}
    for method in methods:
        try:
            run(method)
        except torch.cuda.OutOfMemoryError:
            ms[method] = float("inf")
            continue
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(method)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run(method)
                times.append((time.perf_counter() - t0) * 1e3)
        ms[method] = sorted(times)[reps // 2]
    return ms
