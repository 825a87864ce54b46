"""The wire format: safetensors (no pickle; never ``torch.load`` untrusted bytes).

A client update is a safetensors payload whose tensors are the delta (named as in the model's
state_dict) and whose metadata carries ``base_version``, ``num_samples`` and ``client_id``
as strings. A model sent to a client carries ``version`` in its metadata.
"""

from __future__ import annotations

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


def decode_update(payload: bytes) -> tuple[dict, dict]:
    """Server side: bytes -> ({name: tensor}, metadata). Raises MalformedUpdateError."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise errors.MalformedUpdateError(f"expected bytes, got {type(payload).__name__}")
    try:
        tensors = _st_load(bytes(payload))
        meta = read_metadata(bytes(payload))
    except errors.InvalidUpdate:
        raise
    except Exception as exc:  # safetensors raises its own error types, and struct/json errors
        raise errors.MalformedUpdateError(f"not a valid safetensors payload: {exc}") from None
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
    return tensors, parsed


def read_metadata(payload: bytes) -> dict:
    """The safetensors metadata of a payload (strings), read from its header alone."""
    import json
    import struct

    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + n])
    return header.get("__metadata__", {}) or {}


def encode_model(state: dict, version: int) -> bytes:
    return _st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata={"version": str(version)})


def decode_model(payload: bytes) -> tuple[int, dict]:
    tensors = _st_load(bytes(payload))
    return int(read_metadata(bytes(payload))["version"]), tensors


def to_tensor_dict(obj) -> dict:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in obj.items()}
