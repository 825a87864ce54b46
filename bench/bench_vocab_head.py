"""The engine's head route (KD through the output layer chunk by chunk over the vocabulary) against
its native route and the stock-PyTorch baselines, for the bench's transformer LM by vocabulary:
seconds a pass of K students and the peak memory a pass adds.

Each method runs in a process of its own, after one pass (compilation, route choice, lazy
initialisation), so that its peak is its own: on a CPU the resident high-water mark over the
timed passes (reset through /proc/self/clear_refs) less what was resident before them, on CUDA
the allocator's peak less what was allocated. The methods run in alternating rounds and each
keeps its best time.

    python bench/bench_vocab_head.py                    # 32k and 128k vocabularies, K = 4, CPU
    python bench/bench_vocab_head.py --vocab 32000 --k 16 --device cuda
    python bench/bench_vocab_head.py --methods head_cpp,head_numba,head_torch --out bench/results/cpu_vocab_head_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

# engine routes, and the torch.compile'd vmap (bf16 only: the stock-PyTorch baseline)
METHODS = ("native", "head", "compiled", "compiled_head", "compiled_vmap")
# the head route with its chunks' kernels named (CPU): "head" takes the default, C++'s where built
HEAD_KERNELS = ("head_cpp", "head_numba", "head_torch")


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(method, precision, vocab, K, reps, device):
    from fastagg.bench import TinyLM, vmap_baseline
    from fastagg.engine import StudentGradEngine
    from fastagg.flat import ParamSpec

    torch.manual_seed(0)
    model = TinyLM(vocab=vocab).to(device).eval()
    proxy = torch.randint(0, vocab, (16, 32), device=device)
    spec = ParamSpec.from_module(model)
    theta = spec.flatten(model.state_dict()).to(device)
    students = theta + 0.01 * torch.randn(K, theta.numel(), device=device)
    out = torch.empty_like(students)
    with torch.no_grad():
        probs = torch.softmax(model(proxy) / 3.0, -1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if method == "compiled_vmap":
        fn = torch.compile(vmap_baseline(model, spec, proxy, probs, 3.0, precision == "bf16"))
        run = lambda: fn(students)  # noqa: E731
    else:
        conv = "head" if "head" in method else "native"
        backend = method.split("_")[1] if method in HEAD_KERNELS else "auto"
        eng = StudentGradEngine(model, spec, proxy, 3.0, backend, precision, conv=conv, chunk=None,
                                compile=method.startswith("compiled"))
        eng.only_routes = {"head" if method in HEAD_KERNELS else method}
        run = lambda: eng(students, probs, out=out)  # noqa: E731
    run()  # compilation, route choice, lazy initialisation: not in the peak
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # Linux: reset the resident high-water mark (VmHWM), and measure from what is resident now
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS") * 1024
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024) - base
    return {"seconds": best, "peak_mb": peak / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="32000,128000")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"of {', '.join(METHODS + HEAD_KERNELS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/cpu_vocab_head.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        method, precision, vocab = a.child.split(":")
        print(json.dumps(child(method, precision, int(vocab), a.k, a.reps, a.device)))
        return
    res = {"device": (torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {os.cpu_count()} cores"),
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "K": a.k, "proxy": "16 x 32 tokens", "rows": {}}
    for vocab in (int(v) for v in a.vocab.split(",")):
        for precision in a.precision.split(","):
            methods = [m for m in a.methods.split(",") if not (m == "compiled_vmap" and precision == "fp32")]
            key = f"vocab {vocab}, {precision}"
            row = res["rows"][key] = {}
            for _ in range(a.rounds):
                for m in methods:
                    p = subprocess.run([sys.executable, __file__, "--child", f"{m}:{precision}:{vocab}", "--k",
                                        str(a.k), "--reps", str(a.reps), "--device", a.device],
                                       capture_output=True, text=True)
                    if p.returncode:
                        row[m] = {"failed": p.stderr.strip().splitlines()[-1][:300]}
                        continue
                    got = json.loads(p.stdout.strip().splitlines()[-1])
                    prev = row.get(m)
                    row[m] = got if prev is None or "failed" in prev or got["seconds"] < prev["seconds"] else prev
                    row[m]["peak_mb_runs"] = (prev or {}).get("peak_mb_runs", []) + [round(got["peak_mb"])]
            cells = ", ".join(f"{m} {v['seconds'] * 1e3:.0f} ms / {v['peak_mb']:.0f} MB" if "seconds" in v
                              else f"{m} failed" for m, v in row.items())
            print(f"{key}, K = {a.k}: {cells}", flush=True)
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
