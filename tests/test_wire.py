"""The server's zero-copy reading of update payloads (fastagg.wire.parse_update) against
safetensors' own loader: the same tensors from valid payloads, a MalformedUpdateError where the
loader refuses the bytes too, and submit(bytes) equal to submit(dict)."""

import json
import random
import struct

import pytest
import safetensors.torch
import torch

import fastagg
from fastagg import errors, wire
from fastagg.ops.stage import stage_row

from conftest import need_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]


def _bits(t):
    """A tensor's bytes, to compare bit for bit (NaN and -0.0 included)."""
    return t.contiguous().view(-1).view(torch.uint8)


def _random(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def _raw(header, data=b""):
    """A payload built by hand: little-endian u64 header length, the JSON header, the data."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_tensors_equal_safetensors_loader(kind, rng):
    shapes = [(), (0,), (1,), (7, 3), (2, 0, 5), (13,), (3, 1, 1, 2)]
    tensors = {f"t{i}.{dt}".replace("torch.", ""): _random(shape, dt, rng)
               for i, (shape, dt) in enumerate((s, d) for s in shapes for d in DTYPES)}
    payload = safetensors.torch.save(tensors, metadata={"base_version": "3", "client_id": "x"})
    ref = safetensors.torch.load(payload)
    view, meta = wire.parse_update(kind(payload))
    assert meta == {"base_version": 3, "client_id": "x"}
    assert set(view.entries) == set(ref)
    for name, t in ref.items():
        got = view.tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(_bits(got), _bits(t)), name
    decoded, _ = wire.decode_update(kind(payload))
    assert all(torch.equal(_bits(decoded[n]), _bits(ref[n])) for n in ref)


@pytest.mark.parametrize("backend", ["torch", "cpp", "numba"])
@pytest.mark.parametrize("pad", [0, 1, 3])  # header lengths that leave the tensors' bytes unaligned
def test_payload_arrays_stage_into_rows(rng, backend, pad):
    need_backend(backend)
    t = {"a": torch.randn(37, generator=rng), "b": torch.randn(5, 3, generator=rng).bfloat16(),
         "c": torch.randn(4, generator=rng).half(), "d": torch.randn(3, generator=rng).double()}
    payload = safetensors.torch.save(t)
    (n,) = struct.unpack("<Q", payload[:8])
    payload = struct.pack("<Q", n + pad) + payload[8:8 + n] + b" " * pad + payload[8 + n:]  # JSON may end in spaces
    view, _ = wire.parse_update(payload)
    for name in t:
        arr = view.array(name)
        assert not arr.flags.writeable and arr.size == t[name].numel()
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            dst = torch.full((t[name].numel(),), float("nan"), dtype=dt)
            sq = stage_row(arr, dst, backend, src_dtype=t[name].dtype)
            want = t[name].reshape(-1).to(dt)
            assert torch.equal(_bits(dst), _bits(want)), (name, dt)
            assert sq == pytest.approx(float(want.double().square().sum()), rel=1e-6)


def _valid():
    return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}


def _bad_payloads():
    data = bytes(range(22))
    good = _raw(_valid(), data)
    cases = {"truncated": good[:-1], "trailing byte": good + b"\0", "too short": good[:5],
             "header length past the end": struct.pack("<Q", 10 ** 6) + good[8:],
             "header not JSON": struct.pack("<Q", 5) + b"{nope" + data,
             "header a list": _raw([1, 2], data)}
    for what, change in {"unknown dtype": ("w", "dtype", "F33"), "negative dim": ("w", "shape", [-2, -2]),
                         "size mismatch": ("w", "shape", [2, 3]), "overlap": ("b", "data_offsets", [14, 20]),
                         "offsets reversed": ("b", "data_offsets", [22, 16]),
                         "offsets not ints": ("b", "data_offsets", [16.0, 22])}.items():
        h = _valid()
        h[change[0]][change[1]] = change[2]
        cases[what] = _raw(h, data)
    h = _valid()
    h["__metadata__"] = {"base_version": 3}
    cases["metadata not strings"] = _raw(h, data)
    h = _valid()
    h["b"]["data_offsets"] = [18, 24]  # a gap at 16..18
    cases["gap"] = _raw(h, data + b"\0\0")
    return good, cases


def test_malformed_payloads_are_refused_like_safetensors_does():
    good, cases = _bad_payloads()
    view, _ = wire.parse_update(good)
    assert torch.equal(view.tensor("w"), safetensors.torch.load(good)["w"])  # the base case is valid
    for what, payload in cases.items():
        with pytest.raises(Exception):  # the reference refuses it ...
            safetensors.torch.load(payload)
        with pytest.raises(errors.MalformedUpdateError):  # ... and so does the server, with its own error
            wire.parse_update(payload)
    with pytest.raises(errors.MalformedUpdateError, match="expected bytes"):
        wire.parse_update("not bytes")
    with pytest.raises(errors.MalformedUpdateError, match="contiguous"):
        wire.parse_update(memoryview(good)[::2])


def test_a_refused_payload_changes_nothing(rng):
    model = torch.nn.Linear(4, 2)
    agg = fastagg.Aggregator(model, fastagg.FedBuff(3), backend="torch")
    before = agg.params.clone(), agg.version, agg.stats()["accepted"]
    state = {k: torch.randn(v.shape, generator=rng) for k, v in model.state_dict().items()}
    good = wire.encode_update(state, base_version=0)
    for bad in (good[:-4], good.replace(b'"F32"', b'"F31"', 1)):
        with pytest.raises(errors.MalformedUpdateError):
            agg.submit(bad)
    wrong_shape = wire.encode_update({"weight": torch.randn(2, 5), "bias": torch.randn(2)}, base_version=0)
    with pytest.raises(errors.UpdateShapeError):
        agg.submit(wrong_shape)
    ints = wire.encode_update({"weight": torch.ones(2, 4, dtype=torch.int32), "bias": torch.randn(2)}, base_version=0)
    with pytest.raises(errors.UpdateDTypeError):
        agg.submit(ints)
    assert torch.equal(agg.params, before[0]) and agg.version == before[1]
    assert agg.stats()["accepted"] == before[2] and agg.stats()["buffered"] == 0


def test_mutated_payloads_are_taken_as_safetensors_reads_them_or_refused_with_an_update_error(rng):
    """600 random mutations of a valid payload (bytes changed, cut off, inserted; characters of
    the JSON header replaced): each submit either is accepted, its row then holding exactly what
    safetensors reads from the same bytes, or raises an InvalidUpdate (never another exception)
    and changes nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    agg = fastagg.Aggregator(model, fastagg.FedBuff(1000), max_update_norm=100.0)
    state = {k: 0.1 * torch.randn(v.shape, generator=rng) for k, v in model.state_dict().items()}
    good = wire.encode_update(state, base_version=0, num_samples=3, client_id="c")
    header = int.from_bytes(good[:8], "little")
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    accepted = refused = 0
    for i in range(600):
        b = bytearray(good)
        kind = i % 4
        if kind == 0:
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] = r.randrange(256)
        elif kind == 1:
            b = b[:r.randrange(len(b))]
        elif kind == 2:
            at = r.randrange(8, len(b))
            b[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 5)))
        else:
            b[r.randrange(8, 8 + header)] = r.choice(b'{}[]",:0123456789aFU ')
        before = agg.params.clone(), agg.version, len(agg._pending)
        try:
            agg.submit(bytes(b), client_id=i)
        except errors.InvalidUpdate:
            refused += 1
            assert torch.equal(agg.params, before[0]) and (agg.version, len(agg._pending)) == before[1:]
            continue
        accepted += 1
        read = safetensors.torch.load(bytes(b))
        row = agg._deltas[agg._pending[-1].row]
        assert torch.equal(row, torch.cat([read[n].reshape(-1).float() for n in agg.spec.names]))
    assert accepted > 10 and refused > 400, (accepted, refused)


@pytest.mark.parametrize("delta_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("send", [None, torch.bfloat16], ids=["sent-fp32", "sent-bf16"])
def test_submit_bytes_equals_submit_dict(delta_dtype, send, rng):
    """A model with BatchNorm: its int64 num_batches_tracked travels in a full state_dict and is
    left out; every floating tensor lands in the row, cast once where the dtypes differ."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 4 * 4, 3))
    aggs = [fastagg.Aggregator(model, fastagg.FedBuff(4), backend="torch", delta_dtype=delta_dtype)
            for _ in range(2)]
    for i in range(6):
        delta = {k: (torch.randn(v.shape, generator=rng) if v.is_floating_point() else v.clone())
                 for k, v in model.state_dict().items()}
        sent = {k: v.to(send) if send is not None and v.is_floating_point() else v for k, v in delta.items()}
        aggs[0].submit(wire.encode_update(sent, base_version=aggs[0].version, client_id=i))
        aggs[1].submit(sent, base_version=aggs[1].version, client_id=i)
        assert torch.equal(_bits(aggs[0]._deltas[: len(aggs[0]._pending)]), _bits(aggs[1]._deltas[: len(aggs[1]._pending)]))
    aggs[0].flush(), aggs[1].flush()
    assert torch.equal(aggs[0].params, aggs[1].params) and aggs[0].version == aggs[1].version == 2
