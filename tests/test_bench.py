"""`fastagg bench` runs end to end on the CPU (tiny sizes) and writes what its tables are made of,
so that a device session does not spend its minutes finding a broken harness."""

import json

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
    assert r["model"] == "lm" and r["P"] == sum(p.numel() for p in bench.make("lm", "cpu", small=True)[0].parameters())
    for stage in ("decode_per_update", "ingest_per_update", "teacher_per_version", "correction", "merge"):
        assert r["stages_ms"][stage] > 0
    assert r["floors_ms"]["correction"] > 0 and r["floors_ms"]["merge"] > 0
    assert r["limits"]["copy_GBps"] > 0 and r["limits"]["matmul_TFLOPs"] > 0
    assert abs(r["correction_updates_per_s"] - r["K"] / (r["stages_ms"]["correction"] / 1e3)) < 1e-6 * r["K"] * 1e3
    assert set(r["baseline_updates_per_s"]) == {"per_client_eager_fp32", "vmap_fp32", "vmap_bf16"}
    assert r["chunk"] is None and r["route"] == {str(r["K"]): "native"}  # no convolutions, one pass


def test_sweep_reports_one_pass_and_chunked_passes():
    rows = bench.sweep_k("cnn", "cpu", ks=(1, 4), small=True, log=lambda *a: None, chunk=2)
    assert [(r["K"], r["chunk"]) for r in rows] == [(1, None), (4, None), (4, 2)]
    assert all(r["updates_per_s"] > 0 for r in rows)
    # a CNN on a CPU: the engine's default is one student per pass
    assert rows[1]["route"] == {1: "native"} and rows[2]["route"] == {2: "native"}


def test_bench_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown model"):
        bench.make("vgg", "cpu")


def test_rates_count_the_updates_each_timed_call_processes(monkeypatch):
    """With every timed call taking 'one second', each rate must equal the number of updates that
    call processed (a per-client baseline timed on fewer clients than K must not count K)."""
    def one_second(fn, device, reps=5, warmup=2):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "timeit", one_second)
    r = bench.bench_model("lm", "cpu", K=3, small=True, compile_baseline=False, eager_clients=2,
                          log=lambda *a: None)
    assert r["correction_updates_per_s"] == 3 and r["step_updates_per_s"] == 6  # two buffers of 3
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
