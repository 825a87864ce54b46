"""The wire format: safetensors (no pickle; never ``torch.load`` untrusted bytes).

A client update is a safetensors payload whose tensors are the delta (named as in the model's
state_dict) and whose metadata carries ``base_version``, ``num_samples`` and ``client_id``
as strings. A model sent to a client carries ``version`` in its metadata.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import errors

FORMAT = "fastagg-update-1"


def encode_update(delta: dict, *, base_version: int, num_samples: int = 1, client_id=None, dtype=None) -> bytes:
    """Client side: serialise a delta {name: tensor or numpy array} with its base version and
    sample count. ``dtype`` (e.g. ``torch.bfloat16``): send the floating tensors in it (half the
    bytes; pair with ``Aggregator(delta_dtype=torch.bfloat16)`` so that the server holds them as
    sent)."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    meta = {"format": FORMAT, "base_version": str(int(base_version)), "num_samples": str(int(num_samples))}
    if client_id is not None:
        meta["client_id"] = str(client_id)
    tensors = {k: _cast(torch.as_tensor(v).detach(), dtype).contiguous().cpu() for k, v in delta.items()}
    return _st_save(tensors, metadata=meta)


def _cast(t, dtype):
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


# safetensors dtype names -> torch dtypes (the format's table; what a payload may declare)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header


class PayloadView:
    """A validated update payload whose tensors stay in the payload's bytes: ``entries`` maps
    each name to (dtype, shape, start, stop), byte offsets into ``buffer``. The server stages each
    tensor from these bytes straight into its row (``array``; fastagg.ops.stage), so decoding
    costs a header parse, not three copies of the update (bytes(), safetensors' tensors, the row)."""

    __slots__ = ("buffer", "entries")

    def __init__(self, buffer, entries):
        self.buffer, self.entries = buffer, entries

    def tensor(self, name) -> torch.Tensor:
        """The tensor ``name`` as a new (owned, writable) tensor."""
        dtype, shape, start, stop = self.entries[name]
        if start == stop:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.buffer[start:stop]), dtype=torch.uint8).view(dtype).view(shape)

    def array(self, name) -> np.ndarray:
        """The tensor ``name`` as a flat read-only numpy view of the payload's bytes (no copy); a
        bfloat16 tensor as its uint16 bit patterns. Floating dtypes only (what a staged update holds)."""
        dtype, shape, start, stop = self.entries[name]
        np_dtype = _NP_BITS[dtype]
        return np.frombuffer(self.buffer, np_dtype, (stop - start) // np_dtype.itemsize, start)


# floating dtypes as numpy reads their bytes: bfloat16 (which numpy lacks) as its bit patterns
_NP_BITS = {torch.float64: np.dtype(np.float64), torch.float32: np.dtype(np.float32),
            torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16)}


def _malformed(why):
    return errors.MalformedUpdateError(f"not a valid safetensors payload: {why}")


def parse_update(payload) -> tuple[PayloadView, dict]:
    """Server side, without copying the tensors: bytes -> (PayloadView, metadata). Checks what
    safetensors' loader checks (header length and JSON, known dtypes, non-negative shapes, each
    tensor's byte range its shape times its dtype's size, the ranges tiling the data exactly) and
    the metadata; raises MalformedUpdateError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise errors.MalformedUpdateError(f"expected bytes, got {type(payload).__name__}")
    try:
        buf = memoryview(payload).cast("B") if isinstance(payload, memoryview) else payload
    except TypeError as exc:  # a memoryview that is not one contiguous run of bytes
        raise errors.MalformedUpdateError(f"expected contiguous bytes ({exc})") from None
    if len(buf) < 8:
        raise _malformed(f"{len(buf)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > min(_MAX_HEADER, len(buf) - 8):
        raise _malformed(f"header length {n} exceeds the payload ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _malformed("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _malformed("__metadata__ must map names to strings")
    base, size = 8 + n, len(buf) - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, stop = info["data_offsets"]
            ok = (all(type(d) is int and d >= 0 for d in shape) and type(start) is int and type(stop) is int
                  and 0 <= start <= stop)
        except (KeyError, TypeError, ValueError):
            raise _malformed(f"tensor {name!r}: needs dtype (one of {sorted(_DTYPES)}), shape and "
                             f"data_offsets, got {info!r}"[:300]) from None
        if not ok:
            raise _malformed(f"tensor {name!r}: bad shape {info['shape']!r} or data_offsets {info['data_offsets']!r}")
        if stop - start != math.prod(shape) * dtype.itemsize:
            raise _malformed(f"tensor {name!r}: {stop - start} bytes for shape {list(shape)} of {info['dtype']}")
        entries[name] = (dtype, shape, base + start, base + stop)
        spans.append((start, stop))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise _malformed("tensor byte ranges overlap or leave a gap")
        end = stop
    if end != size:
        raise _malformed(f"the tensors cover {end} of the {size} data bytes")
    return PayloadView(buf, entries), _parsed_meta(meta)


def _parsed_meta(meta):
    if meta.get("format", FORMAT) != FORMAT:  # absent: bytes written by hand, read as this format
        raise errors.MalformedUpdateError(f"payload format {meta['format']!r}; this server reads {FORMAT!r}")
    parsed = {}
    for key, conv in (("base_version", int), ("num_samples", int), ("client_id", str)):
        if key in meta:
            try:
                parsed[key] = conv(meta[key])
            except ValueError:
                raise errors.MalformedUpdateError(
                    f"metadata {key}={meta[key]!r} is not a valid {conv.__name__}") from None
    return parsed


def decode_update(payload: bytes) -> tuple[dict, dict]:
    """Server side: bytes -> ({name: tensor}, metadata). Raises MalformedUpdateError."""
    view, meta = parse_update(payload)
    return {name: view.tensor(name) for name in view.entries}, meta


def read_metadata(payload: bytes) -> dict:
    """The safetensors metadata of a payload (strings), read from its header alone."""
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + n])
    return header.get("__metadata__", {}) or {}


def encode_model(state: dict, version: int) -> bytes:
    return _st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata={"version": str(version)})


def decode_model(payload: bytes) -> tuple[int, dict]:
    payload = bytes(payload)
    return int(read_metadata(payload)["version"]), _st_load(payload)


def to_tensor_dict(obj) -> dict:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in obj.items()}
