"""The aggregator: FedAsync, FedBuff and FedADT (either rule + KD correction) behind one API.

    agg = Aggregator(model, rule=FedBuff(buffer_size=10), staleness=polynomial(0.5),
                     correction=KDCorrection(proxy=x_proxy))
    version, params = agg.pull()
    receipt = agg.submit(delta, base_version=version, num_samples=64, client_id="c17")

``submit`` is thread-safe. It validates the update (DESIGN.md section 7) and raises a subclass
of ``fastagg.errors.InvalidUpdate`` on bad input, leaving the parameters, version, buffer and
every counter but ``rejected[reason]`` unchanged. Accepted updates are written straight into a
preallocated [capacity, P] buffer; when it is full (FedBuff: buffer_size, FedAsync:
batch_size) they are corrected and merged in one fused pass.

``delta_dtype=torch.bfloat16`` (or float16) holds buffered updates in 16 bits: half the buffer's
memory and the merge's reads and, on a GPU, half the bytes of each host update's copy to the
device (PCIe bounds how many host updates per second a GPU server can take). An update is
rounded to it at ingest (nothing is lost when the client sent that dtype:
``encode_update(..., dtype=torch.bfloat16)``); models, students and accumulation stay fp32.

``compute_stream=True`` (CUDA only) runs each buffer's correction and merge on a CUDA stream of
the aggregator's own. Updates already on the device are then written and norm-checked on the
caller's stream while the previous buffer's correction still runs, instead of after it (the norm
check reads back to the host, so on one stream the first submit after a merge waits for the whole
correction). Every read of the global model through the aggregator (``params``, ``pull``,
``pull_bytes``, ``state_dict``, ``load_into``) and every write (``set_global``,
``load_state_dict``) orders the caller's current stream after the merges enqueued so far; a
reference to ``agg.params`` kept across later submits is not re-ordered: read ``agg.params``
again. Host updates are not affected (they go to the device on an ingest stream of their own).
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import math
import numbers
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import backends, errors, wire
from . import rules as _rules
from . import staleness as _staleness
from .flat import ParamSpec, check_float, check_keys
from .ops.merge import fused_merge, to_device
from .ops.stage import STAGED_DTYPES, stage_row, sum_squares, widened
from .version_store import VersionStore


@dataclass(frozen=True)
class Receipt:
    seq: int  # order of acceptance: replaying accepted updates in seq order gives the same model
    client_id: object
    base_version: int
    staleness: int  # staleness at merge time (t_merge - base_version)
    status: str  # "buffered" or "merged"
    version: int  # the global version after this submit returned


@dataclass
class _Pending:
    seq: int
    client_id: object
    base_version: int
    num_samples: int
    staleness: int
    norm: float | None = None  # the buffered delta's L2 norm, measured at ingest
    row: int | None = None  # its row of the delta buffer (None: a checkpoint's, rows 0, 1, ... in order)


_DELTA_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
def _add_rows(dst, src):
    """dst += src for [n, P] rows; a 16-bit ``src`` on a CPU through widened."""
    if src.dtype == dst.dtype or dst.is_cuda:
        dst.add_(src)
        return
    flat = dst.view(-1)
    for i, piece in widened(src, dst.dtype):
        flat[i:i + piece.numel()].add_(piece)


def _finite_norm(row) -> float:
    """L2 norm of a device row, raising NonFiniteUpdateError when it holds NaN or Inf."""
    return _norm_of(float(torch.linalg.vector_norm(row, dtype=_norm_dtype(row))) ** 2 if row.is_cuda
                    else sum_squares(row), row)


def _norm_dtype(rows):
    """The dtype a device norm of ``rows`` accumulates in: float32, float64 for float64 rows."""
    return torch.float64 if rows.dtype == torch.float64 else torch.float32


def _norm_of(sq, row) -> float:
    """The L2 norm of ``row`` from the sum of its squares ``sq`` (measured while staging it), or
    NonFiniteUpdateError. A non-finite sum means NaN or Inf, or finite squares past the
    accumulator's range: ``isfinite`` (21 ms for 11M fp32 values on this project's CPU, against
    0.6 ms for the sum) only runs then, to tell which."""
    if math.isfinite(sq):
        return math.sqrt(sq)
    if not bool(torch.isfinite(row).all()):
        if row.dtype == torch.float16:
            raise errors.NonFiniteUpdateError(
                "update holds NaN or Inf as float16 (the aggregator's delta_dtype): values beyond ±65504 overflow")
        raise errors.NonFiniteUpdateError("update holds NaN or Inf")
    return float(row.double().norm())


class _Ingest:
    """A GPU aggregator's host-to-device side: pinned staging rows, and each staged row's copy
    into its delta row on a side stream, ordered by CUDA events. (tests/test_staged_path.py
    runs the aggregator's staged path on a CPU with a stand-in for this class whose copies
    complete late, at any point between their enqueueing and the wait that needs them.)"""

    @staticmethod
    def used_on(device) -> bool:
        return device.type == "cuda"

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @staticmethod
    def pinned(rows, numel, dtype):
        return torch.empty(rows, numel, dtype=dtype, pin_memory=True)

    def copy(self, dst, src, after=None):
        """Enqueue ``dst <- src`` on the side stream, behind the event ``after`` when given; returns
        the event that marks the copy done (``synchronize()`` waits for it on the host)."""
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def join(self):
        """Order the compute stream after every copy enqueued so far."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def mark(self):
        """An event at the compute stream's end: what copies into a delta buffer must wait for once
        a merge that reads that buffer has been enqueued."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done


class Aggregator:
    _merges_when_full = True  # a full buffer merges inside the submit that filled it

    def __init__(self, model: torch.nn.Module, rule=None, staleness="polynomial", correction=None, *,
                 max_staleness: int | None = None, max_update_norm: float | None = None,
                 max_versions: int = 16, max_store_bytes: int = 2 << 30, on_evicted: str = "applied",
                 device=None, backend: str = "auto", delta_dtype=None, compute_stream: bool = False):
        if on_evicted not in ("applied", "reject"):
            raise ValueError(f"on_evicted must be 'applied' or 'reject', got {on_evicted!r}")
        if max_update_norm is not None and not (isinstance(max_update_norm, numbers.Real) and
                                                math.isfinite(max_update_norm) and max_update_norm > 0):
            raise ValueError(f"max_update_norm must be None or a finite number > 0, got {max_update_norm!r}")
        if max_staleness is not None and (isinstance(max_staleness, bool) or
                                          not isinstance(max_staleness, numbers.Integral) or max_staleness < 0):
            raise ValueError(f"max_staleness must be None or an int >= 0, got {max_staleness!r}")
        self.model = model
        self.rule = _rules.resolve(rule or _rules.FedAsync())
        self.staleness = _staleness.resolve(staleness)
        self.correction = correction
        self.max_staleness = max_staleness
        self.max_update_norm = max_update_norm
        self.on_evicted = on_evicted
        self.spec = ParamSpec.from_module(model)
        state = model.state_dict()
        first = state[self.spec.names[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
        self.delta_dtype = _delta_dtype(delta_dtype, self.dtype)
        self.backend = backends.resolve(backend, self.device, self.dtype)
        if self.backend in ("cpp", "numba") and self.device.type != "cpu":  # their kernels read host memory
            raise ValueError(f"backend {backend!r} runs its kernels on CPU tensors, but the model is on {self.device}: "
                             f"use 'auto', 'triton' or 'torch' there")
        backends.get("fused_merge", self.backend, self.device)  # an unavailable backend fails here, not mid-merge
        if not isinstance(compute_stream, bool):
            raise ValueError(f"compute_stream must be True or False, got {compute_stream!r}")
        if compute_stream and self.device.type != "cuda":
            raise ValueError(f"compute_stream=True runs correction and merge on a CUDA stream: it needs a CUDA "
                             f"device, got device={self.device}")
        # the stream that corrections and merges run on (None: the caller's current stream)
        self._compute = torch.cuda.Stream(self.device) if compute_stream else None
        P = self.spec.numel
        self._params = self.spec.flatten({n: state[n] for n in self.spec.names},
                                        out=torch.empty(P, dtype=self.dtype, device=self.device))
        self.version = 0
        self._capacity = self._buffer_capacity()
        self._deltas = torch.empty(self._capacity, P, dtype=self.delta_dtype, device=self.device)
        # On a GPU, host updates land in pinned staging rows and go to the device asynchronously on
        # an ingest stream into the other of two delta buffers, so that ingest of the next buffer
        # (host work and the copies) overlaps the correction and merge of this one. Two orderings
        # keep that safe: a staging row is rewritten only once its last copy has left it (an event
        # per row, waited for on the host), and a copy into a delta buffer waits for the merge
        # that last read that buffer (an event per buffer, recorded on the compute stream).
        self._staging = self._ingest = None
        if _Ingest.used_on(self.device):
            # two rows at least: a rule that holds one update (FedAsync's default batch of one)
            # stages the next update while the copy of the previous one runs (see _take_row)
            rows = max(2, self._capacity)
            self._ingest = _Ingest(self.device)
            self._staging = self._ingest.pinned(rows, P, self.delta_dtype)
            self._row_copied = [None] * rows
            self._delta_sets = [self._deltas, torch.empty_like(self._deltas)]
            self._set, self._set_merged = 0, [None, None]
        # Host updates are staged into rows outside the lock (see submit): on a GPU the pinned
        # staging rows, each free again once its copy is enqueued; on a CPU the delta rows
        # themselves, free again once merged (so a buffered update's row need not be its slot).
        self._stage_rows = self._staging if self._staging is not None else self._deltas
        self._free_rows = list(range(self._stage_rows.shape[0]))[::-1]
        self._staging_now = 0  # rows being staged into now
        self._host_backend = self.backend if self.backend in ("cpp", "numba", "torch") \
            else backends.resolve("auto", "cpu")  # triton: a GPU's (or the interpreter's) host side
        self._stage_threads = backends.cpu_threads() if self._host_backend == "cpp" else 1
        self._pending: list[_Pending] = []
        self._momentum = self._momentum_next = None
        self._needs_base = isinstance(self.rule, _rules.FedAsync) or (
            correction is not None and correction.student == "client")
        self._store = VersionStore(P, self.dtype, self.device, max_versions, max_store_bytes)
        self._generation, self._model_bytes = 0, None  # pull_bytes' cache: (generation, payload)
        self._params_committed()
        if correction is not None:
            correction.bind(model, self.spec, self.device, self.dtype, self.backend)
            correction.check_fits(self._params)
        self._lock = threading.RLock()
        self._rows_freed = threading.Condition(self._lock)
        self._seq = 0
        # duplicate detection: base version -> client ids seen on it; versions older than
        # max_staleness are dropped at each merge (such updates are rejected as too stale anyway)
        self._seen: dict = collections.defaultdict(set)
        self._counters = collections.Counter()
        self._rejected = collections.Counter()
        self._hist = collections.Counter()
        self._last_lambda = None

    def _buffer_capacity(self):
        return self.rule.capacity

    @property
    def params(self) -> torch.Tensor:
        """The global model as one flat [P] tensor: the aggregator's own buffer, not a copy (write
        it through ``set_global``). With ``compute_stream``, reading it orders the current CUDA
        stream after the merges enqueued so far."""
        self._after_compute()
        return self._params

    @property
    def store(self) -> VersionStore:
        """The version store (recent global versions, for the client students and FedAsync's base
        rows). Like ``params``, reading it orders the current CUDA stream after the merges enqueued
        so far when there is a compute stream."""
        self._after_compute()
        return self._store

    def _after_compute(self):
        """Order the caller's current stream after the corrections and merges enqueued so far, before
        it reads or writes what they read or write (no-op without a compute stream)."""
        if self._compute is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._compute)

    def _on_compute(self):
        """The context a merge runs in: the compute stream (when there is one), ordered after what
        the caller's current stream holds so far (device updates written into their delta rows)."""
        if self._compute is None:
            return contextlib.nullcontext()
        self._compute.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._compute)

    # -- clients' side -----------------------------------------------------------------------
    def pull(self, flat: bool = False):
        """(version, parameters): a copy, as {name: tensor} or as the flat [P] vector."""
        with self._lock:
            self._after_compute()
            if flat:
                return self.version, self._params.clone()
            state = {k: v.clone() for k, v in self.spec.unflatten(self._params).items()}
            return self.version, self.spec.with_aliases(state)

    def pull_bytes(self) -> bytes:
        """The current model in the wire format (safetensors, version in the metadata). Encoded
        once per change of the parameters (the clients of a version share one payload), outside
        the lock, from a copy, so that submits are not held up by the serialisation. A payload
        already encoded is returned without the lock: a pull does not wait for a merge in
        progress, and gets the version before it (the merge has not committed yet)."""
        cached = self._model_bytes  # read before the generation: a commit in between is seen
        if cached is not None and cached[0] == self._generation:
            return cached[1]
        with self._lock:
            generation, cached = self._model_bytes or (None, None)
            if generation == self._generation:
                return cached
            self._after_compute()
            generation, version, params = self._generation, self.version, self._params.clone()
        payload = wire.encode_model(self.spec.with_aliases(self.spec.unflatten(params)), version)
        with self._lock:
            if generation == self._generation:  # nothing merged meanwhile
                self._model_bytes = (generation, payload)
        return payload

    def _params_committed(self):
        """The parameters changed (merge, set_global, broadcast): store them as this version and
        drop what was derived from the old ones."""
        self._store.push(self.version, self._params)
        self._generation += 1

    def submit(self, update, base_version: int | None = None, num_samples: int | None = None,
               client_id=None) -> Receipt:
        """Validate and accept one update (a delta against ``base_version``).

        ``update``: {name: tensor} with exactly the model's floating keys, a flat [P] tensor (or 1-D numpy array), a
        list of arrays in state_dict order, or safetensors bytes (see fastagg.wire), whose
        metadata may carry base_version / num_samples / client_id.

        Thread-safe, and a host update is staged outside the aggregator's lock: a submit takes
        a free row under the lock, copies the update into it (converting its dtype and summing
        its squares for the norm check in one pass, fastagg.ops.stage) without the lock, and
        takes the lock again to commit it, so that concurrent submits stage in parallel. The
        checks that depend on the server's state run at both ends (a merge may have happened
        while the update was staged).
        """
        try:
            if isinstance(update, (bytes, bytearray, memoryview)):
                update, meta = wire.parse_update(update)  # the tensors stay in the bytes until staged
                base_version = meta.get("base_version") if base_version is None else base_version
                num_samples = meta.get("num_samples") if num_samples is None else num_samples
                client_id = meta.get("client_id") if client_id is None else client_id
            base_version, num_samples = _check_args(base_version, num_samples, client_id)
            if self._staging is not None and isinstance(update, torch.Tensor) and update.is_cuda:
                with self._lock:  # already on the device: written straight into its delta row
                    return self._accept_on_device(update, base_version, num_samples, client_id)
            return self._accept_host(update, base_version, num_samples, client_id)
        except errors.InvalidUpdate as exc:
            with self._lock:
                self._rejected[exc.reason] += 1
            raise

    def submit_many(self, updates, base_versions=None, num_samples=None, client_ids=None) -> list:
        """Submit several updates as that many ``submit`` calls in order would, except that an
        invalid update's error is returned in its place instead of raised (it is counted as
        rejected and changes nothing; the updates around it are taken as usual). Returns a list
        with a ``Receipt`` or an ``errors.InvalidUpdate`` per update.

        ``updates``: a [n, P] tensor (a flat update per row) or a sequence of anything ``submit``
        takes. ``base_versions``, ``num_samples``: one int for every update or a sequence of n;
        ``client_ids``: a sequence of n (one id for several updates on one version would make all
        but the first duplicates). None: as ``submit`` (from each payload's metadata where it has
        some; num_samples 1).

        A [n, P] tensor on the aggregator's GPU takes the batched path: each buffer's share of it
        is written into its delta rows by one copy, and their norms are read back to the host
        once, instead of once per update (each such read waits for the device's work queued
        before it). A batch malformed as a whole raises before anything is taken: a tensor of
        rows that are not P floats (counted as n rejected updates, as n submits would be), or
        argument sequences of another length (ValueError). An error that is not an
        update's fault (a merge that fails) is raised as ``submit`` raises it: the updates before
        it stay taken, that one and those after it are not.
        """
        if isinstance(updates, torch.Tensor):
            if updates.dim() != 2:
                raise ValueError(f"submit_many takes a [n, P] tensor (a flat update per row) or a sequence of "
                                 f"updates, got a tensor of shape {tuple(updates.shape)}")
            n = updates.shape[0]
        elif isinstance(updates, (dict, bytes, bytearray, memoryview, str)) or \
                not isinstance(updates, collections.abc.Sequence):
            raise ValueError(f"submit_many takes a [n, P] tensor or a sequence of updates, got "
                             f"{type(updates).__name__} (submit takes one update)")
        else:
            n = len(updates)
        args = [_per_update(base_versions, n, "base_versions", scalar=True),
                _per_update(num_samples, n, "num_samples", scalar=True),
                _per_update(client_ids, n, "client_ids", scalar=False)]
        if isinstance(updates, torch.Tensor):
            try:  # every row has the batch's shape and dtype: all n updates are rejected at once
                if updates.shape[1] != self.spec.numel:
                    raise errors.UpdateShapeError(f"a batch of flat updates must have shape (n, {self.spec.numel}), "
                                                  f"got {tuple(updates.shape)}")
                check_float("batch of updates", updates.dtype)
            except errors.InvalidUpdate as exc:
                with self._lock:
                    self._rejected[exc.reason] += n
                raise
            if self._staging is not None and self._merges_when_full and updates.device.type == self.device.type:
                results = [None] * n
                for k in range(n):  # the arguments' checks, as submit makes them first
                    try:
                        base, samples = _check_args(args[0][k], args[1][k], args[2][k])
                        args[0][k], args[1][k] = base, samples
                    except errors.InvalidUpdate as exc:
                        results[k] = exc
                with self._lock:
                    for k, exc in enumerate(results):
                        if exc is not None:
                            self._rejected[exc.reason] += 1
                    self._accept_many_on_device(updates, *args, results)
                return results
        results = []
        for k in range(n):
            try:
                results.append(self.submit(updates[k], args[0][k], args[1][k], args[2][k]))
            except errors.InvalidUpdate as exc:  # counted by submit
                results.append(exc)
        return results

    def _accept_many_on_device(self, updates, bases, samples, cids, results):
        """submit_many's batched path (under the lock): the updates not yet rejected (``results[k]``
        None), a buffer's share at a time: written into the free delta rows by one copy, their
        norms read back once, then admitted and committed one by one in order, as submit would."""
        todo = [k for k in range(len(results)) if results[k] is None]
        while todo:
            slot = len(self._pending)
            take, todo = todo[:self._capacity - slot], todo[self._capacity - slot:]
            rows = self._deltas[slot:slot + len(take)]  # scratch until committed
            if self._compute is not None and self._set_merged[self._set] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._set_merged[self._set])  # see _accept_on_device
            src = updates[take[0]:take[-1] + 1] if take[-1] - take[0] == len(take) - 1 else updates[take]
            rows.copy_(src.detach())  # an update that requires grad must not make the buffer part of its graph
            norms = torch.linalg.vector_norm(rows, dim=1, dtype=_norm_dtype(rows)).tolist()  # the one read-back
            for j, k in enumerate(take):
                try:
                    s = self._admit(bases[k], cids[k])
                    norm = _norm_of(norms[j] ** 2, rows[j])
                    if self.max_update_norm is not None and norm > self.max_update_norm:
                        raise errors.UpdateNormError(
                            f"update norm {norm:.4g} exceeds max_update_norm={self.max_update_norm}")
                except errors.InvalidUpdate as exc:
                    self._rejected[exc.reason] += 1
                    results[k] = exc
                    continue
                row = self._deltas[len(self._pending)]
                if len(self._pending) != slot + j:  # an update rejected before it left its row empty
                    row.copy_(rows[j])
                results[k] = self._commit(None, row, bases[k], samples[k], cids[k], s, norm)

    def _admit(self, base_version, client_id) -> int:
        """The checks against the server's state (under the lock): the update's staleness, or
        the error that rejects it."""
        if base_version > self.version:
            raise errors.FutureVersionError(f"base version {base_version} is newer than the server's {self.version}")
        if client_id is not None and client_id in self._seen.get(base_version, ()):
            raise errors.DuplicateUpdateError(
                f"client {client_id!r} already submitted an update on version {base_version}")
        offset = len(self._pending) if isinstance(self.rule, _rules.FedAsync) else 0
        s = self.version + offset - base_version
        if self.max_staleness is not None and s > self.max_staleness:
            raise errors.StaleUpdateError(f"staleness {s} exceeds max_staleness={self.max_staleness}")
        if self._needs_base and base_version not in self._store and self.on_evicted == "reject":
            raise errors.EvictedVersionError(
                f"base version {base_version} is not in the version store (holds {self._store.versions[:1]}.."
                f"{self._store.versions[-1:]}) and on_evicted='reject'")
        return s

    def _accept_host(self, update, base_version, num_samples, client_id):
        """Reserve a staging row, stage the update into it without the lock, commit."""
        with self._lock:
            self._admit(base_version, client_id)  # fail fast: no staging for a doomed update
            while not self._free_rows:  # every row is staged into or buffered: a merge frees them
                self._rows_freed.wait()
            r = self._take_row()
            self._staging_now += 1
            threads = max(1, self._stage_threads // self._staging_now)
        try:
            if self._staging is not None and self._row_copied[r] is not None:
                self._row_copied[r].synchronize()  # the row's last copy to the device has left it
            row = self._stage_rows[r]
            norm = _norm_of(self._write_row(update, row, threads), row)
            if self.max_update_norm is not None and norm > self.max_update_norm:
                raise errors.UpdateNormError(f"update norm {norm:.4g} exceeds max_update_norm={self.max_update_norm}")
        except BaseException:
            with self._lock:
                self._staged(r, free=True)
            raise
        with self._lock:
            self._staged(r, free=False)
            try:
                s = self._admit(base_version, client_id)  # again: a merge may have happened meanwhile
            except BaseException:
                self._free_row(r)
                raise
            return self._commit(r, row, base_version, num_samples, client_id, s, norm)

    def _staged(self, r, free):
        """Row ``r``'s staging ended (under the lock); ``free``: it holds nothing to keep."""
        self._staging_now -= 1
        if free:
            self._free_row(r)
        else:
            self._rows_freed.notify_all()  # load_state_dict waits for every staging to end

    def _take_row(self) -> int:
        """A free staging row (under the lock). On a CPU the lowest: one thread fills rows 0, 1,
        ..., so that a buffer's rows are its slots and the merge reads them without an index. On
        a GPU the row freed longest ago: a pinned row is free again as soon as its copy to the
        device is enqueued, and staging into it must first wait for that copy to land, so taking
        the same row again would make each submit wait for the previous one's copy (~0.1 ms for
        4 MB at 50 GB/s) instead of staging while it runs."""
        return self._free_rows.pop() if self._staging is None else self._free_rows.pop(0)

    def _free_row(self, *rows):
        self._free_rows.extend(rows)  # a GPU's: in the order freed, oldest first (see _take_row)
        if self._staging is None:
            self._free_rows.sort(reverse=True)  # pop() takes the lowest
        self._rows_freed.notify_all()

    def _accept_on_device(self, update, base_version, num_samples, client_id):
        s = self._admit(base_version, client_id)
        slot = len(self._pending)
        row = self._deltas[slot]  # scratch until committed
        if self._compute is not None and self._set_merged[self._set] is not None:
            # the row is rewritten on the caller's stream: after the merge that last read this
            # delta buffer (the one before the last: the last merge, perhaps still running, read the other)
            torch.cuda.current_stream(self.device).wait_event(self._set_merged[self._set])
        self._write_row(update, row)
        norm = _finite_norm(row)
        if self.max_update_norm is not None and norm > self.max_update_norm:
            raise errors.UpdateNormError(f"update norm {norm:.4g} exceeds max_update_norm={self.max_update_norm}")
        return self._commit(None, row, base_version, num_samples, client_id, s, norm)

    def _commit(self, r, row, base_version, num_samples, client_id, s, norm):
        """Buffer a staged update (nothing here raises on bad input); merge when full. ``r``: its
        staging row (None: written into its delta row on the device)."""
        slot = len(self._pending)
        if self._staging is not None:  # a GPU: the row's bytes go to the device on the ingest stream
            if r is not None:  # once the last merge of this delta buffer has read it
                self._row_copied[r] = self._ingest.copy(self._deltas[slot], row, after=self._set_merged[self._set])
                self._free_row(r)
            r = slot
        seq = self._seq
        self._seq += 1
        if client_id is not None:
            self._seen[base_version].add(client_id)
        self._pending.append(_Pending(seq, client_id, base_version, num_samples, s, norm, r))
        self._counters["accepted"] += 1
        status = "buffered"
        if len(self._pending) == self._capacity and self._merges_when_full:
            try:
                self._merge_pending()
            except BaseException:
                # The merge failed where merges fail (in the correction: a proxy that does not fit
                # the model, out of memory; or at the write of the parameters, the new momentum
                # still aside) and undid its counts: undo this submit too, so that nothing changed
                # and the client may send it again.
                self._pending.pop()
                self._seq -= 1
                self._counters["accepted"] -= 1
                self._counters["merge_failures"] += 1
                if client_id is not None:
                    self._seen[base_version].discard(client_id)
                if self._staging is None:
                    self._free_row(r)
                raise
            status = "merged"
        return Receipt(seq, client_id, base_version, s, status, self.version)

    def _write_row(self, update, row, threads=1):
        """Copy ``update`` into ``row`` after checking its structure; nothing is written before
        every part is checked. Returns the sum of the stored values' squares for a host row (the
        norm check's), None for a device row."""
        spec = self.spec
        if isinstance(update, np.ndarray) and update.ndim == 1:  # a flat update as numpy
            update = _as_tensor("flat update", update)
        if isinstance(update, torch.Tensor):
            if update.dim() != 1 or update.numel() != spec.numel:
                raise errors.UpdateShapeError(
                    f"a flat update must have shape ({spec.numel},), got {tuple(update.shape)}")
            check_float("flat update", update.dtype)
            pieces = [(update, row)]
        elif isinstance(update, dict):
            check_keys(spec, update)
            pieces = []
            for name, shape, off, n in spec.items():
                t = update[name]
                t = t if isinstance(t, torch.Tensor) else _as_tensor(repr(name), t)
                if tuple(t.shape) != shape:
                    raise errors.UpdateShapeError(f"{name!r} has shape {tuple(t.shape)}, expected {shape}")
                check_float(name, t.dtype)
                pieces.append((t.reshape(-1), row[off:off + n]))
        elif isinstance(update, wire.PayloadView):
            check_keys(spec, update.entries)
            pieces = []
            for name, shape, off, n in spec.items():
                dtype, shp = update.entries[name][:2]
                if shp != shape:
                    raise errors.UpdateShapeError(f"{name!r} has shape {shp}, expected {shape}")
                check_float(name, dtype)
                pieces.append(((update.array(name), dtype), row[off:off + n]))
        elif isinstance(update, (list, tuple)):
            if len(update) != len(spec):
                raise errors.UpdateKeysError(f"got {len(update)} arrays, the model has {len(spec)} tensors")
            pieces = []
            for (name, shape, off, n), arr in zip(spec.items(), update):
                t = _as_tensor(f"array {name!r}", arr)
                if tuple(t.shape) != shape:
                    raise errors.UpdateShapeError(f"array {name!r} has shape {tuple(t.shape)}, expected {shape}")
                check_float(name, t.dtype)
                pieces.append((t.reshape(-1), row[off:off + n]))
        else:
            raise errors.MalformedUpdateError(
                f"unsupported update type {type(update).__name__}: pass a state_dict, a flat tensor, "
                "a list of arrays or safetensors bytes")
        if row.is_cuda:
            for src, dst in pieces:
                dst.copy_(src.detach())  # an update that requires grad must not make the row part of its graph
            return None
        return math.fsum(self._stage(src, dst, threads) for src, dst in pieces)

    def _stage(self, src, dst, threads):
        """One piece of a host update into its part of a host row; its sum of squares."""
        src, dtype = src if isinstance(src, tuple) else (src, src.dtype)
        if dtype in STAGED_DTYPES and (isinstance(src, np.ndarray) or (src.device.type == "cpu" and src.is_contiguous())):
            return stage_row(src, dst, self._host_backend, src_dtype=dtype, threads=threads)
        if isinstance(src, np.ndarray):  # a float8 payload, say: torch reads it, from a copy
            src = torch.from_numpy(src.copy()).view(dtype)
        dst.copy_(src.detach())  # a device tensor into a host row, a strided or exotic one
        return sum_squares(dst)

    # -- merging -----------------------------------------------------------------------------
    def flush(self) -> int:
        """Merge whatever is buffered now (a partial FedBuff buffer included). Returns the version."""
        with self._lock:
            if self._pending:
                try:
                    self._merge_pending()
                except BaseException:  # nothing changed (see _commit); the buffer stays for a retry
                    self._counters["merge_failures"] += 1
                    raise
            return self.version

    def _wait_ingest(self):
        """Order the compute stream after the pending host-to-device copies of the buffer."""
        if self._ingest is not None:
            self._ingest.join()

    def _work_rows(self, n):
        """The first n rows of the students buffer and of the gradients': the correction engine's
        own work rows, which its captured passes read and write in place (engine.work_rows)."""
        students, grads = self.correction.engine.work_rows(self._capacity, self.dtype)
        return students[:n], grads[:n]

    def _buffered(self, pend):
        """The buffered deltas: (rows, index), update k being rows[index[k]] (index None: rows[k])."""
        rows = [p.row for p in pend]
        if rows == list(range(len(rows))):
            return self._deltas[:len(rows)], None
        return self._deltas, rows

    def _merge_pending(self):
        with self._on_compute():
            self._merge_buffer()

    def _merge_buffer(self):
        self._wait_ingest()
        pend = self._pending
        K = len(pend)
        D, idx = self._buffered(pend)
        w = self._staleness_weights(pend)
        slots = self._base_slots(pend)
        fedasync = isinstance(self.rule, _rules.FedAsync)
        kept = self._counters["corrected"], self._last_lambda
        try:  # where merges fail: before (or at) the write of the parameters; see _commit
            corr_idx, corr_rows, corr_scale = self._correct(D, idx, pend, slots)
            if fedasync:
                c0, coefs = self.rule.coefficients(w)
                base_idx = [s for s in slots if s is not None]
                base_coef = [coefs[k] for k in range(K) if slots[k] is not None]
                c0 += sum(coefs[k] for k in range(K) if slots[k] is None)  # evicted base: theta_t0 stands in
                groups = [(D, coefs, idx), (self._store.rows, base_coef, base_idx)]
                if corr_idx:
                    groups.append((corr_rows, _scaled(coefs, corr_idx, corr_scale, self.device), None))
                fused_merge(self._params, c0, groups, out=self._params, backend=self.backend)
            else:
                a = self.rule.coefficients(w, [p.num_samples for p in pend])
                self._apply_buffered(self._delta_groups(D, idx, a, corr_idx, corr_rows, corr_scale))
        except BaseException:
            self._counters["corrected"], self._last_lambda = kept
            raise
        self.version += K if fedasync else 1
        self._finish_merge(pend, slots)

    def _staleness_weights(self, pend):
        w = [float(self.staleness(p.staleness)) for p in pend]
        bad = next((x for x in w if not (math.isfinite(x) and 0 <= x <= 1)), None)
        if bad is not None:  # a user's function: refused here, so that the merge changes nothing
            raise ValueError(f"the staleness function {self.staleness!r} gave the weight {bad}: it must be "
                             "a number in [0, 1]")
        return w

    def _base_slots(self, pend):
        """Each buffered update's base version's row in the store (None: evicted or not needed)."""
        return [self._store.slot(p.base_version) if self._needs_base else None for p in pend]

    def _correct(self, D, idx, pend, slots):
        """KD-correct the buffered deltas (D, idx: see _buffered) against the current model:
        (corr_idx, rows, scale), the corrected k in corr_idx having delta'_k = delta_k - scale[j] * rows[j]."""
        if self.correction is None:
            return [], None, None
        corr, K, t0 = self.correction, len(pend), self.version
        teacher = corr.teacher(self._params, t0)
        self._last_lambda = float(corr.schedule(t0, teacher))
        lam = [corr.weight(t0, teacher, p.staleness) for p in pend]
        corr_idx = [k for k in range(K) if lam[k] > 0]
        if not corr_idx:
            return [], None, None
        n = len(corr_idx)
        sel = corr_idx if idx is None else [idx[k] for k in corr_idx]  # their rows of D
        students, grads = self._work_rows(n)
        src = [slots[k] for k in corr_idx] if corr.student == "client" else [None] * n
        if all(s is not None for s in src):  # students = their base versions + their deltas
            torch.index_select(self._store.rows, 0, to_device(src, torch.int64, self.device), out=students)
        else:  # an evicted base (or student="applied"): the current model stands in
            for j, s in enumerate(src):
                students[j].copy_(self._store.rows[s] if s is not None else self._params)
        norms = [pend[k].norm for k in corr_idx]
        if sel == list(range(n)):
            deltas = D[:n]
        elif D.is_cuda or None in norms:  # gathered (the correction measures the norms it lacks)
            deltas = D.index_select(0, to_device(sel, torch.int64, self.device))
        else:  # rows out of order on a CPU (staged concurrently): added row by row, not gathered
            deltas = None
            for j, r in enumerate(sel):
                _add_rows(students[j:j + 1], D[r:r + 1])
        if deltas is not None:
            _add_rows(students, deltas)
        rows, scale = corr.correct(students, deltas, [lam[k] for k in corr_idx], teacher, out=grads,
                                   delta_norms=None if None in norms else norms)
        self._counters["corrected"] += n
        return corr_idx, rows, scale

    def _delta_groups(self, D, idx, coefs, corr_idx, corr_rows, corr_scale):
        """Merge row groups for sum_k coefs[k] * delta'_k."""
        groups = [(D, coefs, idx)]
        if corr_idx:
            groups.append((corr_rows, _scaled(coefs, corr_idx, corr_scale, self.device), None))
        return groups

    def _apply_buffered(self, groups):
        """FedBuff's server update from the rows of u = sum_k (a_k / N) delta'_k: with momentum
        m <- beta m + u, theta <- theta + eta_g m; without, theta <- theta + eta_g u in one pass."""
        rule = self.rule
        if rule.momentum > 0:
            if self._momentum is None:
                self._momentum = torch.zeros_like(self._params)
            if self._momentum_next is None:
                self._momentum_next = torch.empty_like(self._params)
            # the new momentum goes to a second buffer, swapped in once the parameters took it:
            # a failure before the last write leaves the momentum as it was (see _commit)
            m = self._momentum_next
            fused_merge(self._momentum, rule.momentum, groups, out=m, backend=self.backend)
            fused_merge(self._params, 1.0, [(m[None], [rule.server_lr], None)], out=self._params, backend=self.backend)
            self._momentum, self._momentum_next = m, self._momentum
        else:
            groups = [(rows, _times(rule.server_lr, coefs), idx) for rows, coefs, idx in groups]
            fused_merge(self._params, 1.0, groups, out=self._params, backend=self.backend)

    def _finish_merge(self, pend, slots):
        """After the parameters moved: store the new version, swap the delta buffers, count."""
        self._params_committed()
        if self._ingest is not None:  # the next buffer fills the other delta buffer
            self._set_merged[self._set] = self._ingest.mark()
            self._set ^= 1
            self._deltas = self._delta_sets[self._set]
        if self.max_staleness is not None:
            for v in [v for v in self._seen if v < self.version - self.max_staleness]:
                del self._seen[v]
        self._counters["merged"] += len(pend)
        if self._needs_base:
            self._counters["fallbacks"] += sum(1 for s in slots if s is None)
        for p in pend:
            self._hist[p.staleness] += 1
        self._pending = []
        if self._staging is None:  # a CPU's delta rows are its staging rows: free for the next buffer
            self._free_row(*(p.row for p in pend))

    # -- inspection and checkpoints ----------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            merged = self._counters["merged"]
            mean_s = (sum(s * n for s, n in self._hist.items()) / merged) if merged else 0.0
            return {
                "version": self.version,
                "accepted": self._counters["accepted"],
                "merged": merged,
                "buffered": len(self._pending),
                "rejected": dict(self._rejected),
                "rejected_total": sum(self._rejected.values()),
                "corrected": self._counters["corrected"],
                "fallbacks": self._counters["fallbacks"],
                "merge_failures": self._counters["merge_failures"],
                "staleness_histogram": dict(sorted(self._hist.items())),
                "mean_staleness": mean_s,
                "lambda": self._last_lambda,
                "teacher_forwards": self.correction.teacher_forwards if self.correction else 0,
                "backend": self.backend,
                "delta_dtype": str(self.delta_dtype).replace("torch.", ""),
                "store": {"versions": len(self._store.versions), "capacity": self._store.capacity,
                          "bytes_reserved": self._store.nbytes, "bytes_used": self._store.used_bytes(),
                          "evictions": self._store.evictions},
            }

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: parameters, version, buffer, momentum,
        version store, duplicate-detection set and counters."""
        with self._lock:
            self._wait_ingest()  # the buffered rows may still be on their way to the device
            self._after_compute()  # and the last merge may still be writing the model and the store
            return {
                "format": "fastagg-aggregator-1",
                "version": self.version,
                "params": self._params.clone(),
                "pending_deltas": self._pending_deltas(),
                "pending": [asdict(p) for p in self._pending],
                "momentum": None if self._momentum is None else self._momentum.clone(),
                "store": self._store.state_dict(),
                "seq": self._seq,
                "seen": sorted(((c, v) for v, cs in self._seen.items() for c in cs), key=repr),
                "counters": dict(self._counters),
                "rejected": dict(self._rejected),
                "staleness_histogram": dict(self._hist),
                "last_lambda": self._last_lambda,
                "teacher_forwards": self.correction.teacher_forwards if self.correction else 0,
            }

    def _pending_deltas(self):
        D, idx = self._buffered(self._pending)
        return D.clone() if idx is None else D.index_select(0, torch.tensor(idx, device=D.device))

    def load_state_dict(self, state: dict):
        """Restore a ``state_dict()``. A checkpoint that does not fit this aggregator (another
        model's, another rule's full buffer, a field missing or of the wrong shape) raises a
        ValueError before anything is restored."""
        _check_state(state, self.spec.numel)
        # a full buffer merges in the submit that fills it, so this aggregator never holds one: a
        # checkpoint with one (another rule's, a distributed rank's) would leave no row for the
        # next submit, which would wait for a merge that never comes
        most = self._capacity - 1 if self._merges_when_full else self._capacity
        if len(state["pending"]) > most:
            raise ValueError(f"checkpoint buffers {len(state['pending'])} updates; this aggregator's rule merges "
                             f"at {self._capacity}, so it holds at most {most}")
        with self._lock:
            while self._staging_now:  # submits staging into rows now: let them end first (the wait
                self._rows_freed.wait()  # lets go of the lock, so before anything is changed)
            self._after_compute()  # a merge still running must not write over what is restored
            self._params.copy_(state["params"])
            self.version = int(state["version"])
            n = len(state["pending"])
            self._wait_ingest()  # copies still on their way must not land over the restored rows
            self._deltas[:n].copy_(state["pending_deltas"])
            self._pending = [_Pending(**{**p, "row": k}) for k, p in enumerate(state["pending"])]
            if self._staging is None:
                self._free_rows = list(range(n, self._capacity))[::-1]
            self._momentum = None if state["momentum"] is None else state["momentum"].to(self._params).clone()
            self._store.load_state_dict(state["store"])
            self._generation += 1
            self._seq = int(state["seq"])
            self._seen = collections.defaultdict(set)
            for client_id, version in state["seen"]:
                self._seen[version].add(client_id)
            self._counters = collections.Counter(state["counters"])
            self._rejected = collections.Counter(state["rejected"])
            self._hist = collections.Counter(state["staleness_histogram"])
            self._last_lambda = state["last_lambda"]
            if self.correction is not None:
                self.correction.invalidate()
                self.correction.teacher_forwards = int(state.get("teacher_forwards", 0))

    def set_global(self, params) -> None:
        """Replace the current version's parameters (a state_dict, or a flat [P] tensor), e.g.
        with the initial model a framework hands over. The version number stays; the version
        store and the teacher cache follow. Parameters of the wrong keys, shape or dtype, or
        holding NaN or Inf, raise and change nothing; tensors that require grad are taken as
        their values."""
        new = self._checked_global(params)
        with self._lock:
            self._write_global(new)

    def _checked_global(self, params) -> torch.Tensor:
        """set_global's ``params`` as a new flat tensor on the device, or the error that refuses them."""
        if isinstance(params, torch.Tensor):
            if params.numel() != self.spec.numel:
                raise ValueError(f"expected {self.spec.numel} parameters, got {params.numel()}")
            check_float("parameters", params.dtype)
            new = params.detach().reshape(-1).to(self.device, self.dtype, copy=True)
        else:  # into a new tensor first: a bad tensor after good ones must not leave the model half-written
            with torch.no_grad():
                new = self.spec.flatten(params, out=torch.empty_like(self._params))
        if not bool(torch.isfinite(new).all()):
            raise ValueError("set_global: the parameters hold NaN or Inf")
        return new

    def _write_global(self, new):
        """The checked parameters in place of the current version's (under the lock)."""
        self._after_compute()
        self._params.copy_(new)
        self._params_committed()
        if self.correction is not None:
            self.correction.invalidate()

    def load_into(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Copy the global parameters into ``model`` (default: the model given at construction)."""
        model = model or self.model
        with self._lock, torch.no_grad():
            self._after_compute()
            state = model.state_dict()
            for name, view in self.spec.unflatten(self._params).items():
                state[name].copy_(view)
        return model


def _scaled(coefs, idx, scale, device):
    """-coefs[idx] * scale as a device tensor: the KD rows' merge coefficients, kept on the device
    so that the correction's per-client scale never makes the host wait."""
    return -to_device([coefs[k] for k in idx], scale.dtype, device) * scale


def _times(c, coefs):
    """c * coefs, for a list of floats or a device tensor."""
    return c * coefs if isinstance(coefs, torch.Tensor) else [c * x for x in coefs]


def _delta_dtype(value, dtype):
    """The dtype buffered deltas are held in: the parameters' own by default, or 16 bits."""
    if value is None:
        return dtype
    resolved = _DELTA_DTYPES.get(value) if isinstance(value, str) else value
    if resolved not in (torch.float32, torch.bfloat16, torch.float16, dtype):
        raise ValueError(f"delta_dtype must be float32, bfloat16 or float16 (or the parameters' {dtype}), "
                         f"got {value!r}")
    return resolved


_STATE_KEYS = ("params", "version", "pending_deltas", "pending", "momentum", "store", "seq", "seen", "counters",
               "rejected", "staleness_histogram", "last_lambda")
_PENDING_FIELDS = {"seq", "client_id", "base_version", "num_samples", "staleness", "norm", "row"}


def _check_state(state, P):
    """What load_state_dict reads of a checkpoint, checked before it changes anything."""
    if not isinstance(state, dict) or state.get("format") != "fastagg-aggregator-1":
        raise ValueError("not a fastagg aggregator checkpoint")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")

    def rows(name, t, n):  # a float tensor of n rows of P (n None: one flat [P])
        shape = (P,) if n is None else (n, P)
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"checkpoint {name} must be a float tensor of shape {shape}, got {got}")

    if isinstance(state["params"], torch.Tensor) and state["params"].numel() != P:
        raise ValueError(f"checkpoint has {state['params'].numel()} parameters, the model {P}")
    rows("params", state["params"], None)
    pending = state["pending"]
    if not isinstance(pending, (list, tuple)) or not all(
            isinstance(p, dict) and set(p) <= _PENDING_FIELDS and _PENDING_FIELDS - {"norm", "row"} <= set(p)
            for p in pending):
        raise ValueError(f"checkpoint pending must be a list of buffered updates' records ({sorted(_PENDING_FIELDS)})")
    rows("pending_deltas", state["pending_deltas"], len(pending))
    if state["momentum"] is not None:
        rows("momentum", state["momentum"], None)
    store = state["store"]
    if not isinstance(store, dict) or {"versions", "rows", "evictions"} - set(store):
        raise ValueError("checkpoint store must hold versions, rows and evictions")
    rows("store rows", store["rows"], len(store["versions"]))


def _as_tensor(name, value) -> torch.Tensor:
    """An update's array (numpy or anything numpy reads) as a tensor, or UpdateDTypeError (an
    object or string array, say) instead of torch's TypeError."""
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise errors.UpdateDTypeError(f"{name} is not an array of numbers ({exc})") from None


def _per_update(value, n, name, scalar):
    """submit_many's argument ``name`` as a list of n values: None, one value for every update
    (``scalar``), or a sequence of n."""
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if scalar and not isinstance(value, (list, tuple)):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be None or a list of {n} (one per update), got {type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} values for {n} updates")
    return list(value)


def _check_args(base_version, num_samples, client_id=None):
    if client_id is not None:
        try:
            hash(client_id)
        except TypeError:
            raise errors.BadArgumentError("client_id must be hashable (a str, an int or a tuple of them), "
                                          f"got {type(client_id).__name__}") from None
    if base_version is None:
        raise errors.BadArgumentError("base_version is required (the version the client trained on)")
    if isinstance(base_version, bool) or not isinstance(base_version, (int, np.integer)) or base_version < 0:
        raise errors.BadArgumentError(f"base_version must be a non-negative int, got {base_version!r}")
    if num_samples is None:
        num_samples = 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or not 1 <= num_samples <= 2**53:
        raise errors.BadArgumentError(f"num_samples must be a positive int (at most 2**53), got {num_samples!r}")
    return int(base_version), int(num_samples)
