"""Staging host updates: the stage_row kernels (C++, numba) against torch's own conversion and a
float64 sum, and the aggregator's submits that stage outside its lock — in parallel, committed
out of order, failing half-way — against a replay of the same updates one by one."""

import threading
import time

import pytest
import torch

import fastagg
from fastagg import aggregator as agg_mod
from fastagg import backends, errors
from fastagg.ops.stage import stage_row

from conftest import mlp, need_backend

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 4095, 4097, 3 * 4096 + 5]  # empty, one, a block's tail, several blocks


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def _values(n, dtype, g):
    """Normal values scaled over 1e-10 .. 1e5: fp16 subnormals, ordinary values, fp16 overflow."""
    scale = torch.logspace(-10, 5, max(n, 1), dtype=torch.float64)[:n]
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch"])
@pytest.mark.parametrize("n", SIZES)
def test_stage_row_converts_as_torch_does_and_sums_the_stored_squares(backend, n, rng):
    need_backend(backend)
    for src_dtype in FLOATS:
        src = _values(n, src_dtype, rng)
        for dst_dtype in FLOATS:
            for threads in ((1, 2) if backend == "cpp" else (1,)):
                dst = torch.full((n,), float("nan"), dtype=dst_dtype)
                sq = stage_row(src, dst, backend, threads=threads)
                want = src.to(dst_dtype)  # torch's conversion: round to nearest even
                assert torch.equal(_bits(dst), _bits(want)), (src_dtype, dst_dtype, threads)
                ref = float(want.double().square().sum())
                if ref == float("inf"):  # fp16 overflowed to Inf: the sum must say so
                    assert sq == float("inf")
                else:
                    assert sq == pytest.approx(ref, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_stage_row_rounds_every_16_bit_boundary(backend):
    """Every fp16 value, the midpoints between neighbours (ties to even) and one fp32 ulp either
    side of them, subnormals and overflow: the kernels' bit-level fp16 and bf16 rounding equals torch's."""
    need_backend(backend)
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        v = every.view(dtype).float()
        widened = torch.empty(1 << 16)
        stage_row(every.view(dtype), widened, backend)
        assert torch.equal(torch.isnan(widened), torch.isnan(v))
        assert torch.equal(_bits(widened[~torch.isnan(v)]), _bits(v[~torch.isnan(v)]))
        v = torch.sort(v[torch.isfinite(v)]).values
        mid = ((v[1:].double() + v[:-1].double()) / 2).float()
        x = torch.cat([v, mid, torch.nextafter(mid, torch.tensor(float("inf"))),
                       torch.nextafter(mid, torch.tensor(-float("inf"))),
                       torch.tensor([65519.0, 65520.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan"),
                                     2.0 ** -25, -(2.0 ** -25), 2.0 ** -25 * 1.0001, 1e-45, 3e38])])
        dst = torch.empty(x.numel(), dtype=dtype)
        stage_row(x, dst, backend)
        want = x.to(dtype)
        same = (dst.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(dst) & torch.isnan(want))
        assert bool(same.all()), x[~same][:8]


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch"])
def test_stage_row_sum_is_nonfinite_exactly_for_nan_or_inf(backend, rng):
    need_backend(backend)
    src = torch.randn(9000, generator=rng)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = src.clone()
        x[int(torch.randint(0, 9000, (1,), generator=rng))] = bad
        assert not torch.isfinite(torch.tensor(stage_row(x, torch.empty(9000), backend)))
    x = torch.full((9000,), 1e30)  # double accumulation: squares of huge finite fp32 values stay finite
    assert stage_row(x, torch.empty(9000), backend) == pytest.approx(9000 * 1e60, rel=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch"])
def test_stage_row_refuses_what_it_cannot_stage(backend):
    need_backend(backend)
    with pytest.raises(ValueError, match="elements"):
        stage_row(torch.zeros(5), torch.empty(4), backend)
    with pytest.raises(ValueError, match="contiguous"):
        stage_row(torch.zeros(4, 2)[:, 0], torch.empty(4), backend)
    with pytest.raises(TypeError, match="floating"):
        stage_row(torch.zeros(4, dtype=torch.int32), torch.empty(4), backend)
    with pytest.raises(backends.BackendUnavailable, match="CPU backend"):
        stage_row(torch.zeros(4), torch.empty(4), "triton")


# -- the aggregator ------------------------------------------------------------------------------
def _make(rule, correction=None, delta_dtype=None, backend="auto", device="cpu"):
    """On CUDA (FASTAGG_TEST_DEVICE=cuda, the device script) the rows staged into are the pinned
    staging rows, and a commit enqueues the copy to the device; on a CPU they are the delta rows."""
    if torch.device(device).type != "cpu" and backend != "auto":  # the host staging's backend: the GPU aggregator picks its own
        pytest.skip("a GPU aggregator stages through the auto-chosen CPU kernel")
    return fastagg.Aggregator(mlp(), rule, staleness=fastagg.staleness.polynomial(0.5), correction=correction,
                              max_versions=8, delta_dtype=delta_dtype, backend=backend, device=device)


def _hooked(monkeypatch, before):
    """Make the aggregator's stage_row call ``before(src)`` first (in the submitting thread)."""
    real = agg_mod.stage_row

    def hooked(src, dst, *args, **kwargs):
        before(src)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(agg_mod, "stage_row", hooked)


def _run(targets):
    errs = []

    def wrap(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errs.append(exc)

    ts = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in targets]  # a hung one does not hold pytest
    for t in ts:
        t.start()
    return ts, errs


def test_submits_stage_in_parallel_outside_the_lock(monkeypatch, rng, device):
    """Two submits must be inside stage_row at the same time: a barrier of two would time out if
    staging ran under the aggregator's lock."""
    agg = _make(fastagg.FedBuff(4), device=device)
    meet = threading.Barrier(2, timeout=20)
    _hooked(monkeypatch, lambda src: meet.wait())
    deltas = [0.1 * torch.randn(agg.spec.numel, generator=rng) for _ in range(2)]
    ts, errs = _run([lambda d=d, i=i: agg.submit(d, base_version=0, client_id=i) for i, d in enumerate(deltas)])
    for t in ts:
        t.join()
    assert not errs, errs
    assert agg.stats()["buffered"] == 2 and not meet.broken


@pytest.mark.parametrize("delta_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", [fastagg.FedBuff(4, server_lr=0.8), fastagg.FedAsync(0.6, batch_size=4)],
                         ids=["fedbuff", "fedasync"])
@pytest.mark.parametrize("backend", ["auto", "cpp", "numba", "torch"])
def test_out_of_order_commits_merge_as_a_replay_in_seq_order(monkeypatch, rule, delta_dtype, backend, rng, device):
    """Four submits take rows 0..3 in turn and commit in the reverse order, so the buffer's rows
    are [3, 2, 1, 0] when it merges (with the KD correction): the merged model equals that of a
    fresh aggregator fed the same updates one by one in the order of their receipts."""
    if backend != "auto":
        need_backend(backend)
    proxy = torch.randn(12, 6, generator=rng).to(device)

    def make():
        return _make(rule, fastagg.KDCorrection(proxy, steps=1, min_staleness=1), delta_dtype, backend, device)

    agg, replay = make(), make()
    P = agg.spec.numel
    warm = 0.05 * torch.randn(P, generator=rng)
    for a in (agg, replay):  # version 1 (FedAsync: 4): every later update is stale and corrected
        for i in range(rule.capacity):
            a.submit(warm * (i + 1), base_version=a.version, client_id=("warm", i))
    base = agg.version - 1
    deltas = [0.05 * torch.randn(P, generator=rng) for _ in range(4)]
    entered = [threading.Event() for _ in range(4)]
    done = [threading.Event() for _ in range(5)]
    done[4].set()
    owner = {d.data_ptr(): k for k, d in enumerate(deltas)}

    def before(src):
        k = owner[src.data_ptr()]
        entered[k].set()
        assert done[k + 1].wait(20)  # the next one commits first

    _hooked(monkeypatch, before)
    receipts = {}

    def submit(k):
        receipts[k] = agg.submit(deltas[k], base_version=base, client_id=k)
        done[k].set()

    threads, errs = [], []
    for k in range(4):  # reserve rows 0, 1, 2, 3 in this order
        ts, e = _run([lambda k=k: submit(k)])
        threads += ts
        errs = e if not errs else errs
        assert entered[k].wait(20)
    for t in threads:
        t.join()
    assert not errs, errs
    assert [receipts[k].status for k in range(4)] == ["merged"] + ["buffered"] * 3  # row 0's commit filled it
    for k in sorted(range(4), key=lambda k: receipts[k].seq):
        replay.submit(deltas[k], base_version=base, client_id=k)
    assert replay.version == agg.version
    torch.testing.assert_close(agg.params, replay.params, rtol=0, atol=1e-7)
    for key in ("staleness_histogram", "corrected", "merged"):
        assert agg.stats()[key] == replay.stats()[key], key


def _join(threads, seconds=60):
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a submit hangs: waiting for a row that never came back?"


def test_failed_staging_frees_its_row_and_changes_nothing(rng):
    agg = _make(fastagg.FedBuff(2))
    P = agg.spec.numel
    bad = [torch.full((P,), float("nan")), torch.zeros(P + 1), {"nope": torch.zeros(3)}]
    d = [0.1 * torch.randn(P, generator=rng) for _ in range(2)]
    status = []

    def feed():
        for _ in range(5):  # more failures than rows: each one must give its row back
            for b in bad:
                with pytest.raises(errors.InvalidUpdate):
                    agg.submit(b, base_version=0)
        status.extend(agg.submit(x, base_version=0).status for x in d)

    ts, errs = _run([feed])
    _join(ts)
    assert not errs, errs
    assert status == ["buffered", "merged"]
    assert agg.stats()["rejected_total"] == 15 and agg.stats()["accepted"] == 2
    assert sorted(agg._free_rows) == [0, 1] and agg._staging_now == 0


def test_many_threads_with_bad_updates_lose_nothing(rng):
    """Eight threads, a third of their updates bad in three ways: every good one is merged or
    buffered once, every bad one rejected, and the rows all come back."""
    agg = _make(fastagg.FedBuff(5))
    P = agg.spec.numel
    per, good = 60, [0]
    lock = threading.Lock()

    def worker(w):
        g = torch.Generator().manual_seed(w)
        for i in range(per):
            v, _ = agg.pull(flat=True)
            kind = i % 3
            d = 0.01 * torch.randn(P, generator=g)
            if kind == 1 and w % 2:
                d[i] = float("inf")
            elif kind == 1:
                d = d[:-1]
            try:
                agg.submit(d, base_version=v, client_id=(w, i))
                with lock:
                    good[0] += 1
            except errors.InvalidUpdate:
                assert kind == 1

    ts, errs = _run([lambda w=w: worker(w) for w in range(8)])
    _join(ts)
    assert not errs, errs
    st = agg.stats()
    assert st["accepted"] == good[0] == 8 * per * 2 // 3 and st["rejected_total"] == 8 * per // 3
    assert st["merged"] + st["buffered"] == st["accepted"]
    assert agg._staging_now == 0 and len(agg._free_rows) == 5 - st["buffered"]


def test_load_state_dict_waits_for_a_submit_being_staged(monkeypatch, rng):
    agg = _make(fastagg.FedBuff(4))
    P = agg.spec.numel
    agg.submit(0.1 * torch.randn(P, generator=rng), base_version=0, client_id="a")
    state = agg.state_dict()
    release, staging = threading.Event(), threading.Event()

    def before(src):
        staging.set()
        assert release.wait(20)

    _hooked(monkeypatch, before)
    ts, errs = _run([lambda: agg.submit(0.1 * torch.randn(P), base_version=0, client_id="b")])
    assert staging.wait(20)
    loaded = threading.Event()
    lt, lerrs = _run([lambda: (agg.load_state_dict(state), loaded.set())])
    assert not loaded.wait(0.3)  # still staging: the load waits
    release.set()
    for t in ts + lt:
        t.join()
    assert not errs and not lerrs, (errs, lerrs)
    assert loaded.is_set()
    st = agg.stats()
    assert st["buffered"] == 1 and st["accepted"] == 1  # the checkpoint's state, loaded last
    assert sorted(agg._free_rows) == [1, 2, 3]
