"""Timing candidates against each other where an op chooses its method per shape at first use
(the shared chain's forward and weight gradient in fastagg.kernels.shared_conv, the dense ops'
variants in fastagg.ops.dense_conv)."""

from __future__ import annotations

import time
import warnings

import torch


def time_each(methods, run, device, reps=3, how=None, name=str):
    """{method: ms} for each of ``methods``: ``run(method)`` once (compilation, autotuning and
    library searches out of the timing), then ``reps`` times, each timed, the median kept. A
    method that runs out of device memory is timed as infinitely slow.

    On a GPU each method's run is captured as a CUDA graph after its warm-up, and the graph's
    replays are timed with events: the method's device time, as the engine's captured passes run
    it. Timed uncaptured, the host's launches between the kernels count too, and for small layers
    they are all there is: on the H100 (twentieth session) every ResNet-18 layer's dense forward
    over 32 students measured 3.7-4.8 ms uncaptured, its FLOPs anywhere from 0.3 to 4.8 GFLOP a
    student, so the variants were chosen on the host's noise. If any method cannot be captured,
    all are timed uncaptured (events around ``run`` on the current stream). Elsewhere the host
    clock. ``how`` (a dict): "timed" is set to which of these was done.

    A method whose warm-up raises anything else (a kernel that a card or compiler version cannot
    build: Triton's shared-memory limit, ptxas) is left out with a warning, timed as infinitely
    slow, and ``how["failed"]`` says why (keyed by ``name(method)``): one new method must not take
    down a route whose other methods work. If every method fails, the first one's error is raised."""
    cuda = device.type == "cuda"
    ms, ok, failed, first_error = {}, [], {}, None
    for method in methods:
        try:
            run(method)
        except torch.cuda.OutOfMemoryError:
            ms[method] = float("inf")
            continue
        except Exception as exc:  # noqa: BLE001 - said in ``how`` and warned; raised if none runs
            first_error = first_error or exc
            ms[method] = float("inf")
            failed[name(method)] = f"{type(exc).__name__}: {exc}"[:300]
            warnings.warn(f"fastagg: {name(method)} failed and is left out of this choice ({failed[name(method)]})",
                          RuntimeWarning, stacklevel=2)
            continue
        ok.append(method)
    if not ok and first_error is not None:
        raise first_error
    graphs, why = {}, None
    if cuda:
        try:
            for method in ok:
                try:
                    graphs[method] = _capture(run, method, device)
                except torch.cuda.OutOfMemoryError:
                    ms[method] = float("inf")
        except Exception as exc:  # noqa: BLE001 - said in ``how``, and every method timed uncaptured
            graphs, why = {}, f"{type(exc).__name__}: {exc}"[:200]
    for method in ok:
        if method in ms:
            continue
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graphs[method].replay() if method in graphs else run(method)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                run(method)
                times.append((time.perf_counter() - t0) * 1e3)
        ms[method] = sorted(times)[reps // 2]
    if how is not None:
        how["timed"] = ("host clock" if not cuda else "CUDA graph replays" if why is None
                        else f"uncaptured launches (capture failed: {why})")
        if failed:
            how["failed"] = failed
    return ms


def _capture(run, method, device):
    """``run(method)`` captured as a CUDA graph (its temporaries in the graph's own pool), after one
    more warm-up on a side stream as a capture wants (the engine's captures do the same)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run(method)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: as the engine's captures (a server thread staging meanwhile is not refused)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run(method)
    return graph
