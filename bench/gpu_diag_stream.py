"""Where does the host wait for the compute stream? (CUDA; ~10 s.)

The eighteenth session's H100 run failed test_device_updates_are_taken_while_the_previous_merge_runs
[compute_stream-*]: with merges held back ~25 ms each on the compute stream, the submit after the one
that started a merge returned only once that merge was done. This script holds one kernel of ~25 ms on
a side stream and then makes, one at a time on the current stream, each call that a submit or a merge
makes, asking after each whether the side stream's kernel still runs: the first call that says "no"
waited for it. Then a compute-stream aggregator's submits under cProfile, the merge-starting one and
the next, with the calls that took the time.
"""
import cProfile
import io
import pstats
import time

import torch

import fastagg
import fastagg.aggregator as A
from fastagg.ops.merge import to_device

dev = torch.device("cuda")
side = torch.cuda.Stream()
row, upd = torch.empty(773, device=dev), torch.randn(773, device=dev)
probes = {
    "nothing": lambda: None,
    "row.copy_(device update) (DtoD)": lambda: row.copy_(upd),
    "float(norm) (read-back on the current stream)": lambda: float(torch.linalg.vector_norm(row)),
    "to_device(list) (pin_memory + non-blocking copy)": lambda: to_device([0.5, 0.25, 0.125], torch.float32, dev),
    "torch.empty on the current stream (cached)": lambda: torch.empty(1000, device=dev),
    "torch.empty, a new 64 MB block": lambda: torch.empty(16 << 20, device=dev),
    "Event().record + query": lambda: torch.cuda.Event().record(),
}
print("call on the current stream, while a ~25 ms kernel runs on a side stream: did the host wait for it?")
for name, call in probes.items():
    for _ in range(2):  # the second: warm (caches filled)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
        t = time.perf_counter()
        call()
        ms = 1e3 * (time.perf_counter() - t)
        running = not side.query()
    print(f"  {name:50s} {ms:8.3f} ms  side kernel still running after it: {running}")
torch.cuda.synchronize()

merge = A.fused_merge


def slow_merge(*args, **kw):
    torch.cuda._sleep(50_000_000)
    return merge(*args, **kw)


A.fused_merge = slow_merge
model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
gpu = fastagg.Aggregator(model, fastagg.FedBuff(3), device="cuda", compute_stream=True)
ups = [torch.randn(gpu.spec.numel, device=dev) for _ in range(18)]
torch.cuda.synchronize()
for b in range(6):
    for i in range(3):
        prof = cProfile.Profile() if b >= 3 and i in (2, 0) else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        gpu.submit(ups[3 * b + i], base_version=max(0, gpu.version - 1))
        if prof:
            prof.disable()
        ms = 1e3 * (time.perf_counter() - t)
        print(f"buffer {b} submit {i}: {ms:7.3f} ms, compute stream busy after it: {not gpu._compute.query()}")
        if prof and ms > 5:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(6)
            print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[-900:])
torch.cuda.synchronize()
A.fused_merge = merge
