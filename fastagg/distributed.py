"""Scale-out over ``torch.distributed``: one FedBuff server step spread over several processes.

Each rank (a process, typically one per GPU, launched with ``torchrun``) takes its own clients'
updates: ``submit`` validates and buffers them locally exactly as ``Aggregator.submit`` does.
``step()`` is collective — every rank calls it, e.g. once per pass of its server loop:

1. the ranks all-reduce how many updates they hold and the sum of their FedBuff weights a_k;
2. once the global count reaches ``buffer_size`` (at once with ``step(force=True)`` or
   ``flush()``), each rank corrects its own updates against the teacher — the global model,
   the same on every rank, so each rank computes it itself and nothing is sent for it;
3. each rank sums its corrected deltas with their global coefficients a_k / N into one [P]
   vector, the vectors are all-reduced (summed), and every rank applies the same server
   update (momentum included). Models and versions stay identical on every rank.

The result equals one ``Aggregator`` fed every rank's updates (tested in float64 against it).
Traffic per step: one all-reduce of P parameters and two small ones, whatever K is; the
correction, which dominates the step, is split over the ranks. If a rank fails while correcting
its share, every rank raises and nothing changes (no rank is left waiting in a collective).

    dist.init_process_group("nccl")            # or "gloo" on CPUs; torchrun sets the rest
    agg = DistributedAggregator(model, FedBuff(buffer_size=256), correction=KDCorrection(proxy),
                                device=f"cuda:{local_rank}")
    ... each rank: agg.submit(update) for its clients; every rank: agg.step() in its loop

Only FedBuff: FedAsync is sequential by definition (each arrival's weight depends on every
later one's), which a server spread over ranks cannot order without a round trip per update.
Duplicates are detected per rank: send each client to one rank (e.g. by a hash of its id).
Each rank checkpoints its own ``state_dict()`` (its buffer differs); restore every rank from
the same step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import errors
from . import rules as _rules
from .aggregator import Aggregator
from .ops.merge import fused_merge


class DistributedAggregator(Aggregator):
    """An ``Aggregator`` whose FedBuff buffer is spread over the ranks of a process group.

    ``group``: the process group (default: the world). ``local_capacity``: how many updates
    this rank may hold between steps (default ``buffer_size``); a submit beyond it raises
    ``errors.BufferFullError`` and changes nothing. At construction every rank takes rank 0's
    parameters (as DistributedDataParallel does). Other arguments as ``Aggregator``.
    """

    _merges_when_full = False  # a full local buffer waits for the collective step()

    def __init__(self, model, rule=None, staleness="polynomial", correction=None, *, group=None,
                 local_capacity: int | None = None, **kwargs):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedAggregator needs an initialised process group: call "
                               "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
        rule = _rules.resolve(rule or _rules.FedBuff())
        if not isinstance(rule, _rules.FedBuff):
            raise ValueError(f"DistributedAggregator merges with FedBuff only, got {type(rule).__name__}: FedAsync "
                             "orders every arrival after the one before, which ranks cannot do without a round "
                             "trip per update")
        if kwargs.get("compute_stream"):
            raise ValueError("DistributedAggregator does not take compute_stream=True: its step() reads the ranks' "
                             "counts back to the host between collectives, so the merge would not overlap the next "
                             "submits anyway")
        local_capacity = rule.buffer_size if local_capacity is None else local_capacity
        if isinstance(local_capacity, bool) or not isinstance(local_capacity, int) or local_capacity < 1:
            raise ValueError(f"local_capacity must be a positive int, got {local_capacity!r}")
        self._local_capacity = local_capacity
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._comm = dist.get_backend(group)
        super().__init__(model, rule, staleness, correction, **kwargs)
        if self._comm == "nccl" and self.device.type != "cuda":
            raise ValueError(f"an NCCL process group needs the aggregator on a GPU (device='cuda:<local rank>'), "
                             f"got device={self.device}; use a gloo group for a CPU server")
        self._comm_device = self.device if self._comm == "nccl" else torch.device("cpu")
        self._sum = torch.empty_like(self.params)  # this rank's share of u, then u itself
        self._broadcast_params()

    def _buffer_capacity(self):
        return self._local_capacity

    def _broadcast_params(self):
        """Every rank takes rank 0's parameters, as version self.version of its store."""
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        self._all(self.params, lambda t: dist.broadcast(t, src, group=self.group))
        self._params_committed()
        if self.correction is not None:
            self.correction.invalidate()

    def _all(self, t, op):
        """Run the collective ``op`` on ``t`` in place, through a CPU copy when the group is gloo
        and ``t`` lives on a GPU."""
        if t.device == self._comm_device:
            op(t)
            return
        host = t.to(self._comm_device)
        op(host)
        t.copy_(host)

    def _admit(self, base_version, client_id):
        if len(self._pending) + self._staging_now >= self._capacity:  # buffered, or being staged
            raise errors.BufferFullError(
                f"rank {self.rank} holds {self._capacity} updates (local_capacity): retry after the next step()")
        return super()._admit(base_version, client_id)

    def step(self, force: bool = False) -> int:
        """Collective (every rank calls it): merge every rank's buffered updates once there are
        ``buffer_size`` of them over all ranks, or any at all with ``force``. Returns the version."""
        with self._lock:
            self._wait_ingest()
            pend = self._pending
            w = self._staleness_weights(pend)
            samples = [p.num_samples for p in pend]
            a = self.rule.weights(w, samples)
            v = float(self.version)
            info = torch.tensor([len(pend), math.fsum(a), v, v * v], dtype=torch.float64, device=self._comm_device)
            dist.all_reduce(info, group=self.group)
            count, weight_sum, v_sum, v2_sum = info.tolist()
            if v_sum != self.world_size * v or v2_sum != self.world_size * v * v:  # equal iff every rank holds v
                raise RuntimeError(f"the ranks hold different global versions (rank {self.rank}: {self.version}, "
                                   f"mean {v_sum / self.world_size:g}): restore every rank from the same step")
            count = int(round(count))
            if count == 0 or (count < self.rule.buffer_size and not force):
                return self.version
            self._merge_global(pend, self.rule.coefficients(w, samples, totals=(weight_sum, count)))
            return self.version

    def flush(self) -> int:
        """Collective: merge whatever every rank holds now (``step(force=True)``)."""
        return self.step(force=True)

    def _merge_global(self, pend, coefs):
        K = len(pend)
        D, idx = self._buffered(pend)
        slots = self._base_slots(pend)
        u = self._sum
        kept = self._counters["corrected"], self._last_lambda
        failure = None
        try:  # this rank's share: nothing global changes here
            corr_idx, corr_rows, corr_scale = self._correct(D, idx, pend, slots)
            u.zero_()
            if K:
                fused_merge(u, 1.0, self._delta_groups(D, idx, coefs, corr_idx, corr_rows, corr_scale), out=u,
                            backend=self.backend)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            failure = exc
        ok = torch.tensor([0.0 if failure else 1.0], device=self._comm_device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if failure is not None or float(ok) < 1.0:
            self._counters["corrected"], self._last_lambda = kept
            msg = "this rank" if failure is not None else "another rank"
            raise RuntimeError(f"step abandoned on every rank: {msg} failed while correcting its updates "
                               "(parameters, version and buffers unchanged)") from failure
        self._all(u, lambda t: dist.all_reduce(t, group=self.group))
        self._apply_buffered([(u[None], [1.0], None)])
        self.version += 1
        self._finish_merge(pend, slots)

    def set_global(self, params) -> None:
        """Collective: every rank calls it; rank 0's ``params`` become every rank's. Parameters that
        one rank refuses (see Aggregator.set_global) raise on every rank and change nothing."""
        failure, new = None, None
        try:
            new = self._checked_global(params)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
            failure = exc
        with self._lock:
            ok = torch.tensor([0.0 if failure else 1.0], device=self._comm_device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
            if failure is not None or float(ok) < 1.0:
                msg = f"this rank's parameters were refused: {failure}" if failure is not None \
                    else "another rank's parameters were refused"
                raise ValueError(f"set_global abandoned on every rank: {msg} (parameters and version unchanged)") \
                    from failure
            self._write_global(new)
            self._broadcast_params()

    def stats(self) -> dict:
        out = super().stats()
        out.update(rank=self.rank, world_size=self.world_size)
        return out
