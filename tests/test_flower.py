"""fastagg inside real Flower simulations (flwr[simulation], offline, 10 nodes of different speeds)."""

import os
import sys

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")
pytest.importorskip("sklearn")

import fastagg  # noqa: E402
from fastagg.integrations.flower import AsyncStrategy, RoundStrategy, arrays_from_flat, flat_from_arrays  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "flower")
sys.path.insert(0, os.path.abspath(EXAMPLE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(EXAMPLE), os.environ.get("PYTHONPATH")]))
import flower_async as ex  # noqa: E402


def _fedadt():
    proxy = ex.held_out()[0][:80]
    return fastagg.Aggregator(ex.make_model(), fastagg.FedBuff(4), staleness=fastagg.staleness.polynomial(0.5),
                              correction=fastagg.KDCorrection(proxy, min_staleness=1), max_versions=64)


def test_async_strategy_in_a_real_flower_simulation():
    agg = _fedadt()
    initial = ex.accuracy(ex.make_model().state_dict())
    out = ex.run(lambda: AsyncStrategy(agg, num_updates=40, min_nodes=ex.NUM_NODES, metrics_every=8,
                                                 record_submissions=True))
    strategy, result = out["strategy"], out["result"]
    st = agg.stats()
    # every reply was submitted exactly once
    assert len(strategy.submitted) == 40 == st["accepted"] == st["merged"]
    assert len({(node, seq) for node, _, _, _, seq in strategy.submitted}) == 40
    assert [s[4] for s in strategy.submitted] == list(range(40))
    # nodes really ran out of step, and the correction ran on stale updates
    assert max(st["staleness_histogram"]) > 0 and st["corrected"] > 0
    # every node was put to work, not just the first two to connect (the slowest may not have
    # replied yet when the 40th update arrives)
    assert len(set(strategy.nodes)) == ex.NUM_NODES
    assert len({node for node, *_ in strategy.submitted}) >= ex.NUM_NODES // 2
    # the global model improved on held-out data (from 0.05; Ray's timing decides the arrival order
    # and with it the staleness: 15 runs gave 0.22-0.58, so a margin of 0.2 failed now and then)
    final = ex.accuracy(result.arrays.to_torch_state_dict())
    assert final > initial + 0.12
    # metrics carry staleness and correction statistics
    last = result.train_metrics_clientapp[40]
    assert last["mean-staleness"] > 0 and last["corrected"] == st["corrected"]
    assert result.evaluate_metrics_clientapp[1]["accuracy"] > 0
    # the same replies, in the same order, fed to a fresh aggregator give the same model
    replay = _fedadt()
    for node, base, num, delta, seq in strategy.submitted:
        replay.submit(delta, base_version=base, num_samples=num, client_id=(node, seq))
    replay.flush()
    assert torch.allclose(replay.params, flat_from_arrays(agg, result.arrays), rtol=0, atol=1e-6)


class _CapturingRounds(RoundStrategy):
    def aggregate_train(self, server_round, replies):
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        replies = list(replies)
        contents = [r.content for r in replies if not r.has_error()]
        self.n_replies = getattr(self, "n_replies", 0) + len(contents)
        self.expected = aggregate_arrayrecords(contents, self.weighted_by_key)  # Flower's FedAvg arithmetic
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.max_err = max(getattr(self, "max_err", 0.0),
                           max(float(abs(arrays[k].numpy() - self.expected[k].numpy()).max()) for k in arrays))
        return arrays, metrics


def test_round_strategy_equals_flowers_fedavg():
    agg = fastagg.Aggregator(ex.make_model(), fastagg.FedBuff(ex.NUM_NODES, sample_weighted=True),
                             staleness="constant")
    out = ex.run(lambda: _CapturingRounds(agg, fraction_evaluate=0.0, min_available_nodes=ex.NUM_NODES),
                 num_rounds=2)
    strategy = out["strategy"]
    assert agg.version == 2 and agg.stats()["merged"] == strategy.n_replies >= ex.NUM_NODES
    assert strategy.max_err < 1e-6, strategy.max_err


class _BatchGrid:
    """A stand-in Grid whose every poll returns all replies at once (the timing a fast cluster
    can produce): the strategy must still merge exactly num_updates of them."""

    def __init__(self, nodes, agg):
        self.nodes, self.agg, self.pending, self.count = nodes, agg, [], 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            self.pending.append(msg)
            ids.append(f"m{self.count}")
        return ids

    def pull_messages(self, message_ids):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        out, self.pending = self.pending, []
        replies = []
        for msg in out:
            sd = msg.content["arrays"].to_torch_state_dict()
            sd = {k: v + 0.01 for k, v in sd.items()}
            replies.append(Message(content=RecordDict({"arrays": ArrayRecord(sd),
                                                       "metrics": MetricRecord({"num-examples": 5})}),
                                   reply_to=msg))
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return []


def test_async_strategy_merges_exactly_num_updates_when_replies_come_in_batches(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # normally set by the Flower runtime
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)
    agg = fastagg.Aggregator(ex.make_model(), fastagg.FedAsync(0.5), staleness="constant")
    strategy = AsyncStrategy(agg, num_updates=7, min_nodes=3, fraction_evaluate=0.0)
    strategy.start(_BatchGrid([1, 2, 3], agg))  # each poll returns 3 replies: 3, 6, then 1 of 3
    assert agg.stats()["accepted"] == 7 and strategy.late_replies == 2


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 3 * 3, 2))


def _tied_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Tanh(), torch.nn.Linear(4, 11, bias=False))
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize("make", [_bn_model, _tied_model], ids=["batchnorm", "tied"])
def test_a_batchnorm_or_tied_model_travels_both_ways(make):
    """The global model sent to Flower clients carries the model's non-floating state (BatchNorm's
    num_batches_tracked) and its tied names, so that a client loads it strictly; a reply that
    carries them back is read as the aggregated tensors alone."""
    agg = fastagg.Aggregator(make(), fastagg.FedBuff(2))
    flat = torch.randn(agg.spec.numel)
    record = arrays_from_flat(agg, flat)
    client = make()
    client.load_state_dict(record.to_torch_state_dict())  # strict
    assert list(record.keys()) == list(client.state_dict().keys())
    reply = flwr.app.ArrayRecord(client.state_dict())
    assert torch.equal(flat_from_arrays(agg, reply), flat)


def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # normally set by the Flower runtime
        if hasattr(TaskIdentity, attr):
            monkeypatch.setattr(TaskIdentity, attr, 1)


class _MisbehavingGrid(_BatchGrid):
    """Every second reply is broken in the way ``kind`` says; the others are good."""

    def __init__(self, nodes, agg, kind):
        super().__init__(nodes, agg)
        self.kind, self.served = kind, 0

    def pull_messages(self, message_ids):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        out, self.pending = self.pending, []
        replies = []
        for msg in out:
            self.served += 1
            sd = {k: v + 0.01 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
            metrics = {"num-examples": 5}
            if self.served % 2 == 0:
                if self.kind == "no_arrays":
                    replies.append(Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg))
                    continue
                if self.kind == "wrong_shape":
                    name = next(iter(sd))
                    sd[name] = torch.zeros(sd[name].numel() + 1)
                elif self.kind == "nan":
                    sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
                else:
                    metrics = {"num-examples": {"nan_examples": float("nan"), "negative_examples": -3,
                                                "fractional_examples": 2.5}[self.kind]}
            replies.append(Message(content=RecordDict({"arrays": ArrayRecord(sd), "metrics": MetricRecord(metrics)}),
                                   reply_to=msg))
        return replies


@pytest.mark.parametrize("kind, reason", [("no_arrays", None), ("wrong_shape", None), ("nan", "non_finite"),
                                          ("nan_examples", "bad_argument"), ("negative_examples", "bad_argument"),
                                          ("fractional_examples", "bad_argument")])
def test_async_strategy_goes_on_past_a_misbehaving_client(kind, reason, monkeypatch):
    """A reply with no arrays, arrays that do not fit the model, NaN, or a sample count that is
    NaN, negative or fractional: counted in ``failures`` (and by the aggregator under its reason
    where it reached submit), nothing merged from it, and the run goes on to num_updates (two of
    these crashed the whole run before: StopIteration, and int(NaN)). The model equals a replay of
    the submitted updates."""
    _task_identity(monkeypatch)
    agg = fastagg.Aggregator(ex.make_model(), fastagg.FedAsync(0.5), staleness="constant")
    strategy = AsyncStrategy(agg, num_updates=6, min_nodes=3, fraction_evaluate=0.0, record_submissions=True)
    start = agg.params.clone()
    strategy.start(_MisbehavingGrid([1, 2, 3], agg, kind))
    assert agg.stats()["accepted"] == 6 and strategy.failures >= 5  # one bad reply per good one, about
    assert agg.stats()["rejected"].get(reason, 0) == (strategy.failures if reason else 0)
    replay = fastagg.Aggregator(ex.make_model(), fastagg.FedAsync(0.5), staleness="constant")
    replay.set_global(start)
    for node, base, num, delta, seq in strategy.submitted:
        replay.submit(delta, base_version=base, num_samples=num, client_id=(node, seq))
    assert len(strategy.submitted) == 6 and torch.allclose(replay.params, agg.params, rtol=0, atol=1e-6)


def test_round_strategy_merges_a_round_without_the_replies_it_refuses(monkeypatch):
    """Five replies to one round, two bad (NaN arrays; arrays of the wrong shape) and one with a
    NaN sample count: the round merges the two good ones exactly as FedAvg of those two
    (sample-weighted mean of their arrays), ``refused`` names the three with their errors, and the
    metrics are the good ones' (FedAvg would fail the round)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    _task_identity(monkeypatch)
    model = ex.make_model()
    agg = fastagg.Aggregator(model, fastagg.FedBuff(8, sample_weighted=True), staleness="constant")
    strategy = RoundStrategy(agg, fraction_evaluate=0.0)
    g = torch.Generator().manual_seed(0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    out = Message(content=RecordDict({"arrays": ArrayRecord(start)}), dst_node_id=1, message_type="train")
    trained = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in range(5)]
    nums = [3, 7, 4, 2, 6]
    trained[1] = {k: torch.full_like(v, float("nan")) for k, v in trained[1].items()}
    name = next(iter(start))
    trained[3][name] = torch.zeros(start[name].numel() + 2)
    nums[4] = float("nan")
    replies = [Message(content=RecordDict({"arrays": ArrayRecord(sd), "metrics": MetricRecord(
        {"num-examples": n, "loss": float(i)})}), reply_to=out) for i, (sd, n) in enumerate(zip(trained, nums))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert [k for k, _ in strategy.refused] == [1, 3, 4]
    assert "NaN" in str(strategy.refused[0][1]) and "num_samples" in str(strategy.refused[2][1])
    for k in start:
        want = (3 * trained[0][k].double() + 4 * trained[2][k].double()) / 7
        torch.testing.assert_close(torch.as_tensor(arrays[k].numpy()).double(), want, rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == pytest.approx((3 * 0.0 + 4 * 2.0) / 7)
