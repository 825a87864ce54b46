"""``fastagg bench``: throughput of the whole FedADT server step, stage by stage, against
baselines and limits measured in the same process.

Models: a CIFAR-shaped CNN (~1.1M parameters, 256 proxy inputs; ``cnn4``: a 1.03M-parameter
CNN with three times its FLOPs), a BatchNorm-free ResNet-18-sized CIFAR model (~11.2M, 64 proxy
inputs) and a small transformer language model with a 32k vocabulary. For each: updates/s of
the server step (ingest + KD correction + merge, teacher amortised over the buffer) with
fastagg's engine, and of the correction alone with the
baselines a user has in stock PyTorch: per-client eager autograd, fp32 and bf16
``torch.func.vmap``, ``torch.compile`` of the bf16 vmap; the merge against a Flower-style
per-layer numpy loop. Limits: device copy bandwidth and matmul rate, measured here; the floor of
a stage is max(bytes / bandwidth, FLOPs / rate).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from functools import reduce

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, staleness
from .aggregator import Aggregator, Receipt, _norm_of
from .correction import KDCorrection
from .engine import StudentGradEngine
from .ops.kd_loss import kd_loss_grad
from .ops.merge import fused_merge
from .ops.stage import stage_row
from .rules import FedBuff
from .wire import encode_update


# -- models -------------------------------------------------------------------------------------
class CifarCNN(nn.Module):
    """~1.11M parameters, the FedAvg CIFAR CNN shape (McMahan et al., 2017): two 5x5
    convolutions (32, 64 channels, each followed by 2x2 max-pooling) and two linear layers;
    ~25 GFLOP per corrected update on 256 proxy inputs."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)
        self.f1, self.f2 = nn.Linear(64 * 8 * 8, 256), nn.Linear(256, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


class CifarCNN4(nn.Module):
    """~1.03M parameters with three times the FLOPs of CifarCNN (~75 GFLOP per corrected update
    on 256 proxy inputs): four 3x3 convolutions at 32x32, 16x16 and 8x8, two linear layers."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(64, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1)
        self.f1, self.f2 = nn.Linear(128 * 4 * 4, 384), nn.Linear(384, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = F.max_pool2d(F.relu(self.c4(x)), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, 1)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.b(F.relu(self.a(x)))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class ResNet18NoBN(nn.Module):
    """ResNet-18 for 32x32 inputs without BatchNorm (~11.2M parameters)."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):  # pre-norm block: causal self-attention, then MLP
        B, S, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # explicit attention (S = 32): vmap has batching rules for every op here
        att = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        att = att.masked_fill(torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        a = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.n2(x))))


class TinyLM(nn.Module):
    """Two pre-norm transformer blocks over a 32k vocabulary; logits for every position."""

    def __init__(self, vocab=32000, d=128, heads=4, layers=2, seq=32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(_Attention(d, heads) for _ in range(layers))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos[: tokens.shape[-1]]
        for blk in self.blocks:
            x = blk(x)
        return self.out(self.norm(x)).flatten(0, -2)  # [B * S, vocab]


MODELS = ("cnn", "cnn4", "resnet18", "lm")


def per_student_conv_shapes(name, device):
    """(N, C, H, W, Co, R, S, stride, padding) of each distinct Conv2d of bench model ``name``
    after its first: the first reads the proxy batch all students share (not a per-student
    convolution: the engine's chains or vmap's rule run it), the others a per-student input."""
    model, proxy = make(name, device)
    seen, hooks = {}, []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, inp, out: seen.setdefault(
                (*inp[0].shape, m.out_channels, *m.kernel_size, m.stride, m.padding), None)))
    with torch.no_grad():
        model(proxy)
    for h in hooks:
        h.remove()
    return list(seen)[1:]


def make(name: str, device, small=False):
    """(model, proxy inputs) for 'cnn', 'cnn4', 'resnet18' or 'lm' (``small``: tiny sizes for CPU runs)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("cnn", "cnn4"):
        net = CifarCNN() if name == "cnn" else CifarCNN4()
        return net.to(device), torch.randn(32 if small else 256, 3, 32, 32, generator=g).to(device)
    if name == "resnet18":
        return ResNet18NoBN().to(device), torch.randn(4 if small else 64, 3, 32, 32, generator=g).to(device)
    if name == "lm":
        vocab = 1000 if small else 32000
        return TinyLM(vocab=vocab).to(device), torch.randint(0, vocab, (4 if small else 16, 32), generator=g).to(device)
    raise ValueError(f"unknown model {name!r}; choose cnn, cnn4, resnet18 or lm")


# -- timing and limits ----------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps=5, warmup=2, best=False):
    """Median (``best``: shortest) wall time of ``fn`` over ``reps`` runs after ``warmup``,
    synchronising the device. Limits take the shortest: a limit is what the machine can do."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    while len(times) < reps:
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def interleaved(cands, device, rounds=5, warmup=2):
    """Updates/s of each candidate {name: (fn, updates per call)}, timed in alternating rounds so
    that slow drifts of a shared machine hit every candidate alike (median over the rounds). A
    candidate that fails in its warm-up (out of memory, a compiler error) is reported as the
    failure, not timed: a failed baseline is a result too."""
    rates, live = {}, []
    for name, (fn, _) in cands.items():
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
            live.append(name)
        except torch.OutOfMemoryError:
            rates[name] = "out of memory"
        except Exception as exc:  # noqa: BLE001 - reported in the results
            rates[name] = f"failed: {type(exc).__name__}"
        if name not in live and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    times = {name: [] for name in live}
    for _ in range(rounds):
        for name in live:
            times[name].append(timeit(cands[name][0], device, reps=1, warmup=0))
    for name in live:
        rates[name] = cands[name][1] / statistics.median(times[name])
    return {name: rates[name] for name in cands}


def limits(device):
    """Copy bandwidth (read + write) of the device and of the host, the matmul rate (the fastest
    GEMM measured here), and on CUDA the pinned host-to-device rate: the limits every stage's
    floor is set against."""
    cuda = torch.device(device).type == "cuda"
    n = (1 << 28) if cuda else (1 << 24)
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    copy = timeit(lambda: b.copy_(a), device, reps=10, best=True)
    m = 8192 if cuda else 2048
    dt = torch.bfloat16 if cuda else torch.float32
    x, y = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    rates = {"matmul": 2 * m ** 3 / timeit(lambda: x @ y, device, reps=10, best=True) / 1e12}
    if not cuda:  # the same GEMM through oneDNN (a 1x1 convolution, channels-last): on some CPUs
        # (MKL on AMD) it runs twice as fast as torch.mm, and the convolutions use it
        xc = x.t().reshape(1, m, m // 32, 32).to(memory_format=torch.channels_last)
        wc = y.reshape(m, m, 1, 1)
        rates["onednn_1x1_conv"] = 2 * m ** 3 / timeit(lambda: F.conv2d(xc, wc), device, reps=10, best=True) / 1e12
    res = {"copy_GBps": 2 * n * 4 / copy / 1e9, "matmul_TFLOPs": max(rates.values()), "gemm_TFLOPs": rates,
           "matmul_dtype": str(dt).replace("torch.", "")}
    if cuda:
        del a, b, x, y
        h = torch.randn(1 << 24)
        hb = torch.empty_like(h)
        res["host_copy_GBps"] = 2 * h.numel() * 4 / timeit(lambda: hb.copy_(h), "cpu", reps=10, best=True) / 1e9
        pinned, d = h.pin_memory(), torch.empty(h.numel(), device=device)
        h2d = timeit(lambda: d.copy_(pinned, non_blocking=True), device, reps=10, best=True)
        res["h2d_GBps"] = h.numel() * 4 / h2d / 1e9
    else:
        res["host_copy_GBps"] = res["copy_GBps"]
    return res


def stage_floors(P, K, flops, fwd_flops, lim, cuda, delta_bytes=4):
    """Floors in ms. Per update: ``decode`` (safetensors bytes into a staging row: one copy of the
    P values),
    ``ingest`` (validate and stage a host update: read it once, write it once; the norm check
    can share the read). Per buffer of K: ``correction`` (max of its FLOPs / rate and reading
    the K students and writing their K gradients), ``merge`` (read the K deltas, the K
    correction rows and the model, write the model), and per version ``teacher`` (one forward).
    ``step_per_update``: the whole step per host update (no decode): on CUDA the host, the copy
    engine (pinned host to device) and the device work at once, so the slowest of the three; on a
    CPU one after the other. ``delta_bytes``: 2 for updates sent and buffered in bf16."""
    rate, bw, host = lim["matmul_TFLOPs"] * 1e12, lim["copy_GBps"] * 1e9, lim["host_copy_GBps"] * 1e9
    row, drow = P * 4, P * delta_bytes
    f = {"decode_per_update": 2 * drow / host, "ingest_per_update": 2 * drow / host,
         "teacher_per_version": fwd_flops / rate,
         "correction": max(flops * K / rate, 2 * K * row / bw), "merge": (K * drow + (K + 2) * row) / bw}
    device = (f["teacher_per_version"] + f["correction"] + f["merge"]) / K
    if cuda:
        f["h2d_per_update"] = drow / (lim["h2d_GBps"] * 1e9)
        f["step_per_update"] = max(f["ingest_per_update"], f["h2d_per_update"], device)
    else:
        f["step_per_update"] = f["ingest_per_update"] + device
    return {k: v * 1e3 for k, v in f.items()}


def flops_per_student(model, proxy, backward=True):
    """Forward (+ backward) FLOPs of one student on the proxy batch (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {k: v.detach().clone().requires_grad_(backward and v.is_floating_point())
              for k, v in model.state_dict().items()}
    with FlopCounterMode(display=False) as counter:
        out = torch.func.functional_call(model, params, (proxy,))
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


# -- the correction baselines ----------------------------------------------------------------------
def per_client_eager(model, spec, proxy, probs, T, students):
    grads = []
    for k in range(students.shape[0]):
        params = {n: v.detach().clone().requires_grad_(True) for n, v in spec.unflatten(students[k]).items()}
        z = torch.func.functional_call(model, params, (proxy,))
        loss = T * T * F.kl_div(torch.log_softmax(z.float() / T, -1), probs, reduction="batchmean")
        grads.append(torch.autograd.grad(loss, list(params.values())))
    return grads


def vmap_baseline(model, spec, proxy, probs, T, bf16):
    """Stock PyTorch: torch.func.grad of an eager KL loss, vmap'd over students."""
    def loss_fn(p, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = torch.func.functional_call(model, p, (x,))
        return T * T * F.kl_div(torch.log_softmax(z.float() / T, -1), probs, reduction="batchmean")

    g = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(0, None))
    return lambda students: g(spec.unflatten(students), proxy)


KERNEL_MODULES = ("fastagg.kernels.grouped_conv", "fastagg.kernels.shared_conv", "fastagg.kernels.merge",
                  "fastagg.kernels.kd_loss")


def autotuned(modules=KERNEL_MODULES):
    """{(kernel, key): config} for every autotuned Triton kernel of ``modules`` (those imported):
    the config Triton's autotuner kept for each key it met (its cache; a kernel with one config
    is never timed and has none), e.g. whether a rows kernel kept a pipelined config or a
    single-stage one."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    got = {}
    for modname in modules:
        mod = sys.modules.get(modname)
        for name, obj in vars(mod).items() if mod is not None else ():
            if isinstance(obj, Autotuner):
                for key, cfg in obj.cache.items():
                    got[(name, tuple(str(k) for k in key))] = str(cfg)
    return got


def flattened(grads_fn, flat):
    """``grads_fn(students)``'s per-parameter gradients [K, ...] (a vmap baseline's) copied into
    ``flat`` [K, P] in the spec's order, the layout the engine writes and the merge reads."""
    return lambda students: torch.cat([g.flatten(1) for g in grads_fn(students).values()], 1, out=flat)


def flower_numpy_merge(layers_per_client, weights):
    total = sum(weights)
    scaled = [[layer * w for layer in layers] for layers, w in zip(layers_per_client, weights)]
    return [reduce(np.add, ls) / total for ls in zip(*scaled)]


# -- the benchmark --------------------------------------------------------------------------------
STEP_BUFFERS = 6  # buffers per timed run of the whole step


STEP_THREADS = 4  # submitting threads of the threaded step (a GPU host's handlers)


def step_threaded(agg, deltas, buffers, n, counter):
    """``buffers`` buffers of ``deltas`` submitted by ``n`` threads at once (each a share of the
    updates, based on the version before the current one when it submits), as a server's request
    handlers do: host updates stage in parallel, outside the aggregator's lock."""
    todo = [d for _ in range(buffers) for d in deltas]
    lock, errors_seen = threading.Lock(), []

    def work(share):
        try:
            for d in share:
                with lock:
                    counter[0] += 1
                    cid = counter[0]
                agg.submit(d, base_version=max(0, agg.version - 1), num_samples=10, client_id=cid)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the caller
            errors_seen.append(exc)

    threads = [threading.Thread(target=work, args=(todo[i::n],)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors_seen:
        raise errors_seen[0]
    assert agg.stats()["buffered"] == 0


def backends_here(device):
    """(device backends, host backends) available here: those of the merge and the KD loss on
    ``device`` (triton and torch on CUDA; cpp, numba and torch on a CPU, where triton only runs
    through the interpreter, for tests), and those of staging host updates (cpp, numba, torch)."""
    ok = {name for name, (up, _) in backends.available().items() if up}
    dev = ("triton", "torch") if torch.device(device).type == "cuda" else ("cpp", "numba", "torch")
    return [b for b in dev if b in ok], [b for b in ("cpp", "numba", "torch") if b in ok]


def by_backend(model, corr, agg, host_deltas, step, students, grads, probs, device, log=print):
    """The step and each backend op, per backend (fastagg.backends), timed in this run:

    - ``stage_ms_per_update``: staging a host update into its row with its sum of squares (what
      submit does; a host op, so the CPU backends on either device);
    - ``merge_ms``, ``kd_loss_grad_ms``: the fused merge of the buffer's deltas and correction
      rows, and the KD loss + logit gradient on the buffer's [K * N, C] logits (device ops);
    - ``step_updates_per_s``: the whole step through ``Aggregator(backend=...)``, host updates as
      in the step above. Its correction's engine is the one the step above set up and shares (its
      route, pass size and compiled code; the KD loss inside it keeps the default backend, and a
      compiled route uses no backend op): the backend changes the staging and the merge here.

    ``max_rel_diff``: the largest difference of each backend's model from the first backend's
    after one corrected buffer from the same start, over the largest parameter: the backends
    must agree to rounding. (Not after the timed steps: the bench's repeated synthetic updates
    drive the KD gradient down to its rounding noise, where the relative step, a fixed length
    along g / |g|, turns that noise into full-length steps that differ between backends.)"""
    device = torch.device(device)
    dev_backends, host_backends = backends_here(device)
    K, P = len(host_deltas), agg.spec.numel
    rows = agg._stage_rows
    res = {b: {} for b in dict.fromkeys(host_backends + dev_backends)}
    for b in host_backends:
        threads = backends.cpu_threads() if b == "cpp" else 1
        res[b]["stage_ms_per_update"] = 1e3 / K * timeit(
            lambda: [_norm_of(stage_row(p, rows[i], b, threads=threads), rows[i]) for i, p in enumerate(host_deltas)],
            device, reps=3)
    coefs = [1.0 / K] * K
    merged = torch.zeros_like(agg.params)
    N, C = probs.shape
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(K * N, C, generator=gen).to(device)
    # version 1 from an update of its own: were it one of the buffer's, that student would equal
    # the teacher, whose KD gradient is rounding noise that the relative step scales to full length
    start = 1e-3 * torch.randn(P, generator=gen)
    first = None
    for b in dev_backends:
        res[b]["merge_ms"] = 1e3 * timeit(lambda: fused_merge(agg.params, 1.0, [(students, coefs, None),
                                                                                (grads, coefs, None)],
                                                              out=merged, backend=b), device, reps=5)
        res[b]["kd_loss_grad_ms"] = 1e3 * timeit(lambda: kd_loss_grad(logits, probs, corr.temperature, b),
                                                 device, reps=5)
        c_b = KDCorrection(corr.proxy, precision=corr.precision, steps=1, min_staleness=1, cuda_graphs=corr.cuda_graphs,
                           staleness_factor="none", schedule=1.0)
        a_b = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=c_b, device=device,
                         max_versions=4, backend=b)
        c_b.engine = corr.engine
        a_b.submit(start, base_version=0, num_samples=10)
        a_b.flush()
        for p in host_deltas:  # one buffer, stale by one (corrected), from the same start for each backend
            a_b.submit(p, base_version=0, num_samples=10)
        theta = a_b.params.double()
        first = theta if first is None else first
        res[b]["max_rel_diff"] = float((theta - first).abs().max() / first.abs().max().clamp_min(1e-30))
        t = timeit(lambda: step(a_b, host_deltas), device, reps=2, warmup=1)
        res[b]["step_updates_per_s"] = STEP_BUFFERS * K / t
        del a_b, c_b, theta
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log("  by backend    stage ms/update   merge ms   KD loss ms   step upd/s   max rel diff")
    for b, v in res.items():
        cell = lambda key, f: format(v[key], f) if key in v else "-"  # noqa: E731
        log(f"  {b:<12}{cell('stage_ms_per_update', '>16.3f'):>16}{cell('merge_ms', '>11.3f'):>11}"
            f"{cell('kd_loss_grad_ms', '>13.3f'):>13}{cell('step_updates_per_s', '>13.0f'):>13}"
            f"{cell('max_rel_diff', '>15.1e'):>15}")
    return res


def bench_model(name, device, K=64, baselines=True, compile_baseline=True, small=False, cuda_graphs=True,
                eager_clients=8, log=print, r=None, chunk="auto", backend_rows=True, routes=None):
    """One model's row; ``r``: a dict to fill as the figures come (a run stopped midway keeps
    what it measured), returned. ``routes``: the engine times only these of its candidates."""
    device = torch.device(device)
    model, proxy = make(name, device, small)
    model.eval()
    T = 3.0
    dense = sys.modules.get("fastagg.ops.dense_conv")
    dense_seen = set(getattr(dense, "choices", {}))  # an earlier model's
    tuned_seen = set(autotuned())  # likewise
    if dense is not None:
        dense.relayouts.clear()  # counted from here, for this model
    corr = KDCorrection(proxy, precision="bf16" if device.type == "cuda" else "fp32", steps=1, min_staleness=1,
                        cuda_graphs=cuda_graphs and device.type == "cuda", staleness_factor="none",
                        schedule=1.0, compile=compile_baseline, chunk=chunk)
    agg = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=corr, device=device,
                     max_versions=4)
    spec, P = agg.spec, agg.spec.numel
    # the engine's route timings as they come (seconds; replaced by route_ms at the end): a run
    # stopped during the route choice, which compiles, keeps the routes timed by then
    r = {} if r is None else r
    if routes:
        corr.engine.only_routes = set(routes)
        r["routes_allowed"] = sorted(routes)
    r["route_seconds"] = corr.engine.route_timings
    r["uncaptured"] = corr.engine.uncaptured  # a compiled route whose CUDA-graph capture failed, and why
    g = torch.Generator().manual_seed(1)
    host_deltas = [1e-3 * torch.randn(P, generator=g) for _ in range(K)]
    payloads = [encode_update(spec.unflatten(d), base_version=0, num_samples=10, client_id=i)
                for i, d in enumerate(host_deltas)]
    r.update({"model": name, "P": P, "proxy": int(proxy.shape[0]), "K": K, "device": str(device),
              "precision": corr.precision, "cuda_graphs": corr.cuda_graphs})
    flops = flops_per_student(model, proxy)
    r["gflop_per_update"] = flops / 1e9

    # whole step: K submits (bytes -> validated -> staged -> device), then the correction and merge
    agg.submit(payloads[0])
    agg.flush()  # version 1: every later update is stale by one and gets corrected
    counter = [0]

    def step(a, deltas):
        # STEP_BUFFERS buffers back to back, as a busy server takes them: on a GPU the host ingests
        # each next buffer while the device corrects and merges this one, so the rate approaches
        # the slower of the two (with two buffers, as measured until the seventh session, half of
        # the host's ingest and half of the device's work had nothing to overlap with)
        for _ in range(STEP_BUFFERS):
            base = a.version - 1
            for p in deltas:
                counter[0] += 1
                a.submit(p, base_version=base, num_samples=10, client_id=counter[0])
        assert a.stats()["buffered"] == 0

    def step_batched(a, batch):
        # the same buffers, each one submit_many of its K device updates: one copy and one norm
        # read-back per buffer instead of K
        for _ in range(STEP_BUFFERS):
            ids = list(range(counter[0] + 1, counter[0] + 1 + K))
            counter[0] += K
            got = a.submit_many(batch, base_versions=a.version - 1, num_samples=10, client_ids=ids)
            assert all(isinstance(g, Receipt) for g in got), got
        assert a.stats()["buffered"] == 0

    t_step = timeit(lambda: step(agg, host_deltas), device, reps=2, warmup=1)
    r["step_buffers"] = STEP_BUFFERS
    r["step_updates_per_s"] = STEP_BUFFERS * K / t_step  # host updates: decode-free submit, validation, staging
    eng = corr.engine  # the first buffers chose its pass sizes and routes: say so before going on
    log(f"{name}: step {r['step_updates_per_s']:.0f} upd/s (host updates); students per pass "
        f"{eng.chunks or eng.chunk}, routes {eng.routes} {eng.route_timings}")
    if device.type == "cuda":  # host updates staged by several submitting threads at once
        n = STEP_THREADS
        t_thr = timeit(lambda: step_threaded(agg, host_deltas, STEP_BUFFERS, n, counter), device, reps=2, warmup=1)
        r[f"step_updates_per_s_{n}_threads"] = STEP_BUFFERS * K / t_thr
        log(f"{name}: step {STEP_BUFFERS * K / t_thr:.0f} upd/s (host updates from {n} threads)")
    dev_deltas = [d.to(device) for d in host_deltas]
    t_dev = timeit(lambda: step(agg, dev_deltas), device, reps=2, warmup=1)
    r["step_device_updates_per_s"] = STEP_BUFFERS * K / t_dev  # updates already on the device
    log(f"{name}: step {r['step_device_updates_per_s']:.0f} upd/s (device updates)")
    if device.type == "cuda":  # the buffer's device updates in one submit_many
        dev_batch = torch.stack(dev_deltas)
        t_b = timeit(lambda: step_batched(agg, dev_batch), device, reps=2, warmup=1)
        r["step_device_batched_per_s"] = STEP_BUFFERS * K / t_b
        log(f"{name}: step {STEP_BUFFERS * K / t_b:.0f} upd/s (device updates, a submit_many per buffer)")
    if device.type == "cuda":  # the same with Aggregator(compute_stream=True), the engine shared (as below)
        corr_cs = KDCorrection(proxy, precision=corr.precision, steps=1, min_staleness=1, cuda_graphs=corr.cuda_graphs,
                               staleness_factor="none", schedule=1.0, compile=compile_baseline)
        agg_cs = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=corr_cs,
                            device=device, max_versions=4, compute_stream=True)
        corr_cs.engine = corr.engine
        agg_cs.submit(dev_deltas[0], base_version=0)
        agg_cs.flush()
        t_cs = timeit(lambda: step(agg_cs, dev_deltas), device, reps=2, warmup=1)
        r["step_device_updates_compute_stream_per_s"] = STEP_BUFFERS * K / t_cs
        log(f"{name}: step {STEP_BUFFERS * K / t_cs:.0f} upd/s (device updates, compute_stream=True)")
        t_csb = timeit(lambda: step_batched(agg_cs, dev_batch), device, reps=2, warmup=1)
        r["step_device_batched_compute_stream_per_s"] = STEP_BUFFERS * K / t_csb
        log(f"{name}: step {STEP_BUFFERS * K / t_csb:.0f} upd/s (device updates, submit_many, compute_stream=True)")
        del agg_cs, corr_cs
    # host updates sent and buffered in bf16 (Aggregator(delta_dtype=bf16)): half the bytes to
    # stage, copy to the device and merge. Its correction shares the engine: same model, proxy
    # and device, so the routes and pass sizes chosen above (and their CUDA graphs) hold.
    corr16 = KDCorrection(proxy, precision=corr.precision, steps=1, min_staleness=1, cuda_graphs=corr.cuda_graphs,
                          staleness_factor="none", schedule=1.0, compile=compile_baseline)
    agg16 = Aggregator(model, FedBuff(K), staleness=staleness.polynomial(0.5), correction=corr16, device=device,
                       max_versions=4, delta_dtype=torch.bfloat16)
    corr16.engine = corr.engine
    agg16.submit(host_deltas[0].bfloat16(), base_version=0)
    agg16.flush()
    host16 = [d.bfloat16() for d in host_deltas]
    t16 = timeit(lambda: step(agg16, host16), device, reps=2, warmup=1)
    r["step_bf16_updates_per_s"] = STEP_BUFFERS * K / t16
    del agg16, corr16, host16

    # stages
    rows = agg._staging if agg._staging is not None else agg._deltas
    row = rows[0]
    # what submit does to a host update: stage it, check its norm — each of the K updates into its
    # own row, as in the step (one row and a few updates stay in the caches: on this project's CPU
    # that measured half the time of K distinct ones for `cnn`), with the staging threads a lone
    # submitter gets (until the eighteenth session one thread: the H100 host staged a `cnn` update
    # in 0.81 ms so, while its whole step took 0.37 ms per update with 16)
    th = agg._stage_threads
    t_ingest = timeit(lambda: [_norm_of(agg._write_row(p, rows[i], th), rows[i]) for i, p in enumerate(host_deltas)],
                      device, reps=3) / K
    from .wire import parse_update  # what submit does to bytes: parse the header, copy into the row
    t_decode = timeit(lambda: [agg._write_row(parse_update(p)[0], row, th) for p in payloads[:8]], device, reps=3) / 8
    r["stage_threads"] = th
    teacher = corr.teacher(agg.params, agg.version)
    # in the engine's work rows, as the aggregator's merge passes them (no copies around a replay)
    students, out = corr.engine.work_rows(K, agg.params.dtype)
    torch.add(agg.params, torch.stack([d.to(device) for d in host_deltas]), out=students)
    # the correction, and the stock-PyTorch baselines, timed in alternating rounds
    probs = teacher.probs.float()
    few = students[:eager_clients]
    cands = {"engine": (lambda: corr.engine(students, teacher.probs, out=out), K)}
    if device.type == "cpu":  # the engine runs fp32 on a CPU; one with bf16 units gains from bf16 too
        eng16 = StudentGradEngine(model, spec, corr.proxy, corr.temperature, agg.backend, "bf16",
                                  compile=compile_baseline)
        cands["engine_bf16"] = (lambda: eng16(students, teacher.probs, out=out), K)
    if baselines:
        cands["per_client_eager_fp32"] = (lambda: per_client_eager(model, spec, proxy, probs, T, few), few.shape[0])
        for bf16 in (False, True):
            cands[f"vmap_{'bf16' if bf16 else 'fp32'}"] = (
                (lambda fn: lambda: fn(students))(vmap_baseline(model, spec, proxy, probs, T, bf16)), K)
        if compile_baseline:
            compiled = torch.compile(vmap_baseline(model, spec, proxy, probs, T, True))
            cands["compiled_vmap_bf16"] = (lambda: compiled(students), K)
            # the same with its gradients copied into one flat [K, P] buffer: what the merge reads,
            # and what the engine's figure includes (its passes write that buffer)
            flat_fn = flattened(compiled, torch.empty_like(out))
            cands["compiled_vmap_bf16_flat"] = (lambda: flat_fn(students), K)
    rates = interleaved(cands, device)
    if not isinstance(rates["engine"], float):
        raise RuntimeError(f"{name}: the engine failed: {rates['engine']}")
    r["partial_correction_rates"] = dict(rates)  # kept only if the run stops before the end of the row
    log(f"{name}: correction upd/s " + ", ".join(
        f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()))
    t_corr = K / rates["engine"]
    coefs = [1.0 / K] * K
    merged = torch.zeros_like(agg.params)  # the aggregator merges into a resident buffer (its own parameters)
    t_merge = timeit(lambda: fused_merge(agg.params, 1.0, [(students, coefs, None), (out, coefs, None)],
                                         out=merged, backend=agg.backend), device, reps=5)
    corr.invalidate()
    t_teacher = timeit(lambda: (corr.invalidate(), corr.teacher(agg.params, agg.version)), device, reps=3)
    # with CUDA graphs the teacher's forward is a replay; why not, where its capture failed
    r["teacher_graphed"] = corr._teacher_graph is not None
    r["teacher_uncaptured"] = corr.teacher_uncaptured
    lim = r["limits"] = limits(device)
    r["stages_ms"] = {"decode_per_update": t_decode * 1e3, "ingest_per_update": t_ingest * 1e3,
                      "teacher_per_version": t_teacher * 1e3, "correction": t_corr * 1e3, "merge": t_merge * 1e3,
                      "step_per_update": 1e3 / r["step_updates_per_s"],
                      "step_bf16_per_update": 1e3 / r["step_bf16_updates_per_s"]}
    fwd = flops_per_student(model, proxy, backward=False)
    r["floors_ms"] = stage_floors(P, K, flops, fwd, lim, device.type == "cuda")
    r["floors_ms"]["step_bf16_per_update"] = stage_floors(P, K, flops, fwd, lim, device.type == "cuda",
                                                          delta_bytes=2)["step_per_update"]
    r["correction_updates_per_s"] = rates.pop("engine")
    if "engine_bf16" in rates:
        r["correction_bf16_updates_per_s"] = rates.pop("engine_bf16")
        r["route_bf16"] = {str(k): v for k, v in eng16.routes.items()}  # its own choice, made in its first pass
        r["route_bf16_ms"] = {str(k): {route: t * 1e3 if isinstance(t, float) else t for route, t in v.items()}
                              for k, v in eng16.route_timings.items()}  # what each candidate measured there
    eng = corr.engine  # conv="auto": on CUDA both routes were timed for this K, the faster kept
    r["chunk"] = eng.chunk  # the setting: "auto", None (all K) or students per pass
    per_pass = eng.chunks.get(K, K) if eng.chunk == "auto" else (eng.chunk or K)
    r["students_per_pass"], r["chunk_timings_ms_per_update"] = per_pass, {
        k: {c: t * 1e3 if isinstance(t, float) else t for c, t in v.items()} for k, v in eng.chunk_timings.items()}
    r["route"] = dict(eng.routes)  # pass size -> native / triton / compiled
    r["route_ms"] = {k: {route: t * 1e3 if isinstance(t, float) else t for route, t in v.items()}
                     for k, v in r.pop("route_seconds").items()}
    if "fastagg.kernels.shared_conv" in sys.modules:  # the fused routes' chain kernels, timed per shape
        kern = sys.modules["fastagg.kernels.shared_conv"]
        r["shared_wgrad_ms"] = [{"x": list(key[1]), "dp": list(key[2]), "dtype": str(key[3]), **timed}
                                for key, timed in kern.wgrad_choices.items()]
        r["shared_fwd_ms"] = [{"x": list(key[1]), "w": list(key[2]), "dtype": str(key[3]), **timed}
                              for key, timed in kern.fwd_choices.items()]
    dense = sys.modules.get("fastagg.ops.dense_conv")
    if dense is not None:  # the dense routes' ops: their variants, timed per shape, and their copies
        r["dense_conv_ms"] = [{"op": key[0], "x": list(key[1]), "w": list(key[2]), "dtype": str(key[3]),
                               "ms": rec["ms"], "chosen": rec["chosen"], "timed": rec.get("timed"),
                               **({"failed": rec["failed"]} if rec.get("failed") else {})}
                              for key, rec in dense.choices.items()
                              if key not in dense_seen]
        r["dense_conv_relayouts"] = {k: {"calls": n, "copied": c} for k, (n, c) in dense.relayouts.items()}
    r["autotuned"] = [{"kernel": name, "key": list(key), "config": cfg}  # this model's new keys
                      for (name, key), cfg in autotuned().items() if (name, key) not in tuned_seen]
    log(f"{name}: P={P / 1e6:.2f}M K={K} step {r['step_updates_per_s']:.0f} upd/s (host updates), "
        f"{r['step_bf16_updates_per_s']:.0f} (bf16 host updates), "
        f"{r['step_device_updates_per_s']:.0f} (device updates); correction "
        f"{r['correction_updates_per_s']:.0f} upd/s ({t_corr * 1e3:.2f} ms, floor {r['floors_ms']['correction']:.2f})"
        + (f", bf16 {r['correction_bf16_updates_per_s']:.0f} upd/s" if "correction_bf16_updates_per_s" in r
           else "") + "; "
        f"merge {t_merge * 1e3:.2f} ms (floor {r['floors_ms']['merge']:.2f}); students per pass {per_pass}, "
        f"route {r['route']} {r['route_ms']}")
    log("  stage                 ms     floor ms   floor/measured "
        "(over 100%: cache-resident data, or a limit measured low)")
    for stage, ms in r["stages_ms"].items():
        fl = r["floors_ms"][stage]
        log(f"  {stage:<20}{ms:>9.3f}{fl:>11.3f}{fl / ms:>12.1%}")

    if baselines:
        r["baseline_updates_per_s"] = rates
        layers = [[v.cpu().numpy() for v in spec.unflatten(d).values()] for d in host_deltas[:16]]
        t = timeit(lambda: flower_numpy_merge(layers, [10] * len(layers)), "cpu", reps=2, warmup=1)
        r["flower_numpy_merge_ms_per_update"] = t / len(layers) * 1e3
        log("  baselines (correction upd/s): " + ", ".join(
            f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["baseline_updates_per_s"].items()))
    del r["partial_correction_rates"]
    if backend_rows:  # last: a run stopped by its timeout here has every figure above
        r["by_backend"] = by_backend(model, corr, agg, host_deltas, step, students, out, teacher.probs, device, log)
    return r


def _malloc_trim():
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then miss reused pages
        return


class _PeakMemory:
    """What a block allocates beyond what was allocated when it began, at its peak: the CUDA
    allocator's peak minus its allocation at the start on a GPU; on a CPU (Linux) the peak
    resident set size over the block (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
    the resident size at its start. ``bytes`` is None where neither can be read. ``held``: what
    the block left behind, once the allocator's free cache went back (on a GPU the memory it
    reserves, which counts a captured graph's pool; on a CPU the resident size). Garbage is
    collected first: an earlier engine held in a reference cycle (its compiled routes refer back
    to it) freed by the collector inside the block took its [K, P] rows with it, and the CPU
    sweep of the twenty-first session read "held" as -706 MB at K = 256 and -5,092 MB at 1024."""

    def __init__(self, device):
        self.cuda, self.bytes, self.held = torch.device(device).type == "cuda", None, None

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {field} in /proc/self/status")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base, self._reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            return self
        try:
            _malloc_trim()  # freed heap pages back to the OS, so that reusing them counts as growth
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = self._status("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
            torch.cuda.empty_cache()  # what stays reserved: live tensors and captured graphs' pools
            self.held = torch.cuda.memory_reserved() - self._reserved
        elif self._base is not None:
            self.bytes = self._status("VmHWM") - self._base
            _malloc_trim()
            self.held = self._status("VmRSS") - self._base
        return False


def flush_k(rows, share=0.9):
    """The smallest K whose correction rate is within ``share`` of the best in the sweep: beyond
    it a larger buffer buys little throughput and costs memory and staleness."""
    ok = [r for r in rows if r.get("updates_per_s")]
    if not ok:
        return None
    best = max(r["updates_per_s"] for r in ok)
    return min(r["K"] for r in ok if r["updates_per_s"] >= share * best)


def _available_memory():
    """Bytes the kernel says a new process could still use (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return next((int(l.split()[1]) * 1024 for l in lines if l.startswith("MemAvailable:")), None)


def sweep_k(name, device, ks=(1, 16, 64, 256, 1024), small=False, log=print, chunk=64, rows=None,
            settings=None, compile=False, routes=None):
    """Correction throughput and memory against the buffer size K, for the engine's settings of
    students per pass in ``settings``: ``"auto"`` (its own choice), ``None`` (one pass of all K),
    an int (passes of that many, run only for K above it); by default ``("auto", None, chunk)``.
    The engine is the bench's: bf16 with CUDA graphs on a GPU, ``compile`` (its compiled
    routes), its route choice limited to ``routes`` when given. Memory: ``buffer_bytes`` for
    the students and their gradients [K, P] (the engine's work rows), ``first_call_peak_bytes``
    for what the first call allocates at its peak beyond them (route choice, compilation, warm-up,
    the graph's capture: what a server needs free to start at that K), ``held_bytes`` for what
    stays after it (a captured graph's pool), ``peak_bytes`` for what the timed passes allocate at
    their peak (activations and the vmap'd weights; near zero for a captured pass, whose memory is
    its graph's). A GPU reports a pass that does not
    fit as out of memory; on a CPU, where running out of memory kills the process, a one-pass
    row whose memory (extrapolated from the last one-pass row) would not fit is skipped. ``rows``:
    a list to append the rows to as they are measured (returned)."""
    device = torch.device(device)
    model, proxy = make(name, device, small)
    rows, last_one_pass = [] if rows is None else rows, None
    settings = ("auto", None, chunk) if settings is None else settings
    for K in ks:
        for c in (c for c in settings if not isinstance(c, int) or K > c):
            row = {"K": K, "chunk": c}
            rows.append(row)
            # a one pass row's need, scaled from the last one's: the larger of its first call (the
            # route choice runs every candidate over all K students) and its timed passes (the
            # CPU sweep of the twenty-first session, scaling the timed peak alone, 50 MB at K = 256,
            # started K = 1024, whose first call took the 24 GB machine down: 5.5 GB at 256)
            need = None if c is not None or last_one_pass is None else (
                max(last_one_pass["peak_bytes"], last_one_pass["first_call_peak_bytes"] or 0)
                * K / last_one_pass["K"])
            avail = _available_memory() if device.type == "cpu" else None
            if need is not None and avail is not None and need + 2 * K * 4 * sum(
                    p.numel() for p in model.parameters()) > 0.8 * avail:
                row.update(updates_per_s=None, error=f"skipped: one pass would need ~{need / 1e9:.0f} GB, "
                                                     f"{avail / 1e9:.0f} GB available")
                log(f"  K={K} chunk={c}: {row['error']}")
                continue
            corr = KDCorrection(proxy, precision="bf16" if device.type == "cuda" else "fp32", schedule=1.0, chunk=c,
                                cuda_graphs=device.type == "cuda", compile=compile)
            agg = Aggregator(model, FedBuff(1), correction=corr, device=device)
            if routes:  # the aggregator made the engine
                corr.engine.only_routes = set(routes)
            teacher = corr.teacher(agg.params, 0)
            try:
                # the engine's work rows (as the aggregator's), resident before the measurement starts
                students, out = corr.engine.work_rows(K, agg.params.dtype)
                torch.add(agg.params, 1e-3 * torch.randn(K, agg.spec.numel, device=device), out=students)
                out.zero_()
                row["buffer_bytes"] = 2 * students.numel() * students.element_size()
                with _PeakMemory(device) as first:  # pass sizes, routes, compilation, capture, library set-up
                    corr.engine(students, teacher.probs, out=out)
                row.update(first_call_peak_bytes=first.bytes, held_bytes=first.held)
                with _PeakMemory(device) as mem:
                    t = timeit(lambda: corr.engine(students, teacher.probs, out=out), device, reps=3, warmup=0)
                eng = corr.engine
                per_pass = eng.chunks.get(K, K) if eng.chunk == "auto" else (eng.chunk or K)
                row.update(updates_per_s=K / t, ms=t * 1e3, peak_bytes=mem.bytes, students_per_pass=per_pass,
                           route=eng.routes)
                if c is None and mem.bytes is not None:
                    last_one_pass = row
                mb = lambda b: "?" if b is None else f"{b / 1e6:.0f}"  # noqa: E731
                log(f"  K={K} chunk={c}: {K / t:.0f} upd/s, {t * 1e3:.2f} ms, {per_pass} students per pass, "
                    f"first call peak {mb(first.bytes)} MB, held after it {mb(first.held)} MB, "
                    f"pass peak {mb(mem.bytes)} MB"
                    + f" + students and gradients {row['buffer_bytes'] / 1e6:.0f} MB, route {eng.routes}")
                del students, out
            except torch.OutOfMemoryError:
                row.update(updates_per_s=None, error="out of memory")
                log(f"  K={K} chunk={c}: out of memory")
            finally:
                del agg, corr
                # the engine (held in reference cycles) and its rows freed before the next row
                # allocates its own: on a CPU two rows of 9 GB at once do not fit (the measurement
                # collects again, for its own start)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def run(device="cpu", models=("cnn", "resnet18", "lm"), K=None, sweep=True, small=None, out=None, log=print,
        compile_baseline=True, sweep_models=("cnn",), sweep_ks=(1, 16, 64, 256, 1024), chunk="auto",
        backend_rows=True, routes=None, sweep_settings=("auto", None, 64)):
    device = torch.device(device)
    small = (device.type == "cpu") if small is None else small
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
           "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "models": [], "sweep": {}}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    default_k = ({"cnn": 128, "cnn4": 64, "resnet18": 32, "lm": 16} if not small
                 else {"cnn": 8, "cnn4": 8, "resnet18": 4, "lm": 4})
    def save():  # after every model, and when stopped: a run cut short keeps what it measured
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=1, default=str)

    for name in (*models, *(sweep_models if sweep else ())):
        if name not in default_k:
            raise ValueError(f"unknown model {name!r}; choose cnn, cnn4, resnet18 or lm")
    # `timeout` (the device script) stops a run with SIGTERM: unwind, so that the finally saves
    on_main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _stop) if on_main else None
    try:
        for name in models:
            row = {"model": name, "complete": False}
            res["models"].append(row)
            try:
                bench_model(name, device, K or default_k[name], small=small, log=log, chunk=chunk,
                            compile_baseline=compile_baseline, r=row, backend_rows=backend_rows, routes=routes)
                row["complete"] = True
            except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the next ones run
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{name}: failed: {row['error']}\n{traceback.format_exc()}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save()
        for name in sweep_models if sweep else ():
            log(f"K sweep ({name} correction):")
            rows = res["sweep"][name] = []
            sweep_k(name, device, ks=sweep_ks, small=small, log=log, rows=rows, settings=sweep_settings,
                    compile=compile_baseline, routes=routes)
            res.setdefault("flush_k", {})[name] = k = flush_k(rows)
            log(f"  flush at K = {k}: the smallest K within 90% of the best rate in this sweep")
            save()
    finally:
        save()
        if on_main:
            signal.signal(signal.SIGTERM, before)
    return res


def _stop(signum, frame):
    raise SystemExit(f"fastagg bench: stopped by signal {signum}; what was measured is saved")
