"""`fastagg bench` runs end to end on the CPU (tiny sizes) and writes what its tables are made of,
so that a device session does not spend its minutes finding a broken harness."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastagg import bench
from fastagg.cli import main


def test_bench_cli_writes_stages_floors_baselines_and_routes(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--models", "lm", "--no-sweep", "--no-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["torch"] == torch.__version__ and res["device"].startswith("CPU")
    (r,) = res["models"]
    assert r["complete"] is True and "partial_correction_rates" not in r
    assert r["model"] == "lm" and r["P"] == sum(p.numel() for p in bench.make("lm", "cpu", small=True)[0].parameters())
    for stage in ("decode_per_update", "ingest_per_update", "teacher_per_version", "correction", "merge",
                  "step_per_update", "step_bf16_per_update"):
        assert r["stages_ms"][stage] > 0 and r["floors_ms"][stage] > 0  # every stage against its floor
    assert abs(r["stages_ms"]["step_per_update"] - 1e3 / r["step_updates_per_s"]) < 1e-9
    assert abs(r["stages_ms"]["step_bf16_per_update"] - 1e3 / r["step_bf16_updates_per_s"]) < 1e-9
    assert r["floors_ms"]["step_bf16_per_update"] < r["floors_ms"]["step_per_update"]
    assert r["limits"]["copy_GBps"] > 0 and r["limits"]["matmul_TFLOPs"] > 0
    assert abs(r["correction_updates_per_s"] - r["K"] / (r["stages_ms"]["correction"] / 1e3)) < 1e-6 * r["K"] * 1e3
    assert set(r["baseline_updates_per_s"]) == {"per_client_eager_fp32", "vmap_fp32", "vmap_bf16"}
    # no convolutions, K = 4: nothing below K for chunk="auto" to time, so one pass of all four
    assert r["chunk"] == "auto" and r["students_per_pass"] == r["K"] and r["route"] == {str(r["K"]): "native"}
    # by backend: every CPU backend here, each op timed, and the backends' models agree after a buffer
    dev, host = bench.backends_here("cpu")
    assert "torch" in dev and set(r["by_backend"]) == set(dev) | set(host)
    for b, v in r["by_backend"].items():
        assert v["stage_ms_per_update"] > 0 and v["merge_ms"] > 0 and v["kd_loss_grad_ms"] > 0, b
        assert v["step_updates_per_s"] > 0 and 0 <= v["max_rel_diff"] < 1e-5, b
    assert r["by_backend"][dev[0]]["max_rel_diff"] == 0


def test_backends_here_lists_the_available_ones_for_each_device(monkeypatch):
    avail = {"torch": (True, ""), "triton": (True, "interpreter"), "cpp": (False, "not built"), "numba": (True, "")}
    monkeypatch.setattr(bench.backends, "available", lambda: avail)
    assert bench.backends_here("cpu") == (["numba", "torch"], ["numba", "torch"])  # no interpreter in a bench
    assert bench.backends_here("cuda") == (["triton", "torch"], ["numba", "torch"])


def test_bench_cli_chunk_sets_the_students_per_pass(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--models", "lm", "--k", "4", "--no-sweep", "--no-compile",
                 "--chunk", "3", "--routes", "native,compiled_dense", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["models"]
    assert r["chunk"] == 3 and r["students_per_pass"] == 3  # passes of 3 and 1 for K = 4
    assert r["routes_allowed"] == ["compiled_dense", "native"] and r["route"] == {"3": "native", "1": "native"}


def test_sweep_reports_one_pass_and_chunked_passes():
    rows = bench.sweep_k("cnn", "cpu", ks=(1, 4), small=True, log=lambda *a: None, chunk=2)
    assert [(r["K"], r["chunk"]) for r in rows] == [(1, "auto"), (1, None), (4, "auto"), (4, None), (4, 2)]
    assert all(r["updates_per_s"] > 0 for r in rows)
    P = sum(p.numel() for p in bench.make("cnn", "cpu", small=True)[0].parameters())
    assert [r["buffer_bytes"] // (2 * P * 4) for r in rows] == [1, 1, 4, 4, 4]
    assert all(r["peak_bytes"] is not None and r["peak_bytes"] >= 0 for r in rows)
    # the first call (route choice, the passes' set-up) measured apart, and what it left behind
    assert all(r["first_call_peak_bytes"] >= 0 and isinstance(r["held_bytes"], int) for r in rows)
    # a CNN on a CPU: "auto" is one student per pass
    assert [r["students_per_pass"] for r in rows] == [1, 1, 1, 4, 2]
    assert rows[2]["route"] == {1: "loop"} and rows[4]["route"] == {2: "loop"}  # convolutions on a CPU


def test_the_sweep_takes_its_settings_and_routes(tmp_path):
    """`fastagg bench --sweep-chunks none,2`: only those settings are swept (2 only for K above
    it), and the flush K is saved; ``routes`` limits each sweep engine's route choice (a CPU's
    engine, compiling, would otherwise pick the loop route: the test above)."""
    out = tmp_path / "sweep.json"
    assert main(["bench", "--device", "cpu", "--models", "", "--sweep-models", "cnn", "--sweep-k", "1,3",
                 "--sweep-chunks", "none,2", "--no-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["sweep"]["cnn"]
    assert [(r["K"], r["chunk"]) for r in rows] == [(1, None), (3, None), (3, 2)]
    assert [r["students_per_pass"] for r in rows] == [1, 3, 2] and all(r["updates_per_s"] > 0 for r in rows)
    assert res["flush_k"]["cnn"] in (1, 3)
    (row,) = bench.sweep_k("cnn", "cpu", ks=(2,), small=True, log=lambda *a: None, settings=(None,),
                           compile=True, routes=("compiled",))
    assert row["route"] == {2: "compiled"} and row["updates_per_s"] > 0


def test_sweep_skips_a_one_pass_row_that_would_not_fit_in_memory(monkeypatch):
    monkeypatch.setattr(bench, "_available_memory", lambda: 10 ** 6)  # 1 MB left
    rows = bench.sweep_k("lm", "cpu", ks=(1, 2), small=True, log=lambda *a: None, chunk=4)
    assert [(r["K"], r["chunk"]) for r in rows] == [(1, "auto"), (1, None), (2, "auto"), (2, None)]
    assert rows[3]["error"].startswith("skipped: one pass would need") and rows[3]["updates_per_s"] is None
    assert rows[2]["updates_per_s"] > 0  # "auto" rows are not extrapolated


def test_sweep_scales_a_one_pass_rows_need_from_its_first_call_too(monkeypatch):
    """The one-pass row's memory is extrapolated from the larger of the last one-pass row's first
    call (route choice over all its students) and its timed passes: a first call of 8 GB at K = 1
    skips K = 2 on a machine with 10 GB available, however little the timed passes took."""
    class Fake:  # first calls 8 GB, timed passes 1 MB, held nothing
        calls = 0

        def __init__(self, device):
            self.bytes = self.held = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            Fake.calls += 1
            self.bytes, self.held = (8 * 10 ** 9 if Fake.calls % 2 else 10 ** 6), 0
            return False

    monkeypatch.setattr(bench, "_PeakMemory", Fake)
    monkeypatch.setattr(bench, "_available_memory", lambda: 10 * 10 ** 9)
    rows = bench.sweep_k("lm", "cpu", ks=(1, 2), small=True, log=lambda *a: None, settings=(None,))
    assert rows[0]["first_call_peak_bytes"] == 8 * 10 ** 9 and rows[0]["peak_bytes"] == 10 ** 6
    assert rows[1]["error"].startswith("skipped: one pass would need ~16 GB")


def test_peak_memory_collects_the_garbage_before_it_starts():
    """Garbage held in a reference cycle is collected before the block's start is read, so that
    the collector running inside the block (here by hand) cannot show a block that freed memory
    it never allocated (the twenty-first session's CPU sweep read "held" as -5 GB)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU memory is read from Linux's /proc")
    import gc

    class Cycle:
        pass

    c = Cycle()
    c.me, c.big = c, torch.ones(50 * 2 ** 20)  # 200 MiB, touched, reachable only through the cycle
    del c
    with bench._PeakMemory("cpu") as mem:
        gc.collect()
    assert mem.held > -50 * 2 ** 20, mem.held / 2 ** 20


def test_bench_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown model"):
        bench.make("vgg", "cpu")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):  # before anything runs
        bench.run("cpu", models=("lm", "vgg"), sweep=False)


def test_a_model_that_fails_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    real, calls = bench.bench_model, []

    def first_fails(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("out of memory, say")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_model", first_fails)
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--models", "lm,lm", "--no-sweep", "--no-compile",
                 "--out", str(out)]) == 1
    failed, ok = json.loads(out.read_text())["models"]
    assert failed["complete"] is False and failed["error"] == "RuntimeError: out of memory, say"
    assert ok["complete"] is True and ok["correction_updates_per_s"] > 0


def test_a_flattened_vmap_baseline_writes_the_engines_layout(rng):
    """The baseline charged with the flat [K, P] buffer (compiled_vmap_bf16_flat, here uncompiled
    and fp32) writes each student's gradients where the engine writes them: equal to the engine's
    fp32 gradients within rounding, parameter by parameter in the spec's order."""
    from fastagg.engine import StudentGradEngine
    from fastagg.flat import ParamSpec

    model, proxy = bench.make("lm", "cpu", small=True)
    model.eval()
    spec = ParamSpec.from_module(model)
    base = spec.flatten(dict(model.named_parameters())).detach()
    students = base + 1e-2 * torch.randn(3, spec.numel, generator=rng)
    with torch.no_grad():
        probs = torch.softmax(model(proxy) / 3.0, -1)
    flat = torch.full((3, spec.numel), float("nan"))
    got = bench.flattened(bench.vmap_baseline(model, spec, proxy, probs, 3.0, False), flat)(students)
    assert got is flat
    _, want = StudentGradEngine(model, spec, proxy, 3.0)(students, probs)
    torch.testing.assert_close(flat, want, rtol=1e-4, atol=1e-6)


def test_autotuned_reports_the_config_each_kernel_kept_per_key(monkeypatch):
    """bench.autotuned: for each autotuned Triton kernel of the modules named, the config its
    autotuner kept for each key it met (a kernel never autotuned reports nothing)."""
    triton = pytest.importorskip("triton")
    import types

    @triton.autotune([triton.Config({"B": 16}, num_warps=4), triton.Config({"B": 32}, num_warps=8)], key=["n"])
    @triton.jit
    def tuned(x_ptr, n, B: triton.language.constexpr):
        pass

    @triton.autotune([triton.Config({"B": 16}), triton.Config({"B": 32})], key=["n"])
    @triton.jit
    def untouched(x_ptr, n, B: triton.language.constexpr):
        pass

    mod = types.ModuleType("fake_kernels")
    mod.tuned, mod.untouched, mod.other = tuned, untouched, 3
    monkeypatch.setitem(sys.modules, "fake_kernels", mod)
    tuned.cache[(1024, "torch.bfloat16")] = tuned.configs[1]
    got = bench.autotuned(("fake_kernels", "not_imported"))
    assert got == {("tuned", ("1024", "torch.bfloat16")): str(tuned.configs[1])}
    assert "B: 32" in got[("tuned", ("1024", "torch.bfloat16"))]


def test_the_rows_kernels_device_check_runs_its_passes(tmp_path, monkeypatch):
    """bench/gpu_rows.py (the rows kernels against cuDNN's per-student ways, pass by pass, on a
    GPU) in its CPU smoke mode: each per-student layer of `cnn` timed for the forward, the weight
    gradient and, with stride 1, the data gradient, written to gpu_rows.json."""
    pytest.importorskip("triton")
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_rows.py"
    spec = importlib.util.spec_from_file_location("gpu_rows", path)
    gpu_rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_rows)
    monkeypatch.setenv("OUT", str(tmp_path))
    res = gpu_rows.main(["--small", "--models", "cnn"])
    (layer,) = res["layers"]  # cnn's second layer: 5x5, stride 1
    assert set(layer["ms"]) == {"forward", "wgrad", "dgrad"} and layer["shape"][5:7] == [5, 5]
    assert all(0 < t < float("inf") for ms in layer["ms"].values() for t in ms.values())
    assert json.loads((tmp_path / "gpu_rows.json").read_text())["layers"] == res["layers"]


def test_rates_count_the_updates_each_timed_call_processes(monkeypatch):
    """With every timed call taking 'one second', each rate must equal the number of updates that
    call processed (a per-client baseline timed on fewer clients than K must not count K)."""
    def one_second(fn, device, reps=5, warmup=2, best=False):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "timeit", one_second)
    r = bench.bench_model("lm", "cpu", K=3, small=True, compile_baseline=False, eager_clients=2,
                          log=lambda *a: None)
    assert bench.STEP_BUFFERS == r["step_buffers"] == 6
    assert r["correction_updates_per_s"] == 3 and r["step_updates_per_s"] == 18  # six buffers of 3
    assert r["step_bf16_updates_per_s"] == 18
    assert r["route_bf16"] == {"3": "native"}  # the CPU's bf16 engine, and the route it ran (the only one here)
    for b, v in r["by_backend"].items():  # six buffers of 3; one-second stagings of 3 updates, merges, KD losses
        assert v["step_updates_per_s"] == 18 and v["stage_ms_per_update"] == pytest.approx(1e3 / 3), b
        assert v["merge_ms"] == v["kd_loss_grad_ms"] == 1e3, b
    assert r["baseline_updates_per_s"] == {"per_client_eager_fp32": 2, "vmap_fp32": 3, "vmap_bf16": 3}
    r = bench.bench_model("lm", "cpu", K=3, small=True, baselines=True, compile_baseline=False, eager_clients=8,
                          log=lambda *a: None)
    assert r["baseline_updates_per_s"]["per_client_eager_fp32"] == 3


def test_interleaved_reports_failures_and_times_the_rest():
    def boom():
        raise RuntimeError("no kernel image")

    calls = []
    rates = bench.interleaved({"ok": (lambda: calls.append(1), 4), "bad": (boom, 4)}, "cpu", rounds=3, warmup=1)
    assert list(rates) == ["ok", "bad"] and rates["bad"] == "failed: RuntimeError"
    assert len(calls) == 4 and rates["ok"] > 0  # one warm-up and three timed rounds


def test_stage_floors_arithmetic():
    """The floors against numbers worked out by hand: P = 1e6 fp32 values (4 MB rows), K = 4,
    3 GFLOP fwd+bwd and 1 GFLOP forward per student, 1 TFLOP/s, 100 GB/s device, 50 GB/s host."""
    lim = {"matmul_TFLOPs": 1.0, "copy_GBps": 100.0, "host_copy_GBps": 50.0}
    f = bench.stage_floors(10 ** 6, 4, 3e9, 1e9, lim, cuda=False)
    assert f["decode_per_update"] == pytest.approx(0.16) and f["ingest_per_update"] == pytest.approx(0.16)
    assert f["teacher_per_version"] == pytest.approx(1.0)
    assert f["correction"] == pytest.approx(12.0)  # FLOPs (12 ms) over bytes (2*4*4 MB / 100 GB/s = 0.32 ms)
    assert f["merge"] == pytest.approx(0.40)  # 10 rows of 4 MB at 100 GB/s
    assert f["step_per_update"] == pytest.approx(0.16 + (1.0 + 12.0 + 0.40) / 4)  # one after the other
    f = bench.stage_floors(10 ** 6, 4, 3e9, 1e9, {**lim, "h2d_GBps": 0.5}, cuda=True)
    assert f["h2d_per_update"] == pytest.approx(8.0)
    assert f["step_per_update"] == pytest.approx(8.0)  # host, copy engine and device overlap: the slowest
    # bf16 updates: half the bytes to decode, stage and copy, and the merge reads the 4 deltas
    # in 2 bytes (4 x 2 MB + 6 x 4 MB at 100 GB/s = 0.32 ms)
    f = bench.stage_floors(10 ** 6, 4, 3e9, 1e9, {**lim, "h2d_GBps": 0.5}, cuda=True, delta_bytes=2)
    assert f["h2d_per_update"] == pytest.approx(4.0) and f["ingest_per_update"] == pytest.approx(0.08)
    assert f["merge"] == pytest.approx(0.32) and f["correction"] == pytest.approx(12.0)
    lim["matmul_TFLOPs"] = 1e6  # bandwidth-bound correction
    assert bench.stage_floors(10 ** 6, 4, 3e9, 1e9, lim, cuda=False)["correction"] == pytest.approx(0.32)


def test_flush_k_is_the_smallest_buffer_within_90_percent_of_the_best():
    rows = [{"K": 1, "updates_per_s": 100.0}, {"K": 16, "updates_per_s": 870.0},
            {"K": 64, "updates_per_s": 960.0}, {"K": 64, "chunk": 16, "updates_per_s": 1000.0},
            {"K": 256, "updates_per_s": None, "error": "out of memory"}]
    assert bench.flush_k(rows) == 64  # 870 < 0.9 * 1000
    rows[1]["updates_per_s"] = 900.0
    assert bench.flush_k(rows) == 16
    assert bench.flush_k([{"K": 8, "updates_per_s": None}]) is None


def test_peak_memory_sees_a_block_allocation():
    with bench._PeakMemory("cpu") as mem:
        big = torch.ones(50 * 2 ** 20)  # 200 MiB, touched
        del big
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU peak is read from Linux's /proc")
    assert 190 * 2 ** 20 <= mem.bytes < 400 * 2 ** 20
    with bench._PeakMemory("cpu") as mem:
        small = torch.ones(2 ** 10)
    assert mem.bytes < 100 * 2 ** 20  # the earlier peak was reset
    del small


@pytest.mark.parametrize("conv", ["loop", "native"])
def test_passes_of_one_student_do_not_pile_up_memory(conv):
    """64 passes of one `cnn` student (4.4 MB of gradients each): the engine's peak stays near one
    pass's, not 64 of them (a small tensor kept alive per pass split the heap's holes so that
    each pass took fresh memory: 1 GB for 256 passes)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU peak is read from Linux's /proc")
    from fastagg import Aggregator, FedBuff, KDCorrection

    model, proxy = bench.make("cnn", "cpu", small=True)
    corr = KDCorrection(proxy, schedule=1.0, chunk=1, conv=conv)
    agg = Aggregator(model, FedBuff(1), correction=corr)
    probs = corr.teacher(agg.params, 0).probs
    students = agg.params + 1e-3 * torch.randn(64, agg.spec.numel)
    out = torch.zeros_like(students)
    corr.engine(students[:2], probs, out=out[:2])
    with bench._PeakMemory("cpu") as mem:
        loss, _ = corr.engine(students, probs, out=out)
    assert loss.shape == (64,) and mem.bytes < 100 * 2 ** 20, mem.bytes / 2 ** 20


def test_a_run_stopped_by_sigterm_saves_what_it_measured(tmp_path):
    """The device script stops a run at its time limit with `timeout` (SIGTERM): the JSON keeps the
    figures measured so far, the row marked incomplete."""
    import signal

    out = tmp_path / "b.json"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "fastagg.cli", "bench", "--device", "cpu", "--models",
                             "lm,cnn", "--no-compile", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait for the first figure of the first model
            if line.startswith("lm: step") and "host updates" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "stopped by signal" in err, err[-2000:]
    (r,) = json.loads(out.read_text())["models"]
    assert r["model"] == "lm" and r["complete"] is False and r["step_updates_per_s"] > 0
    assert "floors_ms" not in r  # stopped before the stages
    # the device script's last table reads such a row too
    summary = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "gpu_summary.py"),
                              str(out)], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    line = next(ln for ln in summary.stdout.splitlines() if ln.startswith("lm (cut short)"))
    assert f"{r['step_updates_per_s']:,.0f}" in line


def test_gpu_summary_says_met_only_when_the_step_and_both_ratios_reach_their_targets(tmp_path):
    """bench/gpu_summary.py's "met": the cnn step at 15,000 is not enough without 3x compiled bf16
    vmap and 9x fp32 vmap."""
    def row(step, corr, compiled, vmap32, threads=None):
        r = {"model": "cnn", "K": 128, "complete": True, "step_updates_per_s": float(step),
             "correction_updates_per_s": float(corr),
             "baseline_updates_per_s": {"compiled_vmap_bf16": float(compiled), "vmap_fp32": float(vmap32)}}
        if threads:  # the step from four submitting threads
            r["step_updates_per_s_4_threads"] = float(threads)
        return r

    cases = {"fast step, low ratio": (row(16000, 9000, 3500, 900), "no"),
             "all met": (row(16000, 11000, 3500, 1200), "yes"),
             "ratios met, slow step": (row(14000, 11000, 3500, 1200), "no"),
             "ratios met, the threaded step fast": (row(14000, 11000, 3500, 1200, threads=15500), "yes"),
             "ratios met, the compute-stream step fast": (
                 {**row(14000, 11000, 3500, 1200), "step_device_updates_compute_stream_per_s": 15500.0}, "yes"),
             "ratios met, the submit_many step fast": (
                 {**row(14000, 11000, 3500, 1200), "step_device_batched_compute_stream_per_s": 15500.0}, "yes")}
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_summary.py"
    for name, (r, want) in cases.items():
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"device": "test", "models": [r]}))
        out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cnn "))
        assert line.split()[13] == want, (name, line)  # the columns: bench/gpu_summary.py's head
    r = row(1455, 2979, 3024, 1046)
    r["by_backend"] = {"triton": {"step_updates_per_s": 1455.0, "stage_ms_per_update": 0.1, "merge_ms": 0.85,
                                  "kd_loss_grad_ms": 0.31, "max_rel_diff": 0.0},
                       "torch": {"step_updates_per_s": 1302.0, "merge_ms": 1.9}}  # a row cut short
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cnn by backend:"))
    assert "triton step 1,455/s, stage 0.100 ms, merge 0.85 ms, KD loss 0.31 ms" in line
    # the per-shape choices, a method that failed named with its error
    r["shared_fwd_ms"] = [{"x": [256, 3, 32, 32], "w": [4096, 3, 5, 5], "dtype": "torch.bfloat16", "tile": 4.1,
                           "resident": 3.2, "columns": float("inf"), "chosen": "resident",
                           "timed": "CUDA graph replays", "failed": {"columns": "OutOfResources: shared memory"}}]
    r["dense_conv_ms"] = [{"op": "backward", "x": [128, 256, 32, 16, 16], "w": [128, 64, 32, 5, 5],
                           "dtype": "torch.bfloat16", "ms": {"backward, cudnn heuristics": 10.7},
                           "chosen": "backward, cudnn heuristics", "timed": "CUDA graph replays"}]
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    chain = next(ln for ln in out.stdout.splitlines() if ln.startswith("cnn chain forward"))
    assert chain.endswith("resident kept (CUDA graph replays); columns failed (OutOfResources: shared memory)")
    dense = next(ln for ln in out.stdout.splitlines() if ln.startswith("cnn dense backward"))
    assert dense.endswith("backward, cudnn heuristics kept (CUDA graph replays)"), dense
    r["autotuned"] = [{"kernel": "_conv_rows", "key": ["256", "torch.bfloat16"], "config": "BM: 128, num_stages: 1"}]
    r["teacher_uncaptured"] = "RuntimeError: capture"
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert "cnn autotuned _conv_rows 256, torch.bfloat16: BM: 128, num_stages: 1" in out.stdout.splitlines()
    assert "cnn teacher ran eagerly (its CUDA-graph capture failed): RuntimeError: capture" in out.stdout.splitlines()
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("cnn by backend:"))
    assert "torch step 1,302/s, stage - ms, merge 1.90 ms" in line
    r["route_ms"] = {"128": {"native": 71.8, "compiled_fused": 25.04, "compiled": 41.9, "gemm_fused": "failed: X"}}
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert ("cnn routes, passes of 128: compiled_fused 25.0, compiled 41.9, native 71.8 ms; failed: gemm_fused"
            in out.stdout.splitlines())
    cut = {k: v for k, v in r.items() if k != "route_ms"}  # stopped during the route choice: seconds so far
    cut["route_seconds"] = {"128": {"native": 0.0718, "compiled_cl": "failed: Y"}}
    path.write_text(json.dumps({"device": "test", "models": [cut]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert "cnn routes, passes of 128: native 71.8 ms; failed: compiled_cl" in out.stdout.splitlines()
    # the chain weight gradient's two methods as the bench saves them (an out-of-memory method: inf)
    r["shared_wgrad_ms"] = [{"x": [256, 3, 32, 32], "dp": [256, 128, 32, 16, 16], "dtype": "torch.bfloat16",
                             "kernel": 12.9, "unpool": 3.14, "chosen": "unpool"},
                            {"x": [256, 3, 32, 32], "dp": [256, 1024, 32, 16, 16], "dtype": "torch.bfloat16",
                             "kernel": 103.2, "unpool": float("inf"), "chosen": "kernel"}]
    r["shared_fwd_ms"] = [{"x": [256, 3, 32, 32], "w": [4096, 3, 5, 5], "dtype": "torch.bfloat16",
                           "tile": 3.14, "resident": 0.97, "chosen": "resident"}]
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert ("cnn chain weight gradient, dp [256, 128, 32, 16, 16] torch.bfloat16: kernel 12.90 ms, unpool 3.14 ms, "
            "unpool kept" in out.stdout.splitlines())
    assert ("cnn chain forward, w [4096, 3, 5, 5] torch.bfloat16: tile 3.14 ms, resident 0.97 ms, resident kept"
            in out.stdout.splitlines())
    assert ("cnn chain weight gradient, dp [256, 1024, 32, 16, 16] torch.bfloat16: kernel 103.20 ms, unpool inf ms, "
            "kernel kept" in out.stdout.splitlines())
    # since the twenty-first session: a third method, and how the methods were timed
    r["shared_fwd_ms"][0].update(columns=1.25, timed="CUDA graph replays")
    path.write_text(json.dumps({"device": "test", "models": [r]}))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
    assert ("cnn chain forward, w [4096, 3, 5, 5] torch.bfloat16: tile 3.14 ms, resident 0.97 ms, columns 1.25 ms, "
            "resident kept (CUDA graph replays)" in out.stdout.splitlines())


def test_threaded_step_merges_every_buffer_once_and_corrects_every_update():
    """The GPU bench's threaded step (four submitting threads, host updates staged at once), here
    on the CPU: every update is accepted once, merged in whole buffers, and corrected (each is
    based on an older version), and an error in a thread reaches the caller."""
    from fastagg import Aggregator, FedBuff, KDCorrection, staleness
    model, proxy = bench.make("cnn", "cpu", small=True)
    corr = KDCorrection(proxy[:4], steps=1, min_staleness=1, staleness_factor="none", schedule=1.0)
    agg = Aggregator(model, FedBuff(4), staleness=staleness.polynomial(0.5), correction=corr, max_versions=4)
    g = torch.Generator().manual_seed(0)
    deltas = [1e-3 * torch.randn(agg.spec.numel, generator=g) for _ in range(4)]
    agg.submit(deltas[0], base_version=0)
    agg.flush()
    counter = [0]
    bench.step_threaded(agg, deltas, 3, 4, counter)
    st = agg.stats()
    assert st["accepted"] == st["merged"] == 13 and st["corrected"] == 12 and st["version"] == 4
    assert counter[0] == 12
    with pytest.raises(Exception, match="shape"):
        bench.step_threaded(agg, [torch.zeros(3)] * 4, 1, 2, counter)


def _bench_script(name):
    """A script of bench/ (not a package) imported as a module."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_gpu_syncs_script_runs_and_profiles_the_host_without_cuda(capsys):
    """bench/gpu_syncs.py (run in the device script) on a CPU: the step's submits under cProfile
    (main asserts that every update was merged), a line per call with the most time of its own,
    and those calls ranked by that time."""
    import cProfile
    import re
    import time

    script = _bench_script("gpu_syncs")
    us = script.main(K=4, buffers=2, device="cpu")
    out = capsys.readouterr().out
    assert us > 0 and "us per submit" in out
    calls = [ln for ln in out.splitlines() if re.match(r"\s+\d+\s+[\d.]+\s+[\d.]+\s+\S", ln)]
    assert len(calls) == 14, out

    def slow():
        time.sleep(0.05)

    prof = cProfile.Profile()
    prof.enable()
    slow()
    sum(range(1000))
    prof.disable()
    first = script.top_calls(prof, 3)[0].split()
    assert first[0] == "1" and 45 <= float(first[1]) < 500 and "sleep" in first[-1]


def test_gpu_profile_second_layer_compares_the_same_gradients(capsys):
    """bench/gpu_profile.py's second-layer comparison on a CPU (the device run's first use of it):
    the grouped convolution's gradients for student 0 equal that student's dense convolution's
    (fp32 here), and each variant is timed or says why not."""
    row = _bench_script("gpu_profile").second_layer(3, 4, 2, 6, 6, 5, 3, 1, torch.device("cpu"))
    assert row["student0_grouped_vs_dense_rel_err"] < 1e-5
    assert row["grouped_cudnn"]["ms"] > 0 and row["dense_loop_graphed"]["ms"] > 0
    assert "dense_loop_graphed" in capsys.readouterr().out


def test_gpu_profile_sums_a_pass_s_ops_by_name_and_reports_a_failure(capsys):
    """bench/gpu_profile.py's per-pass profile (on a CPU its aten ops): the products of a pass
    counted and timed per pass, the launches counted; a pass that raises is reported, not fatal."""
    prof = _bench_script("gpu_profile")._profile
    a, b = torch.randn(300, 200), torch.randn(200, 100)
    row = prof("m", 1, "r", lambda: (a @ b).add_(1).relu_(), torch.device("cpu"), 2)
    mm = next(r for r in row["top"] if r["kernel"] in ("aten::mm", "aten::addmm"))
    assert mm["calls_per_pass"] == 1 and mm["ms_per_pass"] > 0 and row["kernels_per_pass"] >= 3
    assert row["wall_ms_per_pass"] > 0 and "route r" in capsys.readouterr().out
    failed = prof("m", 1, "r", lambda: torch.mm(a, a), torch.device("cpu"), 1)
    assert failed["error"].startswith("RuntimeError") and "failed" in capsys.readouterr().out


def test_bf16_regime_script_measures_the_gradients_against_the_distance():
    """bench/bf16_regime.py: far from the teacher the bf16 KD gradient follows the fp32 one; at the
    teacher the fp32 gradient is rounding (~1e-8 of its size at 0.1) and the bf16 one far larger."""
    far, at = _bench_script("bf16_regime").regime("lm", "cpu", K=2, distances=(1e-1, 0.0))
    assert far["distance"] == 0.1 and far["cos_mean"] > 0.99 and far["rel_err"] < 0.05
    assert at["g32"] < 1e-5 * far["g32"] and at["g16"] > 100 * at["g32"]


@pytest.mark.parametrize("args", [["--models", "cnn,resnet"], ["--routes", "compiled,compiled_dence"],
                                  ["--sweep-models", "lm2"]])
def test_bench_refuses_an_unknown_model_or_route_before_it_runs(args, capsys):
    """A typo in --models raised from inside the run, and one in --routes was dropped in silence
    (the engine then timed its first candidate only): both refused with the names it knows, exit 2."""
    from fastagg import cli

    assert cli.main(["bench", "--device", "cpu", "--no-sweep", *args, "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "unknown model or route" in err and "compiled_dense" in err and "resnet18" in err
