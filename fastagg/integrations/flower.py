"""fastagg as a Flower strategy (Message API, flwr >= 1.21; tested with 1.42).

``AsyncStrategy`` is truly asynchronous: it overrides ``start()``, keeps up to ``concurrency``
nodes busy, polls ``grid.pull_messages`` without blocking, submits each reply to a fastagg
aggregator the moment it arrives (FedAsync, FedBuff or FedADT, whatever the aggregator is
configured with) and sends the latest global model straight back to that node. The base version
travels in the message's config (``fastagg-version``); clients reply with their trained
weights (Flower's convention) or, with ``clients_send="delta"``, with the delta.

``RoundStrategy`` keeps Flower's round-based ``start()`` and merges each round's replies through
fastagg (FedBuff with the round as the buffer, FedADT correction included).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from ..aggregator import Aggregator
from ..errors import InvalidUpdate, MalformedUpdateError

VERSION_KEY = "fastagg-version"


def arrays_from_flat(agg: Aggregator, flat: torch.Tensor) -> ArrayRecord:
    """Global flat parameters -> ArrayRecord (one copy into Flower's serialised buffers), in the
    model's ``state_dict`` order, its non-floating state (BatchNorm's ``num_batches_tracked``, not
    aggregated: the server model's values) included, so that a client loads it strictly."""
    views = agg.spec.unflatten(flat)
    views.update({alias: views[name] for alias, name in agg.spec.aliases})  # tied names: the same values
    return ArrayRecord(OrderedDict((k, (views[k] if k in views else v).detach())
                                   for k, v in agg.model.state_dict().items()))


def flat_from_arrays(agg: Aggregator, record: ArrayRecord, out: torch.Tensor | None = None,
                     subtract: torch.Tensor | None = None) -> torch.Tensor:
    """ArrayRecord -> flat [P] vector, minus ``subtract`` when given, in one pass: numpy views of
    Flower's buffers are read once and written straight into the flat vector."""
    spec = agg.spec
    if set(record.keys()) - set(spec.ignored) - {a for a, _ in spec.aliases} != set(spec.names):
        raise InvalidUpdate(f"reply arrays {sorted(record.keys())[:4]}... do not match the model's keys")
    out = torch.empty(spec.numel, dtype=agg.dtype) if out is None else out
    for name, shape, off, n in spec.items():
        arr = torch.from_numpy(np.ascontiguousarray(record[name].numpy())).reshape(-1)
        if arr.numel() != n:
            raise InvalidUpdate(f"reply array {name!r} has {arr.numel()} elements, expected {n} {shape}")
        if subtract is None:
            out[off:off + n].copy_(arr)
        else:
            torch.sub(arr.to(out.dtype), subtract[off:off + n], out=out[off:off + n])
    return out


class AsyncStrategy(Strategy):
    """Asynchronous FL in Flower, backed by a fastagg ``Aggregator``.

    Parameters: ``aggregator`` (its rule, staleness, correction decide the merge);
    ``num_updates`` and/or ``time_budget`` (seconds) stop the run; ``concurrency`` nodes train at
    once (default: all); ``min_nodes`` to wait for before starting (Flower counts nodes as they
    connect, so without waiting a run would start on the first two); ``clients_send`` "weights"
    or "delta"; ``weighted_by_key`` the reply metric holding the sample count;
    ``metrics_every`` updates between metric snapshots in ``Result.train_metrics_clientapp``
    (keyed by update count); ``record_submissions`` keeps every accepted delta in
    ``self.submitted`` (for audits and replays). Rejected replies are counted in ``failures``
    and in the aggregator's rejection counters, not in ``num_updates``.
    """

    def __init__(self, aggregator: Aggregator, *, num_updates: int | None = 100, time_budget: float | None = None,
                 concurrency: int | None = None, min_nodes: int = 2, node_wait_timeout: float = 120.0,
                 poll_interval: float = 0.005, clients_send: str = "weights", arrayrecord_key: str = "arrays",
                 configrecord_key: str = "config", weighted_by_key: str = "num-examples", metrics_every: int = 10,
                 fraction_evaluate: float = 1.0, record_submissions: bool = False):
        if num_updates is None and time_budget is None:
            raise ValueError("give num_updates or time_budget (or both): an async run needs a stopping rule")
        if clients_send not in ("weights", "delta"):
            raise ValueError(f"clients_send must be 'weights' or 'delta', got {clients_send!r}")
        self.agg = aggregator
        self.num_updates, self.time_budget = num_updates, time_budget
        self.concurrency, self.min_nodes, self.node_wait_timeout = concurrency, min_nodes, node_wait_timeout
        self.poll_interval, self.clients_send = poll_interval, clients_send
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.weighted_by_key, self.metrics_every = weighted_by_key, metrics_every
        self.fraction_evaluate = fraction_evaluate
        # with record_submissions: (node_id, base_version, num_samples, delta, receipt seq) per
        # accepted reply, in submit order (for audits and replays; it holds every delta)
        self.record_submissions = record_submissions
        self.submitted: list = []
        self.failures = 0
        self.late_replies = 0
        self.nodes: list = []  # arrived after num_updates / time_budget was reached: not merged

    # The round hooks are unused by the asynchronous start(); evaluation uses them once at the end.
    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):
        nodes = list(grid.get_node_ids())
        n = max(1, int(len(nodes) * self.fraction_evaluate)) if self.fraction_evaluate > 0 else 0
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, message_type="evaluate", dst_node_id=node) for node in nodes[:n]]

    def aggregate_evaluate(self, server_round, replies):
        totals, weight = {}, 0.0
        for reply in replies:
            if reply.has_error():
                continue
            metrics = next(iter(reply.content.metric_records.values()), None)
            if metrics is None:
                continue
            n = float(metrics.get(self.weighted_by_key, 1))
            weight += n
            for k, v in metrics.items():
                if k != self.weighted_by_key and isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0.0) + n * float(v)
        return MetricRecord({k: v / weight for k, v in totals.items()}) if weight else None

    def summary(self):
        a = self.agg
        print(f"fastagg AsyncStrategy: rule={a.rule}, correction={'on' if a.correction else 'off'}, "
              f"num_updates={self.num_updates}, time_budget={self.time_budget}, concurrency={self.concurrency}")

    # -- the asynchronous loop ---------------------------------------------------------------
    def _wait_for_nodes(self, grid):
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of min_nodes={self.min_nodes} Flower nodes connected "
                                   f"within {self.node_wait_timeout} s")
            time.sleep(0.1)
        return nodes

    def _send(self, grid, node, config, in_flight, bases):
        version, flat = self.agg.pull(flat=True)
        if version not in bases:
            bases[version] = [flat, 0]
        bases[version][1] += 1
        cfg = ConfigRecord(dict(config))
        cfg[VERSION_KEY] = version
        content = RecordDict({self.arrayrecord_key: arrays_from_flat(self.agg, bases[version][0]),
                              self.configrecord_key: cfg})
        (mid,) = grid.push_messages([Message(content=content, message_type="train", dst_node_id=node)])
        in_flight[mid] = (node, version)

    def _release(self, bases, version):
        bases[version][1] -= 1
        if bases[version][1] == 0:
            del bases[version]

    def _snapshot(self, n):
        st = self.agg.stats()
        hist = st["staleness_histogram"]
        return MetricRecord({
            "updates": n, "version": st["version"], "merged": st["merged"], "corrected": st["corrected"],
            "rejected": st["rejected_total"], "mean-staleness": float(st["mean_staleness"]),
            "max-staleness": max(hist) if hist else 0, "lambda": float(st["lambda"] or 0.0),
            "failures": self.failures})

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 1, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None) -> Result:
        """Run until ``num_updates`` replies were submitted or ``time_budget`` passed; then one
        federated evaluation round (and ``evaluate_fn`` on the server). ``num_rounds`` is
        ignored (an asynchronous run has no rounds); ``timeout`` bounds the final evaluation."""
        self.summary()
        agg, result = self.agg, Result()
        if initial_arrays is not None:
            agg.set_global(flat_from_arrays(agg, initial_arrays))
        train_config = train_config or ConfigRecord()
        if evaluate_fn is not None:
            res = evaluate_fn(0, arrays_from_flat(agg, agg.params))
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        nodes = self._wait_for_nodes(grid)
        busy = nodes[: self.concurrency or len(nodes)]
        self.nodes = list(busy)  # the nodes this run keeps busy
        in_flight, bases = {}, {}
        for node in busy:
            self._send(grid, node, train_config, in_flight, bases)
        t0, n = time.monotonic(), 0
        scratch = torch.empty(agg.spec.numel, dtype=agg.dtype)

        def done():
            return (self.num_updates is not None and n >= self.num_updates) or (
                self.time_budget is not None and time.monotonic() - t0 > self.time_budget)

        while in_flight and not done():
            replies = list(grid.pull_messages(list(in_flight)))
            if not replies:
                time.sleep(self.poll_interval)
                continue
            for reply in replies:
                node, base = in_flight.pop(reply.metadata.reply_to_message_id)
                if done():  # replies that arrive after the stopping rule are not merged
                    self._release(bases, base)
                    self.late_replies += 1
                    continue
                if reply.has_error():
                    self.failures += 1
                elif self._submit(reply, node, base, bases, scratch):
                    n += 1
                    if n % self.metrics_every == 0:
                        result.train_metrics_clientapp[n] = self._snapshot(n)
                self._release(bases, base)
                if not done():
                    self._send(grid, node, train_config, in_flight, bases)
        agg.flush()
        result.train_metrics_clientapp[n] = self._snapshot(n)
        arrays = arrays_from_flat(agg, agg.params)
        result.arrays = arrays
        eval_msgs = self.configure_evaluate(1, arrays, evaluate_config or ConfigRecord(), grid)
        if eval_msgs:
            agg_eval = self.aggregate_evaluate(1, grid.send_and_receive(eval_msgs, timeout=timeout))
            if agg_eval is not None:
                result.evaluate_metrics_clientapp[1] = agg_eval
        if evaluate_fn is not None:
            res = evaluate_fn(1, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[1] = res
        return result

    def _submit(self, reply, node, base, bases, scratch) -> bool:
        content = reply.content
        metrics = next(iter(content.metric_records.values()), {})
        num = _num_samples(metrics.get(self.weighted_by_key, 1) if metrics else 1)
        try:
            records = content.array_records
            if not records:  # a client app that replied with metrics only: the client's fault, not the run's
                raise MalformedUpdateError("the reply carries no ArrayRecord")
            record = records[self.arrayrecord_key] if self.arrayrecord_key in records else next(iter(records.values()))
            if self.clients_send == "weights":
                delta = flat_from_arrays(self.agg, record, out=scratch, subtract=bases[base][0])
            else:
                delta = flat_from_arrays(self.agg, record, out=scratch)
            receipt = self.agg.submit(delta, base_version=base, num_samples=num,
                                      client_id=(node, reply.metadata.reply_to_message_id))
        except InvalidUpdate:
            self.failures += 1  # those that reached submit are counted by the aggregator under their reason, too
            return False
        if self.record_submissions:
            self.submitted.append((node, base, num, delta.clone(), receipt.seq))
        return True


def _num_samples(value):
    """A reply's sample count for submit: an int (an integral float taken as one; 0 as 1, a client
    that reports no examples still sent an update), or the value as it came, which submit refuses
    (a negative, NaN or fractional count)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return 1 if isinstance(value, int) and not isinstance(value, bool) and value == 0 else value


class RoundStrategy(FedAvg):
    """Flower's round-based FedAvg loop, with each round's replies merged by fastagg.

    The aggregator should use ``FedBuff(buffer_size >= replies per round)``; every round submits
    the replies (deltas against the round's global model, ``num-examples`` as sample count) and
    flushes, so the round is the buffer. With ``FedBuff(sample_weighted=True)``, constant
    staleness, no correction and server_lr = 1 this is exactly FedAvg; with a ``KDCorrection``
    (``min_staleness=0``, since a synchronous round has no staleness) it is FedADT per round.
    A reply the aggregator refuses (arrays that do not fit the model, NaN, a norm over the bound,
    a bad sample count) is logged, left out of the round and of its metrics, and kept in
    ``refused``; the round merges the others (FedAvg would fail the round).
    """

    def __init__(self, aggregator: Aggregator, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.agg = aggregator
        self.refused: list = []  # the last round's refused replies: (index among its valid replies, error)

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 1:  # start() hands the initial model here: it becomes the current version
            self.agg.set_global(flat_from_arrays(self.agg, arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        agg = self.agg
        base_version, base = agg.pull(flat=True)
        # one bad reply does not sink the round: each refused one is logged and kept in
        # ``self.refused`` (those that reach the aggregator are counted there under their reason); the others merge
        self.refused, kept, deltas, nums = [], [], [], []
        for k, reply in enumerate(valid):
            record = reply.content.array_records[self.arrayrecord_key]
            try:
                deltas.append(flat_from_arrays(agg, record, subtract=base))
            except InvalidUpdate as exc:  # arrays that do not fit the model
                self.refused.append((k, exc))
                continue
            kept.append(k)
            nums.append(_num_samples(reply.content.metric_records[next(iter(reply.content.metric_records))]
                                     [self.weighted_by_key]))
        results = agg.submit_many(deltas, base_versions=base_version, num_samples=nums) if deltas else []
        self.refused += [(k, r) for k, r in zip(kept, results) if isinstance(r, InvalidUpdate)]
        self.refused.sort(key=lambda kr: kr[0])
        for k, exc in self.refused:
            log(WARNING, "fastagg RoundStrategy: round %s, reply %d of %d refused: %s", server_round, k + 1,
                len(valid), exc)
        agg.flush()
        merged = [valid[k].content for k, r in zip(kept, results) if not isinstance(r, InvalidUpdate)]
        metrics = self.train_metrics_aggr_fn(merged, self.weighted_by_key) if merged else None
        return arrays_from_flat(agg, agg.params), metrics
