"""Asynchronous FedADT in a real Flower simulation: 10 nodes of different speeds, digits data.

    pip install "fastagg[flower]" scikit-learn
    python examples/flower/flower_async.py            # async FedBuff + KD correction
    python examples/flower/flower_async.py --rounds   # Flower's round-based loop, merged by fastagg

Each node holds a Dirichlet(0.5) share of scikit-learn's digits and sleeps in proportion to its
node number, so the nodes really run out of step and updates arrive stale.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

NUM_NODES = 10


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def partition(pid: int, num_nodes: int = NUM_NODES):
    """(x_train, y_train) of node ``pid``: a Dirichlet(0.5) label split of the first 80%."""
    from fastagg.simulate import dirichlet_split

    x, y = load_data()
    n_train = int(0.8 * len(y))
    parts = dirichlet_split(y[:n_train].numpy(), num_nodes, 0.5, np.random.default_rng(0))
    idx = torch.from_numpy(parts[pid])
    return x[idx], y[idx]


def held_out():
    x, y = load_data()
    n_train = int(0.8 * len(y))
    return x[n_train:], y[n_train:]


def accuracy(state_dict) -> float:
    model = make_model()
    model.load_state_dict(state_dict)
    x, y = held_out()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


client_app = ClientApp()


def _node(msg: Message, context: Context):
    """(partition id, the model the server sent, this node's data)."""
    pid = int(context.node_config["partition-id"])
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return pid, model, *partition(pid, int(context.node_config["num-partitions"]))


@client_app.train()
def train(msg: Message, context: Context):
    pid, model, x, y = _node(msg, context)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(int(msg.content["config"].get("fastagg-version", 0)) * 100 + pid)
    for _ in range(10):
        b = torch.randint(len(y), (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    time.sleep(0.02 * (1 + pid))  # node speeds differ: staleness is real
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                       "metrics": MetricRecord({"num-examples": len(y)})}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context):
    _, model, x, y = _node(msg, context)
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    return Message(content=RecordDict({"metrics": MetricRecord({"accuracy": acc, "num-examples": len(y)})}),
                   reply_to=msg)


def server_app(make_strategy, results: dict, **start_kwargs) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_strategy()
        results["strategy"] = strategy
        results["result"] = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                                           **start_kwargs)

    return app


def run(make_strategy, num_nodes=NUM_NODES, **start_kwargs):
    from flwr.simulation import run_simulation

    results: dict = {}
    run_simulation(server_app=server_app(make_strategy, results, **start_kwargs), client_app=client_app,
                   num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 0.1}, "init_args": {"num_cpus": 2}})
    return results


if __name__ == "__main__":
    import fastagg
    from fastagg.integrations.flower import AsyncStrategy, RoundStrategy

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", action="store_true", help="round-based mode")
    args = p.parse_args()
    proxy = held_out()[0][:100]
    if args.rounds:
        agg = fastagg.Aggregator(make_model(), fastagg.FedBuff(NUM_NODES, sample_weighted=True), staleness="constant")
        out = run(lambda: RoundStrategy(agg, fraction_evaluate=0.0), num_rounds=5)
    else:
        agg = fastagg.Aggregator(make_model(), fastagg.FedBuff(5), correction=fastagg.KDCorrection(proxy))
        out = run(lambda: AsyncStrategy(agg, num_updates=100, min_nodes=NUM_NODES))
    res = out["result"]
    print("held-out accuracy:", accuracy(res.arrays.to_torch_state_dict()))
    print("fastagg stats:", agg.stats())
