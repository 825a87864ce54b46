"""Every bad input: a specific error, and nothing but the rejection counter changes."""

import numpy as np
import pytest
import torch
from safetensors.torch import save as _st_save

import fastagg
from fastagg import errors

from conftest import mlp


def _agg(**kw):
    model = mlp()
    proxy = torch.randn(8, 6)
    kw.setdefault("correction", fastagg.KDCorrection(proxy))
    agg = fastagg.Aggregator(model, fastagg.FedBuff(4), max_update_norm=50.0, max_staleness=5,
                             max_versions=3, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(25):  # six merges, one buffered update
        agg.submit(0.01 * torch.randn(agg.spec.numel, generator=g), base_version=agg.version, client_id=f"w{i}")
    return agg


def _snapshot(agg):
    st = agg.stats()
    st.pop("rejected"), st.pop("rejected_total")
    return (agg.params.clone(), agg.version, agg._deltas[:len(agg._pending)].clone(), st,
            [p.seq for p in agg._pending], {v: set(c) for v, c in agg._seen.items() if c}, agg._seq)


def _same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[1:2] == b[1:2] and a[3:] == b[3:]


def _good_state(agg):
    return {k: 0.01 * torch.ones_like(v) for k, v in agg.pull()[1].items()}


BAD = {
    "keys_missing": (errors.UpdateKeysError, lambda a: ({k: v for k, v in list(_good_state(a).items())[1:]}, {})),
    "keys_extra": (errors.UpdateKeysError, lambda a: ({**_good_state(a), "x.weight": torch.zeros(2)}, {})),
    "shape": (errors.UpdateShapeError, lambda a: ({**_good_state(a), "0.weight": torch.zeros(3, 3)}, {})),
    "flat_len": (errors.UpdateShapeError, lambda a: (torch.zeros(a.spec.numel + 1), {})),
    "dtype": (errors.UpdateDTypeError, lambda a: ({**_good_state(a), "0.bias": torch.zeros(9, dtype=torch.int64)}, {})),
    "ndarray_count": (errors.UpdateKeysError, lambda a: ([np.zeros((9, 6), np.float32)], {})),
    "ndarray_shape": (errors.UpdateShapeError,  # the last layer's weight transposed
                      lambda a: ([np.zeros(v.shape[::-1] if k == "2.weight" else v.shape, np.float32)
                                  for k, v in _good_state(a).items()], {})),
    "nan": (errors.NonFiniteUpdateError, lambda a: (torch.full((a.spec.numel,), float("nan")), {})),
    "inf": (errors.NonFiniteUpdateError,
            lambda a: (torch.cat([torch.zeros(a.spec.numel - 1), torch.tensor([float("inf")])]), {})),
    "norm": (errors.UpdateNormError, lambda a: (torch.full((a.spec.numel,), 100.0), {})),
    # finite entries whose squares overflow fp32: a norm error, not a NaN/Inf one
    "norm_overflow": (errors.UpdateNormError, lambda a: (torch.full((a.spec.numel,), 3e38), {})),
    "nan_among_finite": (errors.NonFiniteUpdateError,
                         lambda a: (torch.cat([torch.zeros(a.spec.numel - 2), torch.tensor([1.0, float("nan")])]), {})),
    "neg_inf": (errors.NonFiniteUpdateError,
                lambda a: (torch.cat([torch.tensor([-float("inf")]), torch.zeros(a.spec.numel - 1)]), {})),
    "future": (errors.FutureVersionError, lambda a: (torch.zeros(a.spec.numel), {"base_version": a.version + 1})),
    "too_stale": (errors.StaleUpdateError, lambda a: (torch.zeros(a.spec.numel), {"base_version": a.version - 6})),
    "duplicate": (errors.DuplicateUpdateError,
                  lambda a: (torch.zeros(a.spec.numel), {"base_version": 2, "client_id": "w8"})),
    "truncated": (errors.MalformedUpdateError,
                  lambda a: (fastagg.encode_update(_good_state(a), base_version=a.version)[:-7], {})),
    "garbage": (errors.MalformedUpdateError, lambda a: (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", {})),
    "future_format": (errors.MalformedUpdateError,
                      lambda a: (_st_save(_good_state(a), metadata={"format": "fastagg-update-2",
                                                                    "base_version": "0"}), {})),
    "wrong_type": (errors.MalformedUpdateError, lambda a: ("a string", {})),
    "bad_samples": (errors.BadArgumentError, lambda a: (torch.zeros(a.spec.numel), {"num_samples": 0})),
    "no_base": (errors.BadArgumentError, lambda a: (torch.zeros(a.spec.numel), {"base_version": None})),
    "unhashable_client": (errors.BadArgumentError, lambda a: (torch.zeros(a.spec.numel), {"client_id": ["w1"]})),
    # an object array (a TypeError from torch before) and a sample count past float64's integers
    "object_array": (errors.UpdateDTypeError,
                     lambda a: ({**_good_state(a), "0.bias": np.array(["x"] * 9, dtype=object)}, {})),
    "huge_samples": (errors.BadArgumentError, lambda a: (torch.zeros(a.spec.numel), {"num_samples": 10**30})),
}


@pytest.mark.parametrize("delta_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_rejected_and_state_unchanged(case, delta_dtype):
    agg = _agg(delta_dtype=delta_dtype)
    exc_type, make = BAD[case]
    update, kw = make(agg)
    kw.setdefault("base_version", agg.version)
    before = _snapshot(agg)
    with pytest.raises(exc_type) as info:
        agg.submit(update, **kw)
    assert str(info.value)  # a message that says what was wrong
    _same(before, _snapshot(agg))
    assert agg.stats()["rejected"] == {exc_type.reason: 1}
    # and the aggregator still works afterwards
    agg.submit(torch.zeros(agg.spec.numel), base_version=agg.version)


def test_huge_but_finite_update_is_accepted_without_a_norm_bound():
    """An fp32 update whose squared norm overflows is finite: without max_update_norm it is
    accepted (the one-pass check must not mistake overflow for NaN/Inf)."""
    agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(4))
    receipt = agg.submit(torch.full((agg.spec.numel,), 1e30), base_version=0)
    assert receipt.status == "buffered" and agg.stats()["accepted"] == 1


def test_evicted_base_version_rejected_when_no_fallback():
    agg = _agg(on_evicted="reject")
    for _ in range(12):  # push versions until version 0 is evicted from a 3-slot store
        agg.submit(0.01 * torch.ones(agg.spec.numel), base_version=agg.version)
    assert 0 not in agg.store and agg.store.evictions > 0
    before = _snapshot(agg)
    with pytest.raises(errors.EvictedVersionError, match="not in the version store"):
        agg.submit(torch.zeros(agg.spec.numel), base_version=agg.version - 4)
    _same(before, _snapshot(agg))


def test_evicted_base_version_falls_back_to_applied_and_counts():
    agg = _agg()  # on_evicted="applied"
    for _ in range(12):
        agg.submit(0.01 * torch.ones(agg.spec.numel), base_version=agg.version)
    old = agg.version - 4
    assert old not in agg.store
    for i in range(4):
        agg.submit(0.01 * torch.ones(agg.spec.numel), base_version=old, client_id=f"late{i}")
    assert agg.stats()["fallbacks"] >= 3


def test_all_input_forms_give_the_same_model():
    results = []
    for form in ("flat", "state_dict", "ndarrays", "bytes", "bytes_from_ndarrays"):
        agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(2), staleness="constant")
        g = torch.Generator().manual_seed(3)
        for i in range(4):
            flat = torch.randn(agg.spec.numel, generator=g)
            sd = {k: v.clone() for k, v in agg.spec.unflatten(flat).items()}
            upd = {"flat": flat, "state_dict": sd, "ndarrays": [v.numpy() for v in sd.values()],
                   "bytes": fastagg.encode_update(sd, base_version=agg.version, num_samples=5, client_id=i),
                   "bytes_from_ndarrays": fastagg.encode_update({k: v.numpy() for k, v in sd.items()},
                                                                base_version=agg.version, client_id=i)}[form]
            agg.submit(upd, base_version=agg.version)
        results.append(agg.params)
    for r in results[1:]:
        assert torch.equal(results[0], r)


def test_a_flat_numpy_update_is_taken_as_the_flat_tensor(rng):
    a, b = _agg(), _agg()
    d = 0.01 * torch.randn(a.spec.numel, generator=rng)
    assert a.submit(d.numpy(), base_version=a.version) == b.submit(d, base_version=b.version)
    a.flush(), b.flush()
    assert torch.equal(a.params, b.params)


def test_bytes_metadata_supplies_arguments():
    agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(3, sample_weighted=True))
    sd = {k: torch.zeros_like(v) for k, v in agg.pull()[1].items()}
    r = agg.submit(fastagg.encode_update(sd, base_version=0, num_samples=17, client_id="alice"))
    assert r.client_id == "alice" and r.base_version == 0
    assert agg._pending[0].num_samples == 17
    with pytest.raises(errors.DuplicateUpdateError):
        agg.submit(fastagg.encode_update(sd, base_version=0, client_id="alice"))


def test_correction_without_proxy_is_a_clear_error():
    with pytest.raises(ValueError, match="proxy"):
        fastagg.KDCorrection(None)


def test_duplicate_memory_is_bounded_by_max_staleness():
    agg = fastagg.Aggregator(mlp(), fastagg.FedAsync(0.5), max_staleness=3)
    for i in range(50):
        agg.submit(torch.zeros(agg.spec.numel), base_version=agg.version, client_id=f"c{i}")
    assert set(agg._seen) <= set(range(agg.version - 3, agg.version + 1))
    with pytest.raises(errors.DuplicateUpdateError):  # recent versions are still remembered
        agg.submit(torch.zeros(agg.spec.numel), base_version=49, client_id="c49")


@pytest.mark.parametrize("where", ["correction", "parameter_write"])
@pytest.mark.parametrize("rule", [fastagg.FedBuff(4, momentum=0.5), fastagg.FedAsync(0.5, batch_size=2)],
                         ids=["fedbuff", "fedasync"])
def test_a_failed_merge_changes_nothing_and_the_retry_merges_exactly_once(rule, where, rng, monkeypatch):
    """A merge that fails — in the correction (as a proxy that does not fit the model or an
    out-of-memory would) or at the write of the parameters, after FedBuff's momentum was computed —
    undoes the submit that set it off: nothing changes, later submits fail the same clear way
    instead of finding the buffer full, and once the cause is gone the update sent again merges
    exactly once (the model equals a run that never failed)."""
    import fastagg.aggregator as aggregator_module

    proxy = torch.randn(8, 6, generator=rng)

    def make():
        return fastagg.Aggregator(mlp(), rule, correction=fastagg.KDCorrection(proxy), max_staleness=5)

    agg, ref = make(), make()
    cap = agg._capacity
    updates = [(0.05 * torch.randn(agg.spec.numel, generator=rng), f"c{i}") for i in range(2 * cap)]
    for a in (agg, ref):
        for delta, cid in updates[:cap]:  # one merge: the next updates are stale, so corrected
            a.submit(delta, base_version=0, client_id=cid)
        for delta, cid in updates[cap:-1]:
            a.submit(delta, base_version=0, client_id=cid)
    correct, merge = agg.correction.correct, aggregator_module.fused_merge

    def broken_correction(*args, **kwargs):
        raise FloatingPointError("injected")

    def broken_parameter_write(theta, c0, groups, out=None, backend="torch"):
        if out is agg.params:
            raise FloatingPointError("injected")
        return merge(theta, c0, groups, out=out, backend=backend)

    def set_broken(broken):
        if where == "correction":
            agg.correction.correct = broken_correction if broken else correct
        else:
            monkeypatch.setattr(aggregator_module, "fused_merge", broken_parameter_write if broken else merge)

    def state(a):
        snap = _snapshot(a)
        for key in ("merge_failures", "teacher_forwards"):  # counters of work done: the failures, and
            snap[3].pop(key)  # the new version's teacher, computed once and cached
        return snap, None if a._momentum is None else a._momentum.clone()

    set_broken(True)
    before = state(agg)
    last, cid = updates[-1]
    for _ in range(2):
        with pytest.raises(FloatingPointError, match="injected"):
            agg.submit(last, base_version=0, client_id=cid)
        after = state(agg)
        _same(before[0], after[0])
        assert (before[1] is None and after[1] is None) or torch.equal(before[1], after[1])
    assert agg.stats()["merge_failures"] == 2 and agg.stats()["rejected_total"] == 0
    set_broken(False)
    assert agg.submit(last, base_version=0, client_id=cid).status == "merged"
    ref.submit(last, base_version=0, client_id=cid)
    assert torch.equal(agg.params, ref.params) and agg.version == ref.version

    def without_failures(st):
        return {k: v for k, v in st.items() if k != "merge_failures"}

    assert without_failures(agg.stats()) == without_failures(ref.stats())

    # flush: a failure leaves the buffer for the retry
    for a in (agg, ref):
        a.submit(updates[0][0], base_version=a.version - 1, client_id="late")
    set_broken(True)
    before = state(agg)
    with pytest.raises(FloatingPointError):
        agg.flush()
    after = state(agg)
    _same(before[0], after[0])
    set_broken(False)
    assert agg.flush() == ref.flush() and torch.equal(agg.params, ref.params)


def test_a_models_non_floating_state_may_come_along_and_is_left_out(rng):
    """BatchNorm's num_batches_tracked (int64) is not aggregated: a client's full state_dict
    delta, and set_global(model.state_dict()), carry it and are taken as without it; an unknown
    key is still refused."""
    def bn_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                   torch.nn.Linear(3 * 3 * 3, 2))

    with_it, without = (fastagg.Aggregator(bn_model(), fastagg.FedBuff(2)) for _ in range(2))
    assert with_it.spec.ignored == ("1.num_batches_tracked",)
    for i in range(4):
        full = {k: torch.randn(v.shape, generator=rng) if v.is_floating_point() else torch.tensor(7)
                for k, v in bn_model().state_dict().items()}
        with_it.submit(full, base_version=with_it.version)
        with_it.submit(fastagg.encode_update(full, base_version=with_it.version))  # and as wire bytes
        floating = {k: v for k, v in full.items() if k != "1.num_batches_tracked"}
        without.submit(floating, base_version=without.version)
        without.submit(floating, base_version=without.version)
    assert torch.equal(with_it.params, without.params) and with_it.version == 4
    trained = bn_model()
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    with_it.set_global(trained.state_dict())
    assert torch.equal(with_it.pull()[1]["0.weight"], trained[0].weight)
    with pytest.raises(errors.UpdateKeysError, match="unexpected"):
        with_it.submit({**full, "2.extra": torch.zeros(1)}, base_version=with_it.version)


def test_a_proxy_that_does_not_fit_the_model_fails_at_construction():
    with pytest.raises(ValueError, match=r"proxy inputs \(shape \(5, 7\).*do not fit the model: RuntimeError"):
        fastagg.Aggregator(mlp(), fastagg.FedBuff(2), correction=fastagg.KDCorrection(torch.randn(5, 7)))

    class Sequences(torch.nn.Module):  # logits [B, S, C]: the correction needs [N, C]
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x).unsqueeze(1).expand(-1, 3, -1)

    with pytest.raises(ValueError, match=r"logits of shape \[N, classes\].*\(4, 3, 5\)"):
        fastagg.Aggregator(Sequences(), fastagg.FedBuff(2), correction=fastagg.KDCorrection(torch.randn(4, 6)))


def test_set_global_refuses_bad_parameters_and_changes_nothing(rng):
    """set_global with parameters of a wrong shape (as the last tensor of a state_dict, after
    good ones), a wrong size, an integer dtype, or a NaN / Inf: a clear error, and the model, its
    stored version and the teacher cache unchanged. Tensors that require grad are taken as their
    values (the model does not join their autograd graph)."""
    agg = _agg()
    agg.correction.teacher(agg.params, agg.version)  # this version's teacher cached
    snap = _snapshot(agg)
    stored = agg.store.get(agg.version).clone()
    forwards = agg.stats()["teacher_forwards"]
    good = {k: torch.randn(v.shape, generator=rng) for k, v in agg.spec.unflatten(agg.params).items()}
    last = agg.spec.names[-1]
    nan_flat = torch.randn(agg.spec.numel, generator=rng)
    nan_flat[agg.spec.numel // 2] = float("nan")
    cases = [({**good, last: torch.zeros(good[last].numel() + 1)}, errors.UpdateShapeError, "has shape"),
             (torch.zeros(agg.spec.numel + 1), ValueError, "expected"),
             (torch.zeros(agg.spec.numel, dtype=torch.int32), errors.UpdateDTypeError, "floating point"),
             (nan_flat, ValueError, "NaN or Inf"),
             ({**good, last: torch.full_like(good[last], float("inf"))}, ValueError, "NaN or Inf")]
    for params, error, words in cases:
        with pytest.raises(error, match=words):
            agg.set_global(params)
        now = _snapshot(agg)
        assert torch.equal(now[0], snap[0]) and now[1:2] + now[3:] == snap[1:2] + snap[3:]
        assert torch.equal(agg.store.get(agg.version), stored)
    agg.correction.teacher(agg.params, agg.version)  # the cached teacher still serves: no new forward
    assert agg.stats()["teacher_forwards"] == forwards
    w = {k: (2 * v.requires_grad_()) for k, v in good.items()}
    agg.set_global(w)
    assert not agg.params.requires_grad and agg.params.grad_fn is None and not agg.store.rows.requires_grad
    assert torch.equal(agg.params, agg.spec.flatten({k: 2 * v.detach() for k, v in good.items()}))


@pytest.mark.parametrize("make, words", [
    (lambda: fastagg.Aggregator(mlp(), max_update_norm=-1.0), "max_update_norm"),
    (lambda: fastagg.Aggregator(mlp(), max_update_norm=float("nan")), "max_update_norm"),  # would check nothing
    (lambda: fastagg.Aggregator(mlp(), max_update_norm=0), "max_update_norm"),
    (lambda: fastagg.Aggregator(mlp(), max_staleness=-1), "max_staleness"),
    (lambda: fastagg.Aggregator(mlp(), max_staleness=2.5), "max_staleness"),
    (lambda: fastagg.FedBuff(2.5), "buffer_size"),
    (lambda: fastagg.FedBuff(True), "buffer_size"),
    (lambda: fastagg.FedBuff(4, server_lr=-0.5), "server_lr"),
    (lambda: fastagg.FedBuff(4, server_lr=float("inf")), "server_lr"),
    (lambda: fastagg.FedAsync(0.5, batch_size=2.0), "batch_size"),
    (lambda: fastagg.staleness.polynomial(float("nan")), "finite"),
    (lambda: fastagg.staleness.hinge(float("inf"), 2), "finite"),
], ids=["norm<0", "norm nan", "norm 0", "staleness<0", "staleness float", "buffer float", "buffer bool", "lr<0",
        "lr inf", "batch float", "poly nan", "hinge inf"])
def test_settings_that_would_reject_everything_or_check_nothing_are_refused(make, words):
    """A negative bound rejected every update, a NaN one checked none (every comparison with NaN
    is false), a float buffer size failed at the first allocation: refused where they are given."""
    with pytest.raises(ValueError, match=words):
        make()
