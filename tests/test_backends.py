"""Backend dispatch: auto picks what is available; an explicit request never falls back silently;
a CPU backend is refused for a model elsewhere; every backend runs a FedADT server as torch does;
the CPU kernels release the GIL while they run."""

import warnings

import pytest
import torch

import fastagg
from fastagg import backends, cpu_cpp, cpu_numba

from conftest import mlp, need_backend, rel_err


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_cache", {})
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes triton available")
    with pytest.raises(backends.BackendUnavailable, match="no CUDA device"):
        fastagg.Aggregator(mlp(), fastagg.FedBuff(1), backend="triton")


def test_auto_on_cpu_never_picks_triton():
    assert backends.resolve("auto", "cpu") in ("cpp", "numba", "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("cuda-magic", "cpu")


@pytest.mark.parametrize("name", ["cpp", "numba", "triton"])
@pytest.mark.parametrize("rule", [fastagg.FedBuff(4, momentum=0.3), fastagg.FedAsync(0.6, batch_size=3)])
def test_aggregator_backend_equals_torch_over_a_fedadt_run(name, rule, rng, device):
    """The same FedADT run (corrected updates, FedBuff with momentum or batched FedAsync) through
    each backend's kernels and through torch's: the same model within fp32 rounding."""
    if name == "triton":
        pytest.importorskip("triton")
    else:
        need_backend(name)
        device = torch.device("cpu")
    proxy = torch.randn(8, 6, generator=rng)
    results = []
    for backend in ("torch", name):
        corr = fastagg.KDCorrection(proxy, steps=2, schedule=fastagg.schedules.constant(1.0))
        agg = fastagg.Aggregator(mlp(), rule, correction=corr, backend=backend, device=device)
        g = torch.Generator().manual_seed(11)
        for _ in range(14):
            lag = int(torch.randint(0, 3, (1,), generator=g))
            agg.submit(0.1 * torch.randn(agg.spec.numel, generator=g).to(device),
                       base_version=max(0, agg.version - lag))
        assert agg.backend == backend and agg.stats()["corrected"] > 0
        results.append(agg.params)
    assert rel_err(results[1], results[0]) < 1e-5


def _kernel_call(mod, op, g):
    """One call of ``op`` that runs 25 ms or more on a 2-core machine (up to 0.6 GB of tensors)."""
    if op == "fused_merge":
        P = 24_000_000
        theta, rows, out = torch.randn(P, generator=g), torch.randn(4, P, generator=g), torch.empty(P)
        return lambda: mod.fused_merge(theta, 0.5, [(rows, [1.0] * 4, None)], out=out)
    if op == "kd_loss_grad":
        logits, probs = torch.randn(2048, 16_000, generator=g), torch.softmax(torch.randn(2, 16_000, generator=g), 1)
        return lambda: mod.kd_loss_grad(logits, probs, 3.0)
    if op == "stage_row":
        src, dst = torch.randn(64_000_000, generator=g), torch.empty(64_000_000, dtype=torch.bfloat16)
        return lambda: mod.stage_row(src, dst)
    K, R, NC = 6, 1536, 8192
    z, p = torch.randn(K, R, NC, generator=g), torch.softmax(torch.randn(R, NC, generator=g), 1)
    if op == "head_stats":
        m, s, pz = torch.full((K, R), -float("inf")), torch.zeros(K, R), torch.zeros(K, R, dtype=torch.float64)
        return lambda: mod.head_stats(z, p, 3.0, m, s, pz)
    return lambda: mod.head_grad(z, p, 3.0, torch.zeros(K, R), 1.0, db=torch.zeros(K, NC))


@pytest.mark.parametrize("op", ["fused_merge", "kd_loss_grad", "head_stats", "head_grad", "stage_row"])
def test_cpu_kernels_release_the_gil_while_they_run(cpu_backend, op, rng):
    """A server's other threads (HTTP handlers decoding the next updates, submitting threads
    staging theirs) keep running while a kernel merges or corrects. A thread that wakes every
    0.1 ms stamps the time; during a kernel that held the GIL its stamps would stop for the
    kernel's whole length."""
    import threading
    import time

    call = _kernel_call(cpu_backend, op, rng)
    call()  # compiled (numba) and warm
    stamps, stop = [], threading.Event()

    def wake():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(1e-4)

    waker = threading.Thread(target=wake)
    waker.start()
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        time.sleep(0.01)
    finally:
        stop.set()
        waker.join()
    inside = [t0] + [t for t in stamps if t0 < t < t1] + [t1]
    longest = max(b - a for a, b in zip(inside, inside[1:]))
    assert t1 - t0 > 0.02, f"{op} ran {1e3 * (t1 - t0):.1f} ms: too short to tell"
    assert longest < 0.5 * (t1 - t0), (f"{op}: no other thread ran for {1e3 * longest:.1f} ms of its "
                                       f"{1e3 * (t1 - t0):.1f} ms (the GIL held)")


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_a_cpu_backend_is_refused_for_a_model_elsewhere(name):
    """Aggregator(backend="cpp" or "numba") for a model that is not in host memory would hand a
    GPU's pointers to host kernels at the first merge: refused when the aggregator is made."""
    with pytest.raises(ValueError, match=f"backend '{name}' runs its kernels on CPU tensors, but the model is on meta"):
        fastagg.Aggregator(mlp(), fastagg.FedBuff(2), device="meta", backend=name)


def test_auto_falls_back_with_a_warning_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(cpu_cpp, "_cpu", None)
    monkeypatch.setattr(cpu_cpp, "_why", "simulated: not built", raising=False)
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_warned", set())
    expected = "numba" if cpu_numba.available()[0] else "torch"
    with pytest.warns(RuntimeWarning, match="cpp kernels unavailable .*simulated: not built.*; using " + expected):
        agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(2))
    assert agg.backend == expected
    monkeypatch.setattr(cpu_numba, "numba", None)
    monkeypatch.setattr(cpu_numba, "_why", "simulated: no numba", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert fastagg.Aggregator(mlp(), fastagg.FedBuff(2)).backend == "torch"


def test_float64_parameters_use_the_torch_backend():
    assert fastagg.Aggregator(mlp(dtype=torch.float64), fastagg.FedBuff(2)).backend == "torch"


def test_a_stale_cpp_build_is_refused_with_what_to_do(monkeypatch):
    """The C++ extension states its calling convention (``abi``). One built from older sources
    (kd_loss_grad took 1/T there, and would now be handed T) must not be used: cpu_cpp reports
    it unavailable and says to rebuild, so that auto passes over it with that warning."""
    import importlib
    import sys
    import types

    need_backend("cpp")
    real = sys.modules["fastagg._cpu"]
    try:
        monkeypatch.setitem(sys.modules, "fastagg._cpu", types.ModuleType("fastagg._cpu"))  # no abi: the old build
        monkeypatch.setattr(importlib.import_module("fastagg"), "_cpu", sys.modules["fastagg._cpu"], raising=False)
        stale = importlib.reload(cpu_cpp)
        ok, why = stale.available()
        assert not ok and "stale build" in why and "pip install -e ." in why
    finally:
        monkeypatch.undo()
        sys.modules["fastagg._cpu"] = real
        importlib.reload(cpu_cpp)
    assert cpu_cpp.available()[0] and cpu_cpp._cpu.abi == cpu_cpp.ABI
