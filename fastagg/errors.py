"""Exceptions raised for rejected updates.

Every rejection raises a subclass of :class:`InvalidUpdate` (itself a ``ValueError``) and
leaves the aggregator exactly as it was, except its rejection counter for that reason.
``reason`` is the key under which ``stats()["rejected"]`` counts it.
"""


class InvalidUpdate(ValueError):
    reason = "invalid"


class MalformedUpdateError(InvalidUpdate):
    """Bytes that are not a valid safetensors payload (truncated, corrupt header, ...)."""

    reason = "malformed"


class UpdateKeysError(InvalidUpdate):
    """The update's key set differs from the model's."""

    reason = "keys"


class UpdateShapeError(InvalidUpdate):
    """A tensor (or the flat update) has the wrong shape or length."""

    reason = "shape"


class UpdateDTypeError(InvalidUpdate):
    """A tensor is not floating point (integer, bool, complex)."""

    reason = "dtype"


class NonFiniteUpdateError(InvalidUpdate):
    """The update holds NaN or Inf."""

    reason = "non_finite"


class UpdateNormError(InvalidUpdate):
    """The update's L2 norm exceeds ``max_update_norm``."""

    reason = "norm"


class FutureVersionError(InvalidUpdate):
    """The base version is newer than the server's current version."""

    reason = "future_version"


class EvictedVersionError(InvalidUpdate):
    """The base version is no longer (or never was) in the version store, and it is needed."""

    reason = "evicted_version"


class StaleUpdateError(InvalidUpdate):
    """The update's staleness exceeds ``max_staleness``."""

    reason = "too_stale"


class DuplicateUpdateError(InvalidUpdate):
    """The same (client_id, base_version) was already accepted."""

    reason = "duplicate"


class BadArgumentError(InvalidUpdate):
    """A submit() argument other than the update itself is invalid (negative sample count...)."""

    reason = "bad_argument"


class BufferFullError(InvalidUpdate):
    """Not bad content: this rank of a DistributedAggregator already holds ``local_capacity``
    updates. Nothing changed; send the update again after the ranks' next step()."""

    reason = "buffer_full"


class PayloadTooLargeError(InvalidUpdate):
    """Not seen by the aggregator: the HTTP server (fastagg.integrations.http) refused a body
    over its ``max_body`` without reading it (HTTP 413); counted in its ``responses``."""

    reason = "too_large"
