"""16-bit update buffers (``Aggregator(delta_dtype=...)``) and 16-bit wire payloads.

The contract: an update is rounded to ``delta_dtype`` once, at ingest; everything after (the
correction's students, its norms, the merge) is the fp32 path applied to the rounded update.
The reference is the aggregator in float64 fed the rounded updates."""

import pytest
import torch

import fastagg
from fastagg import errors
from fastagg.aggregator import _add_rows, _finite_norm
from fastagg.ops.stage import _PIECE

from conftest import mlp

DTYPES = [torch.bfloat16, torch.float16]


def _rules():
    return {"fedbuff": lambda: fastagg.FedBuff(4, server_lr=0.9),
            "fedasync": lambda: fastagg.FedAsync(0.6, batch_size=3)}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("rule", sorted(_rules()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_16_bit_buffer_equals_float64_run_on_the_rounded_updates(dtype, rule, backend, rng):
    proxy = torch.randn(11, 6, generator=rng)
    kw = dict(schedule=fastagg.schedules.constant(1.2), step="relative", rho=0.7, steps=2, staleness_factor="none")
    agg = fastagg.Aggregator(mlp(), _rules()[rule](), correction=fastagg.KDCorrection(proxy, **kw),
                             delta_dtype=dtype, backend=backend)
    ref, raw = (fastagg.Aggregator(mlp(dtype=torch.float64), _rules()[rule](),
                                   correction=fastagg.KDCorrection(proxy.double(), **kw), backend="torch")
                for _ in range(2))
    assert agg._deltas.dtype == dtype and agg.stats()["delta_dtype"] == str(dtype).replace("torch.", "")
    P = agg.spec.numel
    for i in range(14):  # fp32 updates with a tail of awkward magnitudes, stale by 0-2 versions
        d = 0.3 * torch.randn(P, generator=rng) * torch.rand(P, generator=rng) ** 3
        lag = int(torch.randint(0, 3, (1,), generator=rng))
        for a, sent in ((agg, d), (ref, d.to(dtype).double()), (raw, d.double())):
            a.submit(sent, base_version=max(0, a.version - lag), client_id=i)
    for a in (agg, ref, raw):
        a.flush()
    assert agg.version == ref.version and agg.stats()["corrected"] == ref.stats()["corrected"] > 0
    err = float((agg.params.double() - ref.params).abs().max())
    assert err < 3e-6, err  # fp32 arithmetic on the same rounded inputs (measured: up to 6e-7)
    # the rounding itself is far above that tolerance (fp16: 7e-5, bf16: 4e-4 and more), so a
    # buffer that kept the updates in fp32 would fail
    assert float((raw.params - ref.params).abs().max()) > 10 * 3e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_16_bit_norm_is_summed_in_fp32_over_chunks(dtype, rng):
    n = 2 * _PIECE + 123  # two whole chunks and a tail
    row = (torch.randn(n, generator=rng) * 3).to(dtype)
    expect = float(row.double().norm())
    assert abs(_finite_norm(row) - expect) <= 1e-5 * expect
    row[n - 1] = float("nan")  # in the tail chunk
    with pytest.raises(errors.NonFiniteUpdateError):
        _finite_norm(row)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_students_add_16_bit_rows_across_pieces(dtype, rng):
    """students += deltas with 16-bit deltas: widened piece by piece on a CPU (rows that straddle
    pieces, a short last piece), equal to the float64 sum rounded once to fp32."""
    src = (torch.randn(3, _PIECE // 2 + 77, generator=rng)).to(dtype)
    dst = torch.randn(src.shape, generator=rng)
    expect = (dst.double() + src.double()).float()
    _add_rows(dst, src)
    assert torch.equal(dst, expect)


def test_float16_overflow_is_rejected_with_its_reason_and_changes_nothing(rng):
    agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(4), delta_dtype="fp16")
    agg.submit(0.01 * torch.randn(agg.spec.numel, generator=rng), base_version=0)
    before = agg.params.clone(), agg._deltas[:1].clone(), agg.stats()
    bad = torch.zeros(agg.spec.numel)
    bad[5] = 7e4  # finite in fp32, Inf in fp16
    with pytest.raises(errors.NonFiniteUpdateError, match="65504"):
        agg.submit(bad, base_version=0)
    after = agg.stats()
    assert after.pop("rejected") == {"non_finite": 1} and after.pop("rejected_total") == 1
    before[2].pop("rejected"), before[2].pop("rejected_total")
    assert torch.equal(agg.params, before[0]) and torch.equal(agg._deltas[:1], before[1]) and after == before[2]


def test_norm_bound_applies_to_the_rounded_update():
    """The bound is checked on what will be merged: the bf16 row, not the fp32 update."""
    P = fastagg.Aggregator(mlp(), fastagg.FedBuff(4)).spec.numel
    r, ulp = 0.9375, 2.0 ** -8  # a bf16 value and its spacing there
    cases = {  # (value of every entry, bound / sqrt(P), accepted?)
        "fp32 over, rounds down under": (r + ulp / 3, r + ulp / 4, True),
        "fp32 under, rounds up over": (r + 0.6 * ulp, r + 0.9 * ulp, False),
    }
    for name, (value, bound, accepted) in cases.items():
        agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(4), delta_dtype=torch.bfloat16,
                                 max_update_norm=bound * P ** 0.5)
        update = torch.full((P,), value)
        assert (float(update.double().norm()) > agg.max_update_norm) == accepted, name
        if accepted:
            agg.submit(update, base_version=0)
        else:
            with pytest.raises(errors.UpdateNormError):
                agg.submit(update, base_version=0)
        assert agg.stats()["buffered"] == int(accepted), name


def test_bad_delta_dtype_is_a_clear_error():
    for bad in (torch.int8, "fp8", torch.float64):
        with pytest.raises(ValueError, match="delta_dtype"):
            fastagg.Aggregator(mlp(), fastagg.FedBuff(4), delta_dtype=bad)


def test_wire_sends_16_bit_tensors_as_sent(rng):
    agg = fastagg.Aggregator(mlp(), fastagg.FedBuff(2), delta_dtype=torch.bfloat16)
    delta = {k: 0.1 * torch.randn(v.shape, generator=rng) for k, v in agg.pull()[1].items()}
    full = fastagg.encode_update(delta, base_version=0)
    half = fastagg.encode_update(delta, base_version=0, dtype=torch.bfloat16)
    tensors, meta = fastagg.wire.decode_update(half)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values()) and meta["base_version"] == 0
    payload = sum(t.numel() for t in delta.values())
    data = [len(p) - 8 - int.from_bytes(p[:8], "little") for p in (full, half)]  # minus the header
    assert data == [4 * payload, 2 * payload]
    agg.submit(half)
    row = agg._deltas[0]
    assert torch.equal(row, agg.spec.flatten({k: v.to(torch.bfloat16) for k, v in delta.items()}, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="floating"):
        fastagg.encode_update(delta, base_version=0, dtype=torch.int16)
