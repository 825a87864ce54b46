"""``Aggregator.submit_many``: several updates in one call, as that many ``submit`` calls in order.

The oracle is the same updates submitted one by one to a plain CPU aggregator (whose submit
test_random_operations holds to a float64 reference server): the same receipts, the same
errors in the same places, the same counters and model. Each batch mixes valid updates with the
faults a server sees (NaN, a norm over the bound, a future, too stale or duplicate base, a bad
argument) and spans buffer boundaries. The batched path (a [n, P] tensor on a GPU aggregator:
one copy and one norm read-back per buffer) runs here through test_staged_path's stand-in for
the GPU's ingest; on CUDA through the real one.
"""

from __future__ import annotations

import pytest
import torch

import fastagg
import fastagg.aggregator as fa
from fastagg import errors

import test_random_operations as ro
from conftest import mlp
from test_staged_path import GPU_INGEST, late  # noqa: F401  (the fixture)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the batched path on a GPU needs CUDA")

RULES = {
    "fedbuff": lambda: fastagg.FedBuff(4, server_lr=0.9, momentum=0.3),
    "fedasync_batch3": lambda: fastagg.FedAsync(0.45, batch_size=3),
    "fedbuff_kd": lambda: fastagg.FedBuff(3, server_lr=0.9),
}


def _aggregator(rule, model, dtype, **kw):
    """``rule``'s aggregator with the bounds the faults need; FedADT (relative steps, which use
    each update's norm as measured at ingest) for the ``_kd`` rules."""
    proxy = torch.randn(7, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)
    corr = ro._correction(ro.ONE_STEP, proxy) if rule.endswith("_kd") else None
    return fastagg.Aggregator(model, RULES[rule](), staleness=fastagg.staleness.polynomial(0.5), correction=corr,
                              max_staleness=3, max_update_norm=4.0, **kw)


def _batch(agg_version, n, P, rng, dtype, first_client):
    """n updates, arguments and the faults among them: rows, base versions, num_samples, client ids."""
    rows = 0.05 * torch.randn(n, P, generator=rng, dtype=dtype)
    bases = [max(0, agg_version - int(torch.randint(0, 3, (1,), generator=rng))) for _ in range(n)]
    samples = [int(torch.randint(1, 20, (1,), generator=rng)) for _ in range(n)]
    clients = [f"c{i}" for i in range(first_client, first_client + n)]  # str: the wire carries ids as text
    for k in torch.randperm(n, generator=rng)[:max(1, n // 3)].tolist():
        fault = int(torch.randint(0, 7, (1,), generator=rng))
        if fault == 0:
            rows[k, int(torch.randint(0, P, (1,), generator=rng))] = float("nan")
        elif fault == 1:
            rows[k] *= 1e3  # over max_update_norm
        elif fault == 2:
            bases[k] = agg_version + 1  # a future version
        elif fault == 3:
            bases[k] = max(0, agg_version - 6)  # too stale once the version passes 3 (else fine)
        elif fault == 4 and k > 0:
            clients[k], bases[k] = clients[k - 1], bases[k - 1]  # the update before's client, again
        elif fault == 5:
            samples[k] = 0  # a bad argument
        else:
            rows[k, 0] = float("inf")
    return rows, bases, samples, clients


def _same(results, expected):
    assert len(results) == len(expected)
    for k, (got, want) in enumerate(zip(results, expected)):
        if isinstance(want, Exception):
            assert type(got) is type(want), (k, got, want)
        else:
            assert isinstance(got, fastagg.Receipt), (k, got)
            assert got == want, k


def _one_by_one(agg, rows, bases, samples, clients):
    out = []
    for k in range(rows.shape[0]):
        try:
            out.append(agg.submit(rows[k], bases[k], samples[k], clients[k]))
        except errors.InvalidUpdate as exc:
            out.append(exc)
    return out


def _check_equal(agg, ref, rtol):
    s, r = agg.stats(), ref.stats()
    assert agg.version == ref.version
    for key in ("accepted", "merged", "rejected", "buffered", "corrected", "staleness_histogram"):
        assert s.get(key) == r.get(key), key
    torch.testing.assert_close(agg.params.cpu(), ref.params, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_batches_on_the_batched_path_match_one_submit_at_a_time(rule, rng, late, monkeypatch):
    """Batches of 1 to 9 updates (spanning buffers, faults among them), and single host submits
    between them, through the batched path (the stand-in GPU aggregator), against a CPU
    aggregator fed the same updates one submit at a time; float64, so the one difference (the
    batch's norms by one fp64 reduction against the staging's sum of squares) stays at rounding.
    The batched path must really run: one norm reduction per buffer's share and no per-update
    staging for the batches."""
    model = mlp(d_in=6, hidden=9, classes=5, dtype=torch.float64)
    agg = _aggregator(rule, model, torch.float64)
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    ref = _aggregator(rule, model, torch.float64)
    assert agg._staging is not None and ref._staging is None
    P, client, sure = agg.spec.numel, 0, 0
    batched, norm_calls = [], []
    run = agg._accept_many_on_device
    monkeypatch.setattr(agg, "_accept_many_on_device", lambda *a: (batched.append(1), run(*a))[1])
    real_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm",
                        lambda *a, **k: (norm_calls.append(k.get("dim")), real_norm(*a, **k))[1])
    for step in range(14):
        n = int(torch.randint(1, 10, (1,), generator=rng))
        rows, bases, samples, clients = _batch(agg.version, n, P, rng, torch.float64, client)
        client += n
        # the faults refused whatever the batch's order and merges (a future base version can
        # become current within the batch, a repeated client need not have been accepted before)
        sure += sum(not bool(torch.isfinite(r).all()) or float(r.norm()) > 4.0 or s < 1
                    for r, s in zip(rows, samples))
        before = len([c for c in norm_calls if c == 1])
        got = agg.submit_many(rows, bases, samples, clients)
        # one reduction per buffer's share of the updates past the argument checks (none if none is)
        reductions = len([c for c in norm_calls if c == 1]) - before
        past_args = [g for g in got if not isinstance(g, errors.BadArgumentError)]
        assert reductions <= len(past_args) and (reductions >= 1) == bool(past_args)
        _same(got, _one_by_one(ref, rows, bases, samples, clients))
        _check_equal(agg, ref, 1e-12)
        if step % 3 == 2:  # a host update between batches: the staged path and the batched one share the buffer
            d = 0.05 * torch.randn(P, generator=rng, dtype=torch.float64)
            assert agg.submit(d, agg.version, 5, ("host", step)) == ref.submit(d, ref.version, 5, ("host", step))
    assert len(batched) == 14
    assert agg.stats()["merged"] > 0 and sum(agg.stats()["rejected"].values()) >= sure > 0
    agg.flush(), ref.flush()
    _check_equal(agg, ref, 1e-12)


def test_a_batch_of_many_buffers_takes_one_norm_read_back_per_buffer(late, monkeypatch, rng):
    """25 valid updates into FedBuff(4): six full buffers and one left over, each buffer's four
    written by one copy and their norms read back by one ``tolist``; the model equals one submit
    at a time (float32 rows)."""
    model = mlp(d_in=6, hidden=9, classes=5)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4))
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    ref = fastagg.Aggregator(model, fastagg.FedBuff(4))
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (reads.append(tuple(t.shape)), real(t))[1])
    rows = 0.1 * torch.randn(25, agg.spec.numel, generator=rng)
    got = agg.submit_many(rows, base_versions=0)
    assert reads == [(4,)] * 6 + [(1,)]
    monkeypatch.setattr(torch.Tensor, "tolist", real)
    _same(got, _one_by_one(ref, rows, [0] * 25, [None] * 25, [None] * 25))
    assert agg.version == 6 and agg.stats()["buffered"] == 1
    torch.testing.assert_close(agg.params, ref.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["bytes", "dicts", "host_rows"])
def test_sequences_and_cpu_batches_match_one_submit_at_a_time(form, rng):
    """Anything submit takes, as a sequence (wire bytes with their metadata, state_dicts), and a
    [n, P] tensor on a CPU aggregator: the same receipts, errors and model as one at a time."""
    model = mlp(d_in=6, hidden=9, classes=5, dtype=torch.float64)
    agg, ref = _aggregator("fedbuff_kd", model, torch.float64), _aggregator("fedbuff_kd", model, torch.float64)
    P, client = agg.spec.numel, 0
    for _ in range(6):
        n = int(torch.randint(2, 8, (1,), generator=rng))
        rows, bases, samples, clients = _batch(agg.version, n, P, rng, torch.float64, client)
        client += n
        want = _one_by_one(ref, rows, bases, samples, clients)
        if form == "bytes":
            ups = [fastagg.wire.encode_update(agg.spec.unflatten(r), base_version=b, num_samples=max(s, 1),
                                              client_id=c) for r, b, s, c in zip(rows, bases, samples, clients)]
            # the metadata carries base, samples and client; a bad num_samples only as an argument
            got = agg.submit_many(ups, num_samples=[s if s < 1 else None for s in samples])
        elif form == "dicts":
            got = agg.submit_many([agg.spec.unflatten(r) for r in rows], bases, samples, clients)
        else:
            got = agg.submit_many(rows, bases, samples, clients)
        _same(got, want)
        _check_equal(agg, ref, 1e-12)


@pytest.mark.parametrize("where", ["cpu", "stand_in"])
def test_a_malformed_batch_raises_and_changes_nothing(where, rng, late, monkeypatch):
    """A tensor of rows that are not P floats is n rejected updates, raised at once; argument
    lists of another length, a 1-D tensor or a single update are the caller's error (ValueError);
    neither takes anything."""
    model = mlp(d_in=6, hidden=9, classes=5)
    if where == "cpu":
        monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4))
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    assert (agg._staging is not None) == (where == "stand_in")
    P = agg.spec.numel
    agg.submit_many(0.1 * torch.randn(2, P, generator=rng), base_versions=0)
    before = agg.params.clone(), agg.version, agg.stats()

    def unchanged(rejected_more):
        s = agg.stats()
        assert torch.equal(agg.params, before[0]) and agg.version == before[1]
        assert s["buffered"] == before[2]["buffered"] == 2 and s["accepted"] == before[2]["accepted"]
        for reason, n in rejected_more.items():
            assert s["rejected"].get(reason, 0) == before[2]["rejected"].get(reason, 0) + n

    with pytest.raises(errors.UpdateShapeError, match=f"must have shape \\(n, {P}\\)"):
        agg.submit_many(torch.randn(3, P + 1), base_versions=0)
    unchanged({"shape": 3})
    with pytest.raises(errors.UpdateDTypeError):
        agg.submit_many(torch.ones(2, P, dtype=torch.int32), base_versions=0)
    unchanged({"shape": 3, "dtype": 2})
    with pytest.raises(ValueError, match="base_versions has 2 values for 3 updates"):
        agg.submit_many(torch.randn(3, P), base_versions=[0, 0])
    with pytest.raises(ValueError, match="client_ids must be None or a list of 3"):
        agg.submit_many(torch.randn(3, P), base_versions=0, client_ids="abc")
    with pytest.raises(ValueError, match=r"got a tensor of shape \(" + str(P) + r",\)"):
        agg.submit_many(torch.randn(P), base_versions=0)
    with pytest.raises(ValueError, match="got dict"):
        agg.submit_many(agg.spec.unflatten(torch.randn(P)), base_versions=0)
    unchanged({"shape": 3, "dtype": 2})


def test_a_merge_that_fails_mid_batch_keeps_the_updates_before_it(late, monkeypatch, rng):
    """The merge that the fourth update of FedBuff(4) starts fails: the three before it stay
    buffered, that one and those after it are not taken, the error is raised; sending the rest
    again ends where one submit at a time ends."""
    model = mlp(d_in=6, hidden=9, classes=5, dtype=torch.float64)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4))
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    ref = fastagg.Aggregator(model, fastagg.FedBuff(4))
    rows = 0.1 * torch.randn(6, agg.spec.numel, generator=rng, dtype=torch.float64)
    real = agg._merge_buffer

    def fail_once():
        monkeypatch.setattr(agg, "_merge_buffer", real)
        raise MemoryError("out of memory (injected)")

    monkeypatch.setattr(agg, "_merge_buffer", fail_once)
    with pytest.raises(MemoryError):
        agg.submit_many(rows, base_versions=0, client_ids=list(range(6)))
    s = agg.stats()
    assert agg.version == 0 and s["buffered"] == 3 and s["accepted"] == 3 and s["merge_failures"] == 1
    got = agg.submit_many(rows[3:], base_versions=0, client_ids=[3, 4, 5])
    assert [type(g) for g in got] == [fastagg.Receipt] * 3 and got[0].status == "merged"
    _one_by_one(ref, rows, [0] * 6, [None] * 6, list(range(6)))
    assert agg.version == ref.version == 1
    torch.testing.assert_close(agg.params, ref.params, rtol=1e-12, atol=1e-12)


@CUDA
@pytest.mark.parametrize("compute_stream", [False, True], ids=["one_stream", "compute_stream"])
@pytest.mark.parametrize("rule", ["fedbuff", "fedasync_batch3"])
def test_device_batches_on_a_gpu_match_one_submit_at_a_time(rule, compute_stream, rng):
    """The real batched path: [n, P] batches on the GPU (float32 rows, faults among them)
    against a CPU aggregator fed one update at a time; the model to the GPU merge's rounding."""
    model = mlp(d_in=6, hidden=64, classes=5)
    agg = _aggregator(rule, model, torch.float32, device="cuda", compute_stream=compute_stream)
    ref = _aggregator(rule, model, torch.float32)
    P, client = agg.spec.numel, 0
    for _ in range(10):
        n = int(torch.randint(1, 10, (1,), generator=rng))
        rows, bases, samples, clients = _batch(agg.version, n, P, rng, torch.float32, client)
        client += n
        got = agg.submit_many(rows.cuda(), bases, samples, clients)
        _same(got, _one_by_one(ref, rows, bases, samples, clients))
        _check_equal(agg, ref, 1e-5)


@pytest.mark.parametrize("where", ["cpu", "stand_in", pytest.param("cuda", marks=CUDA)])
def test_updates_that_require_grad_leave_no_graph_behind(where, rng, late, monkeypatch):
    """A client's delta still attached to its autograd graph (requires_grad) is taken as its
    values: written into a delta row it must not make the aggregator's buffers part of that graph
    (they would then track every later write and keep the client's graph alive). Flat, as a
    state_dict and as a batch; the model equals one fed the detached updates."""
    model = mlp(d_in=6, hidden=9, classes=5)
    if where != "stand_in":
        monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    kw = {"device": "cuda"} if where == "cuda" else {}
    agg = fastagg.Aggregator(model, fastagg.FedBuff(3), **kw)
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    ref = fastagg.Aggregator(model, fastagg.FedBuff(3))
    P = agg.spec.numel
    dev = "cuda" if where == "cuda" else "cpu"
    leaves = [0.1 * torch.randn(P, generator=rng) for _ in range(7)]
    graphed = [(2 * d.to(dev).requires_grad_()) for d in leaves]  # non-leaf: a grad_fn behind each
    agg.submit(graphed[0], base_version=0)
    agg.submit(agg.spec.unflatten(graphed[1]), base_version=0)
    got = agg.submit_many(torch.stack(graphed[2:]), base_versions=agg.version)
    assert all(isinstance(g, fastagg.Receipt) for g in got)
    ref.submit(2 * leaves[0], base_version=0)
    ref.submit(2 * leaves[1], base_version=0)
    ref.submit_many(torch.stack([2 * d for d in leaves[2:]]), base_versions=ref.version)
    for t in [agg.params, *([agg._deltas] + getattr(agg, "_delta_sets", [])), agg._stage_rows]:
        assert not t.requires_grad and t.grad_fn is None
    assert agg.version == ref.version == 2 and agg.stats()["buffered"] == 1
    torch.testing.assert_close(agg.params.cpu(), ref.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delta_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_batches_into_16_bit_rows_are_rounded_and_checked_as_one_submit_at_a_time(delta_dtype, rng, late, monkeypatch):
    """A float32 batch into 16-bit delta rows: each row rounded once on the way in, its norm bound
    and NaN check applied to the rounded values (in fp16 a value beyond 65504 overflows and is
    refused as non-finite), the model equal to one submit at a time into the same rows."""
    model = mlp(d_in=6, hidden=9, classes=5)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), delta_dtype=delta_dtype, max_update_norm=50.0)
    monkeypatch.setattr(fa, "_Ingest", GPU_INGEST)
    ref = fastagg.Aggregator(model, fastagg.FedBuff(4), delta_dtype=delta_dtype, max_update_norm=50.0)
    P = agg.spec.numel
    for _ in range(4):
        rows = 0.1 * torch.randn(7, P, generator=rng)
        rows[2, 0] = 7e4  # beyond fp16's range; in bf16 a norm over the bound
        rows[5, 1] = float("nan")
        got = agg.submit_many(rows, base_versions=agg.version)
        want = _one_by_one(ref, rows, [ref.version] * 7, [None] * 7, [None] * 7)
        _same(got, want)
        assert type(got[2]) is (errors.NonFiniteUpdateError if delta_dtype == torch.float16 else errors.UpdateNormError)
        _check_equal(agg, ref, 1e-6)
